"""Images made by mkfs.erofs read by our reader; merged metadata (flatdev) over layer images."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from bdserver.erofs import structs as S
from bdserver.erofs.inspect import inspect_path
from bdserver.erofs.reader import ErofsImage
from bdserver.erofs.tree import BlockMap, Inode, TailedBlockMap
from bdserver.erofs.writer import DeviceSlot, plan_image, write_image
from tests.erofs.helpers import (
    Spool,
    assert_mount_matches,
    assert_reader_matches,
    disk_tree_equals_reader,
    fsck,
    mounted,
    reg,
    symlink,
)
from tests.erofs.test_roundtrip import ACL, CAP_V2, edge_tree


def make_source_dir(top: Path) -> None:
    """A real directory with the things layers contain (run as root)."""
    top.mkdir()
    (top / "etc").mkdir()
    (top / "etc" / "passwd").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    (top / "bin").mkdir()
    for n in (0, 1, 4095, 4096, 4097, 8193, 100_000):
        (top / "bin" / f"f{n}").write_bytes(os.urandom(n))
    (top / "bin" / "ping").write_bytes(b"\x7fELF" + b"x" * 5000)
    os.setxattr(top / "bin" / "ping", "security.capability", CAP_V2)
    os.setxattr(top / "bin" / "f1", "user.comment", b"hello")
    os.setxattr(top / "etc", "trusted.overlay.opaque", b"y")
    os.setxattr(top / "etc" / "passwd", "system.posix_acl_access", ACL)
    os.link(top / "bin" / "f4097", top / "etc" / "hardlink")
    os.symlink("../etc/passwd", top / "bin" / "lnk")
    os.symlink("x" * 3000, top / "bin" / "longlnk")
    os.mknod(top / "etc" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(top / "etc" / "wh", stat.S_IFCHR, 0)
    os.mkfifo(top / "etc" / "fifo")
    os.chown(top / "etc" / "passwd", 1000, 70000)
    big = top / "many"
    big.mkdir()
    for i in range(400):
        (big / f"entry{i:04d}").write_bytes(b"%d" % i)
    os.utime(top / "etc" / "passwd", ns=(1, 1_600_000_000_123_456_789))


def _mkfs(img: Path, src: Path, *opts: str) -> None:
    subprocess.run(["mkfs.erofs", "--quiet", "-T1700000000", *opts, str(img), str(src)], check=True)


@pytest.fixture(scope="module")
def srcdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = tmp_path_factory.mktemp("src") / "root"
    make_source_dir(top)
    return top


@pytest.mark.parametrize(
    "opts",
    [
        (),
        ("-Enoinline_data",),
        ("--chunksize=4096",),
        ("--chunksize=8192", "-Eforce-chunk-indexes"),
        ("-Eforce-inode-extended",),
        ("--preserve-mtime",),
    ],
    ids=["default", "noinline", "chunk-blockmap", "chunk-indexes", "extended", "mtime"],
)
def test_reader_reads_mkfs_images(srcdir: Path, tmp_path: Path, opts: tuple[str, ...]) -> None:
    img = tmp_path / "img"
    _mkfs(img, srcdir, *opts)
    with ErofsImage.open(img) as e, mounted(img, tmp_path / "mnt") as mnt:
        disk_tree_equals_reader(mnt, e)


def test_extents_refuse_inline_tails(srcdir: Path, tmp_path: Path) -> None:
    from bdserver.errors import FormatError

    img = tmp_path / "img"
    _mkfs(img, srcdir)
    with ErofsImage.open(img) as e:
        info = e.lookup("/bin/f4097")
        assert info.layout == S.LAYOUT_FLAT_INLINE
        with pytest.raises(FormatError):
            info.extents()
        with pytest.raises(FormatError):
            e.to_tree()


def _write(root: Inode, path: Path, **kw: object) -> int:
    with open(path, "wb") as out:
        return write_image(root, out, **kw).blocks  # type: ignore[arg-type]


def _concat(out: Path, *parts: Path) -> None:
    with open(out, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)


def _tag(i: int) -> bytes:
    return (b"sha256:" + (b"%x" % i) * 64)[:64]


def test_flatdev_merged_metadata(srcdir: Path, tmp_path: Path) -> None:
    """[M | A | B]: M's files are BlockMaps at unified addresses into our layer A and a layer B
    made by mkfs.erofs -Enoinline_data; mount the concatenation file-backed (flatdev) and by loop."""
    spool = Spool(tmp_path / "spool")
    a_tree = edge_tree(spool)
    a_img = tmp_path / "A"
    a_blocks = _write(a_tree, a_img, build_time=1_700_000_000, build_time_nsec=123_456_789)
    b_img = tmp_path / "B"
    _mkfs(b_img, srcdir, "-Enoinline_data", "--preserve-mtime")
    b_blocks = b_img.stat().st_size // 4096

    def merged(m_blocks: int) -> tuple[Inode, list[DeviceSlot]]:
        with ErofsImage.open(a_img) as a, ErofsImage.open(b_img) as b:
            root = a.to_tree(block_offset=m_blocks)
            root.children[b"layerB"] = b.to_tree(block_offset=m_blocks + a_blocks)  # type: ignore[index]
        devs = [DeviceSlot(_tag(1), a_blocks, m_blocks), DeviceSlot(_tag(2), b_blocks, m_blocks + a_blocks)]
        return root, devs

    root0, devs0 = merged(0)
    m_blocks = plan_image(root0, devices=devs0, meta_only=True).blocks
    root, devs = merged(m_blocks)
    m_img = tmp_path / "M"
    assert _write(root, m_img, devices=devs, meta_only=True) == m_blocks
    # M holds only metadata: it is small whatever the layers' data
    assert m_blocks < 600

    with ErofsImage.open(m_img) as m:
        assert [(d.tag, d.blocks, d.mapped_blkaddr) for d in m.devices] == [
            (d.tag, d.blocks, d.mapped_blkaddr) for d in devs
        ]
        assert m.sb.feature_incompat == S.INCOMPAT_CHUNKED_FILE | S.INCOMPAT_DEVICE_TABLE
    fsck(m_img, "/dev/null", "/dev/null")
    refs = inspect_path(str(m_img))["tree"]["data_blocks_by_device"]
    assert set(refs) == {"1", "2"}  # every data block is in a layer's window, none outside

    flat = tmp_path / "flat"
    _concat(flat, m_img, a_img, b_img)
    # the merged tree: A's tree with B under /layerB, B's metadata as the kernel shows it
    with mounted(b_img, tmp_path / "mntB") as mb, mounted(flat, tmp_path / "mnt") as mnt:
        sub = {k: v for k, v in a_tree.children.items()}  # type: ignore[union-attr]
        expected_a = Inode.directory(a_tree.mode & 0o7777, mtime=a_tree.mtime, mtime_nsec=a_tree.mtime_nsec)
        expected_a.children = sub
        assert_mount_matches(expected_a, mnt, dir_nlink=False, skip=(b"layerB",))
        with ErofsImage.open(b_img) as b:
            disk_tree_equals_reader(mb, b)  # B as mkfs made it ...
            disk_tree_equals_reader(mnt / "layerB", b)  # ... equals B seen through M
    with mounted(flat, tmp_path / "mnt-loop", "loop") as mnt:
        assert_mount_matches(expected_a, mnt, dir_nlink=False, skip=(b"layerB",))
    with ErofsImage.open(flat) as f:
        assert_reader_matches(expected_a, f, dir_nlink=False, skip=(b"/layerB",))
        assert f.lookup("/layerB/bin/f100000").read() == (srcdir / "bin" / "f100000").read_bytes()
        assert f.lookup("/huge").read(4294967294, 8) == b"across4G"
    spool.close()


def test_blockmap_file_contents_via_reader(tmp_path: Path) -> None:
    """BlockMap inodes: holes, multi-block chunks, unified addresses, read back by our reader."""
    spool = Spool(tmp_path / "spool")
    data = os.urandom(5 * 4096 + 17)
    layer = Inode.directory()
    layer.children[b"f"] = reg(spool.dense(data))  # type: ignore[index]
    a_img = tmp_path / "A"
    a_blocks = _write(layer, a_img)
    with ErofsImage.open(a_img) as a:
        start = a.lookup("/f").extents()[0][2]
    meta = Inode.directory()
    # 8 KiB chunks: chunk 0 -> data[0:8K], chunk 1 hole, chunk 2 -> data[16K:21K+17]
    m_blocks = 1
    for _ in range(3):
        meta.children = {
            b"g": reg(
                BlockMap(size=len(data), chunk_bits=13, blocks=[m_blocks + start, None, m_blocks + start + 4])
            ),
            b"s": symlink(b"g"),
        }
        m_blocks = plan_image(meta, devices=[DeviceSlot(b"a", a_blocks, m_blocks)]).blocks
    m_img = tmp_path / "M"
    _write(meta, m_img, devices=[DeviceSlot(b"a", a_blocks, m_blocks)])
    flat = tmp_path / "flat"
    _concat(flat, m_img, a_img)
    want = data[:8192] + bytes(8192) + data[16384:]
    with ErofsImage.open(flat) as f:
        assert f.read("/g") == want
        assert f.lookup("/g").extents() == [
            (0, 8192, m_blocks + start), (8192, 8192, None), (16384, len(data) - 16384, m_blocks + start + 4)
        ]  # fmt: skip
    with mounted(flat, tmp_path / "mnt") as mnt:
        assert (mnt / "g").read_bytes() == want
    spool.close()


def test_mkfs_blobdev_device_ids(srcdir: Path, tmp_path: Path) -> None:
    """Chunk indexes with device_id 1 (mkfs --blobdev), patched to flatdev as in the reference:
    our reader resolves device ids through mapped_blkaddr like the kernel."""
    meta, blob = tmp_path / "meta", tmp_path / "blob"
    _mkfs(meta, srcdir, "--chunksize=4096", f"--blobdev={blob}")
    mblocks = meta.stat().st_size // 4096
    bblocks = (blob.stat().st_size + 4095) // 4096
    raw = bytearray(meta.read_bytes())
    sb = S.Superblock.unpack(raw, 1024)
    slot = sb.devt_slotoff * 128
    raw[slot : slot + 128] = DeviceSlot(b"blob", bblocks, mblocks).pack()
    struct.pack_into("<I", raw, 1028, S.sb_checksum(raw))
    flat = tmp_path / "flat"
    with open(flat, "wb") as f:
        f.write(raw)
        f.write(blob.read_bytes().ljust(bblocks * 4096, b"\0"))
    with ErofsImage.open(flat) as e, mounted(flat, tmp_path / "mnt") as mnt:
        assert e.devices[0].mapped_blkaddr == mblocks
        disk_tree_equals_reader(mnt, e)


@pytest.mark.parametrize(
    "opts",
    [(), ("-Enoinline_data",), ("--chunksize=4096",), ("--chunksize=16384", "-Eforce-chunk-indexes")],
    ids=["inline-tails", "noinline", "chunk-blockmap", "chunk-indexes"],
)
def test_merged_meta_over_mkfs_layer(srcdir: Path, tmp_path: Path, opts: tuple[str, ...]) -> None:
    """to_tree() of an EROFS-native layer made by others -> merged metadata -> flat mount.
    Default mkfs images pack file tails inline: those tails are copied into the metadata."""
    layer = tmp_path / "L"
    _mkfs(layer, srcdir, "--preserve-mtime", *opts)
    lblocks = layer.stat().st_size // 4096

    def build(m: int) -> Inode:
        with ErofsImage.open(layer) as e:
            return e.to_tree(block_offset=m, inline_tails=True)

    devs = [DeviceSlot(b"layer", lblocks, 0)]
    m_blocks = plan_image(build(0), devices=devs, meta_only=True).blocks
    devs = [DeviceSlot(b"layer", lblocks, m_blocks)]
    m_img = tmp_path / "M"
    _write(build(m_blocks), m_img, devices=devs, meta_only=True)
    fsck(m_img, "/dev/null")
    flat = tmp_path / "flat"
    _concat(flat, m_img, layer)
    with ErofsImage.open(layer) as e, mounted(flat, tmp_path / "mnt") as mnt:
        disk_tree_equals_reader(mnt, e)


def test_classic_multi_device_mount(tmp_path: Path) -> None:
    """Kernels without flatdev (5.16-6.3, e.g. Debian 12's 6.1) mount M with -o device=: unified
    addresses (device_id 0) resolve through the device table's mapped_blkaddr windows."""
    spool = Spool(tmp_path / "spool")
    a_tree = Inode.directory()
    for i, n in enumerate((1, 4096, 4097, 100_000)):
        a_tree.children[b"f%d" % n] = reg(spool.dense(os.urandom(n)))  # type: ignore[index]
    a_img = tmp_path / "A"
    a_blocks = _write(a_tree, a_img)

    def build(m: int) -> Inode:
        with ErofsImage.open(a_img) as a:
            return a.to_tree(block_offset=m)

    m_blocks = plan_image(build(0), devices=[DeviceSlot(b"a", a_blocks, 1)]).blocks
    m_img = tmp_path / "M"
    _write(build(m_blocks), m_img, devices=[DeviceSlot(b"/nonexistent", a_blocks, m_blocks)])
    loops: list[str] = []
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted_ok = False
    try:
        for img in (m_img, a_img):
            loops.append(subprocess.run(["losetup", "--find", "--show", "--read-only", str(img)],
                                        check=True, capture_output=True, text=True).stdout.strip())  # fmt: skip
        subprocess.run(["mount", "-t", "erofs", "-o", f"ro,device={loops[1]}", loops[0], str(mnt)], check=True)
        mounted_ok = True
        for name, node in a_tree.children.items():  # type: ignore[union-attr]
            assert (mnt / os.fsdecode(name)).read_bytes() == spooled(node)
    finally:
        if mounted_ok:
            subprocess.run(["umount", str(mnt)], check=False)
        for lo in loops:
            subprocess.run(["losetup", "-d", lo], check=False)
    spool.close()


def spooled(node: Inode) -> bytes:
    from tests.erofs.helpers import spooled_bytes

    return spooled_bytes(node.data)  # type: ignore[arg-type]


def test_write_at_nonzero_offset(tmp_path: Path) -> None:
    """The image starts at the stream's position (e.g. after a header the caller wrote)."""
    spool = Spool(tmp_path / "spool")
    root = Inode.directory()
    root.children[b"f"] = reg(spool.dense(b"hello" * 1000))  # type: ignore[index]
    p = tmp_path / "img"
    with open(p, "wb") as out:
        out.write(b"H" * 8192)
        info = write_image(root, out)
        assert out.tell() == 8192 + info.size
    raw = p.read_bytes()
    assert raw[:8192] == b"H" * 8192 and len(raw) == 8192 + info.size
    e = ErofsImage(lambda off, n: raw[8192 + off : 8192 + off + n])
    assert e.read("/f") == b"hello" * 1000
    spool.close()


def test_many_devices_flatdev(tmp_path: Path) -> None:
    """40 layers: the device table spills past block 0 and the root inode follows it."""
    spool = Spool(tmp_path / "spool")
    layers = []
    for i in range(40):
        t = Inode.directory()
        t.children[b"f"] = reg(spool.dense(b"layer %d\n" % i * (i * 50 + 1)))  # type: ignore[index]
        p = tmp_path / f"L{i}"
        layers.append((p, _write(t, p), t))

    def build(m: int) -> tuple[Inode, list[DeviceSlot]]:
        root = Inode.directory()
        devs, off = [], m
        for i, (p, blocks, _) in enumerate(layers):
            with ErofsImage.open(p) as e:
                root.children[b"l%02d" % i] = e.to_tree(block_offset=off)  # type: ignore[index]
            devs.append(DeviceSlot(_tag(i), blocks, off))
            off += blocks
        return root, devs

    m_blocks = plan_image(*build(0)[:1], devices=build(0)[1]).blocks
    root, devs = build(m_blocks)
    m_img = tmp_path / "M"
    _write(root, m_img, devices=devs, meta_only=True)
    with ErofsImage.open(m_img) as m:
        assert len(m.devices) == 40 and m.root_nid == (1152 + 40 * 128) // 32
    fsck(m_img, *["/dev/null"] * 40)
    flat = tmp_path / "flat"
    _concat(flat, m_img, *[p for p, _, _ in layers])
    with mounted(flat, tmp_path / "mnt") as mnt:
        for i, (_, _, t) in enumerate(layers):
            assert (mnt / f"l{i:02d}" / "f").read_bytes() == spooled(t.children[b"f"])  # type: ignore[index]
    spool.close()


def test_compressed_image_reads_as_the_kernel_does(tmp_path: Path) -> None:
    """LZ4 images (mkfs.erofs -zlz4hc): metadata AND compressed data read through our reader equal
    the kernel's mount; to_tree describes compressed files by their extents."""
    from bdserver.erofs.tree import CompressedMap

    src = tmp_path / "src"
    make_source_dir(src)
    (src / "compressible").write_bytes(b"a" * 100_000)
    img = tmp_path / "img"
    _mkfs(img, src, "-zlz4hc")
    with ErofsImage.open(img) as e, mounted(img, tmp_path / "mnt") as mnt:
        disk_tree_equals_reader(mnt, e, contents=True)
        info = e.lookup("/compressible")
        assert info.layout in (S.LAYOUT_COMPRESSED_FULL, S.LAYOUT_COMPRESSED_COMPACT)
        assert info.read(50_000, 10) == b"a" * 10
        assert isinstance(e.to_tree(inline_tails=True).children[b"compressible"].data, CompressedMap)


def test_tailed_blockmap(tmp_path: Path) -> None:
    """TailedBlockMap: full blocks on a device (with a hole), the tail copied into M."""
    spool = Spool(tmp_path / "spool")
    data = os.urandom(3 * 4096)
    layer = Inode.directory()
    layer.children[b"f"] = reg(spool.dense(data))  # type: ignore[index]
    a_img = tmp_path / "A"
    a_blocks = _write(layer, a_img)
    with ErofsImage.open(a_img) as a:
        start = a.lookup("/f").extents()[0][2]
    assert start is not None

    def meta(m: int) -> Inode:
        root = Inode.directory()
        root.children[b"t"] = reg(TailedBlockMap(size=4 * 4096 + 100, blocks=[m + start, None, m + start + 2, m + start + 1],
                                                 tail=b"T" * 100))  # fmt: skip
        root.children[b"small"] = reg(TailedBlockMap(size=7, blocks=[], tail=b"tiny!\n\0"))
        root.children[b"aligned"] = reg(TailedBlockMap(size=4096, blocks=[m + start], tail=b""))
        return root

    devs = [DeviceSlot(b"a", a_blocks, 0)]
    m = plan_image(meta(0), devices=devs, meta_only=True).blocks
    devs = [DeviceSlot(b"a", a_blocks, m)]
    m_img = tmp_path / "M"
    _write(meta(m), m_img, devices=devs, meta_only=True)
    fsck(m_img, "/dev/null")
    flat = tmp_path / "flat"
    _concat(flat, m_img, a_img)
    want_t = data[:4096] + bytes(4096) + data[8192:] + data[4096:8192] + b"T" * 100
    with ErofsImage.open(flat) as f, mounted(flat, tmp_path / "mnt") as mnt:
        assert f.read("/t") == want_t == (mnt / "t").read_bytes()
        assert f.read("/small") == b"tiny!\n\0" == (mnt / "small").read_bytes()
        assert f.read("/aligned") == data[:4096] == (mnt / "aligned").read_bytes()
        # the tail block belongs to M itself
        assert f.lookup("/t").extents()[-1][2] < m
    spool.close()
