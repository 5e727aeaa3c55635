"""Write trees with every edge case; check them with fsck.erofs, our reader and the kernel."""

from __future__ import annotations

import os
import random
import stat
import struct
from pathlib import Path

import pytest

from bdserver.erofs import structs as S
from bdserver.erofs.reader import ErofsImage
from bdserver.erofs.tree import OVERLAY_OPAQUE, OVERLAY_ORIGIN, Inode, whiteout
from bdserver.erofs.writer import plan_image, write_image
from tests.erofs.helpers import Spool, assert_mount_matches, assert_reader_matches, fsck, mounted, reg, symlink

BUILD_TIME = 1_700_000_000
BUILD_NSEC = 123_456_789

# security.capability v2: cap_net_bind_service permitted + effective
CAP_V2 = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
# system.posix_acl_access v2: user::rw- user:1000:r-- group::r-- mask::r-- other::r--
ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, uid)
    for tag, perm, uid in [(1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)]
)
SIZES = [0, 1, 2, 4095, 4096, 4097, 8191, 8192, 8193, 12289, 65536, 65537, (1 << 20) + 3]


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def edge_tree(spool: Spool) -> Inode:
    """Every file type and metadata corner we care about, mostly with compact inodes."""
    t = dict(mtime=BUILD_TIME, mtime_nsec=BUILD_NSEC)
    root = Inode.directory(0o755, **t)
    kids = root.children
    assert kids is not None
    sizes = Inode.directory(0o750, uid=1000, gid=1000, **t)
    kids[b"sizes"] = sizes
    for i, n in enumerate(SIZES):
        sizes.children[b"f%07d" % n] = reg(spool.dense(_data(n, i)), **t)  # type: ignore[index]
    # names that sort around "." and "..", long and odd names
    names = Inode.directory(**t)
    kids[b"names"] = names
    for nm in [b"#hash", b"-dash", b"..x", b".hidden", b"Z", b"a", b"\xff\xfe", "üñí".encode(), b"n" * 255, b" sp"]:
        names.children[nm] = reg(spool.dense(nm), **t)  # type: ignore[index]
    # owners, modes, times (extended inodes)
    meta = Inode.directory(0o1777, **t)
    kids[b"meta"] = meta
    m = meta.children
    assert m is not None
    m[b"suid"] = reg(spool.dense(b"x"), mode=0o4755, **t)
    m[b"sgid"] = reg(spool.dense(b"y"), mode=0o2711, **t)
    m[b"bigids"] = reg(spool.dense(b"z"), uid=70000, gid=4_000_000_000, **t)
    m[b"mtime"] = reg(spool.dense(b"t"), mtime=1_234_567_890, mtime_nsec=999_999_999)
    m[b"old"] = reg(None, mtime=-86_400, mtime_nsec=5)
    m[b"nomode"] = reg(None, mode=0, **t)
    m[b"empty"] = reg(None, **t)
    m[b"fifo"] = Inode(mode=stat.S_IFIFO | 0o600, **t)
    m[b"sock"] = Inode(mode=stat.S_IFSOCK | 0o755, uid=5, **t)
    m[b"null"] = Inode(mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3), **t)
    m[b"sda1"] = Inode(mode=stat.S_IFBLK | 0o660, rdev=os.makedev(8, 1), gid=6, **t)
    m[b"bigdev"] = Inode(mode=stat.S_IFCHR | 0o600, rdev=os.makedev(4000, 1_000_000), **t)
    m[b"wh"] = whiteout(mtime=BUILD_TIME)
    m[b"wh"].mtime_nsec = BUILD_NSEC
    # xattrs
    xa = Inode.directory(xattrs={OVERLAY_OPAQUE: b"y", OVERLAY_ORIGIN: b""}, **t)
    kids[b"xattrs"] = xa
    x = xa.children
    assert x is not None
    for i in range(20):  # repeated capability -> shared xattr
        x[b"cap%02d" % i] = reg(spool.dense(b"bin%d" % i), mode=0o755, xattrs={"security.capability": CAP_V2}, **t)
    x[b"acl"] = reg(spool.dense(b"acl"), xattrs={"system.posix_acl_access": ACL}, **t)
    dacl = Inode.directory(xattrs={"system.posix_acl_default": ACL, "system.posix_acl_access": ACL}, **t)
    x[b"acldir"] = dacl
    x[b"many"] = reg(None, xattrs={f"user.k{i:03d}": b"v" * i for i in range(60)}, **t)
    x[b"bigval"] = reg(spool.dense(b"b"), xattrs={"user.big": _data(3000, 7), "trusted.t": b"1"}, **t)
    # xattr bodies spanning several blocks, one value at the 64 KiB limit
    x[b"hugexattrs"] = reg(spool.dense(b"h"), xattrs={f"user.h{i}": _data(20_000, 100 + i) for i in range(4)}, **t)
    x[b"maxval"] = Inode.directory(xattrs={"trusted.max": _data(65535, 99)}, **t)
    x[b"lnk"] = symlink(b"cap00", xattrs={"trusted.x": b"sym", "security.selinux": b"sys_t\0"}, **t)
    # symlinks of every length class
    ln = Inode.directory(**t)
    kids[b"links"] = ln
    for n in (1, 60, 2000, 3000, 4000, 4095):
        ln.children[b"l%04d" % n] = symlink(b"/" + b"s" * (n - 1), **t)  # type: ignore[index]
    ln.children[b"rel"] = symlink(b"../sizes/f0000001", **t)  # type: ignore[index]
    # hardlinks across directories
    hl = reg(spool.dense(b"shared inode\n"), **t)
    hd = Inode.directory(**t)
    kids[b"hard"] = hd
    hd.children[b"one"] = hl  # type: ignore[index]
    hd.children[b"two"] = hl  # type: ignore[index]
    kids[b"three"] = hl
    hdev = Inode(mode=stat.S_IFCHR | 0o600, rdev=os.makedev(5, 5), **t)
    hd.children[b"dev1"] = hdev  # type: ignore[index]
    hd.children[b"dev2"] = hdev  # type: ignore[index]
    # empty and deep directories
    kids[b"emptydir"] = Inode.directory(0o700, **t)
    d = root
    for i in range(30):
        nd = Inode.directory(**t)
        d.children[b"d%d" % i] = nd  # type: ignore[index]
        d = nd
    d.children[b"leaf"] = reg(spool.dense(b"deep"), **t)  # type: ignore[index]
    # a directory whose entries fill exactly one block (FLAT_PLAIN, no tail)
    exact = Inode.directory(**t)
    kids[b"exactblock"] = exact
    for i in range(15):
        exact.children[b"%03d" % i + b"e" * 252] = reg(None, **t)  # type: ignore[index]
    exact.children[b"z" * 52] = reg(None, **t)  # type: ignore[index]
    # directories of several blocks with tails of many sizes
    for n in (100, 300, 1000):
        big = Inode.directory(**t)
        kids[b"dir%d" % n] = big
        for i in range(n):
            big.children[b"entry-%06d" % i] = reg(None, **t)  # type: ignore[index]
    # sparse files: small with holes, and one bigger than 4 GiB
    kids[b"sparse"] = reg(
        spool.sparse((1 << 20) + 5, [(0, b"head"), (300_000, _data(10_000, 3)), ((1 << 20) + 1, b"tail")]), **t
    )
    kids[b"holeonly"] = reg(spool.sparse(10 << 20, []), **t)
    kids[b"huge"] = reg(
        spool.sparse(
            (5 << 30) + 123,
            [(0, b"start"), ((1 << 32) - 2, b"across4G"), ((5 << 30) + 100, _data(23, 9))],
        )
    )
    return root


def _write(root: Inode, path: Path, **kw: object) -> None:
    with open(path, "wb") as out:
        info = write_image(root, out, build_time=BUILD_TIME, build_time_nsec=BUILD_NSEC, **kw)  # type: ignore[arg-type]
    assert path.stat().st_size == info.size == info.blocks * 4096
    assert plan_image(root, build_time=BUILD_TIME, build_time_nsec=BUILD_NSEC) == info


@pytest.fixture(scope="module")
def edge_image(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("edge")
    spool = Spool(tmp / "spool")
    root = edge_tree(spool)
    img = tmp / "edge.erofs"
    _write(root, img)
    yield root, img, tmp
    spool.close()


def test_fsck_accepts(edge_image) -> None:
    _, img, _ = edge_image
    fsck(img)


def test_image_is_small_despite_huge_sparse_file(edge_image) -> None:
    _, img, _ = edge_image
    assert img.stat().st_size < 8 << 20
    assert os.stat(img).st_blocks * 512 < 8 << 20


def test_reader_roundtrip(edge_image) -> None:
    root, img, _ = edge_image
    with ErofsImage.open(img) as e:
        assert_reader_matches(root, e)
        assert e.root_nid <= 0xFFFF
        assert e.sb.feature_incompat == S.INCOMPAT_CHUNKED_FILE
        assert e.sb.feature_compat == S.COMPAT_SB_CHKSUM | S.COMPAT_MTIME
        # regular files are never tail-inlined: every byte is block-addressable
        for path, info in e.walk():
            if info.is_reg:
                assert info.layout in (S.LAYOUT_FLAT_PLAIN, S.LAYOUT_CHUNK_BASED), path
                info.extents()
        huge = e.lookup("/huge")
        assert huge.extended and huge.layout == S.LAYOUT_CHUNK_BASED
        assert any(a is None for _, _, a in huge.extents())
        assert e.lookup("/sizes/f0000001").extended is False  # mtime == build time -> compact
        assert e.lookup("/meta/mtime").extended is True


@pytest.mark.parametrize("how", ["file", "loop"])
def test_kernel_roundtrip(edge_image, how: str) -> None:
    root, img, tmp = edge_image
    with mounted(img, tmp / f"mnt-{how}", how) as mnt:
        assert_mount_matches(root, mnt)


def test_deterministic(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    _write(edge_tree(spool), tmp_path / "a")
    _write(edge_tree(spool), tmp_path / "b")  # same tree built again, data at other spool offsets
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    spool.close()


def test_write_to_bytesio_matches_file(tmp_path: Path) -> None:
    import io

    spool = Spool(tmp_path / "spool")
    root = Inode.directory()
    for n in (0, 5, 5000):
        root.children[b"f%d" % n] = reg(spool.dense(_data(n, n)))  # type: ignore[index]
    root.children[b"s"] = reg(spool.sparse(100_000, [(70_000, b"abc")]))  # type: ignore[index]
    buf = io.BytesIO()
    write_image(root, buf)
    _write_plain = tmp_path / "img"
    with open(_write_plain, "wb") as out:
        write_image(root, out)
    assert buf.getvalue() == _write_plain.read_bytes()
    spool.close()


def test_ten_thousand_entries(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    root = Inode.directory()
    big = Inode.directory()
    root.children[b"big"] = big  # type: ignore[index]
    for i in range(10_000):
        name = b"file-with-a-longish-name-%05d" % i
        big.children[name] = reg(spool.dense(b"%d" % i) if i % 10 == 0 else None)  # type: ignore[index]
    for i in range(50):
        big.children[b"sub%02d" % i] = Inode.directory()  # type: ignore[index]
    img = tmp_path / "img"
    _write(root, img)
    fsck(img)
    with ErofsImage.open(img) as e:
        assert_reader_matches(root, e)
        assert e.lookup(b"/big/file-with-a-longish-name-09990").read() == b"9990"
    with mounted(img, tmp_path / "mnt") as mnt:
        assert_mount_matches(root, mnt)
        assert len(os.listdir(mnt / "big")) == 10_050
    spool.close()


def test_shared_xattrs_are_deduplicated(edge_image) -> None:
    root, img, _ = edge_image
    with ErofsImage.open(img) as e:
        assert e.sb.xattr_blkaddr != 0
        cap = e.lookup("/xattrs/cap07")
        assert cap.xattr_isize == 12 + 4  # header + one shared id, no inline entry
        assert cap.xattrs == {"security.capability": CAP_V2}


@pytest.mark.parametrize("kind", ["bytesio", "spooled-in-memory", "spooled-on-disk"])
def test_non_file_sources(tmp_path: Path, kind: str) -> None:
    """Spool data that is not a plain file (no fileno, or a SpooledTemporaryFile before and
    after it rolls over to disk) is copied correctly."""
    import io
    import tempfile

    data = _data(3 * 4096 + 5, 1)
    if kind == "bytesio":
        src: io.IOBase = io.BytesIO()
    else:
        src = tempfile.SpooledTemporaryFile(max_size=1 << 30 if kind == "spooled-in-memory" else 16)  # type: ignore
    src.write(b"junk" + data)
    from bdserver.erofs.tree import Segment, SpooledData

    root = Inode.directory()
    root.children[b"f"] = reg(SpooledData(src, len(data), [Segment(0, len(data), 4)]))  # type: ignore[index]
    root.children[b"s"] = reg(SpooledData(src, 1 << 20, [Segment(500_000, 10, 4)]))  # type: ignore[index]
    p = tmp_path / "img"
    with open(p, "wb") as out:
        write_image(root, out)
    with ErofsImage.open(p) as e:
        assert e.read("/f") == data
        assert e.read("/s", 500_000, 10) == data[:10]
    with mounted(p, tmp_path / "mnt") as mnt:
        assert (mnt / "f").read_bytes() == data


@pytest.mark.slow
def test_two_gib_layer_streams(tmp_path: Path) -> None:
    """A 2 GiB file is streamed: the writer's own peak memory (VmHWM of a child that does nothing
    but write the image; the input is made by this process, a MiB at a time) stays far below the
    data size."""
    import subprocess
    import sys

    chunk = os.urandom(1 << 20)
    with open(tmp_path / "spool", "wb") as f:  # 2 GiB of data (not sparse: copied for real)
        for _ in range(2048):
            f.write(chunk)
    script = f"""
import stat
from bdserver.erofs.tree import Inode, SpooledData
from bdserver.erofs.writer import write_image
src = open({str(tmp_path / 'spool')!r}, 'rb')
root = Inode.directory()
root.children[b'big'] = Inode(mode=stat.S_IFREG | 0o644, data=SpooledData.dense(src, 0, 2 << 30))
with open({str(tmp_path / 'img')!r}, 'wb') as out:
    info = write_image(root, out)
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]
print(info.size, hwm)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    size, hwm_kib = map(int, r.stdout.split())
    assert size == (2 << 30) + 4096
    assert hwm_kib < 64 * 1024, f"the writer peaked at {hwm_kib // 1024} MiB while writing 2 GiB"
    (tmp_path / "spool").unlink()
    with ErofsImage.open(tmp_path / "img") as e:
        info = e.lookup("/big")
        assert info.extents() == [(0, 2 << 30, 1)]
        assert e.read("/big", (2 << 30) - 4, 4) == e.read("/big", (1 << 20) - 4, 4)


def test_deterministic_across_processes(tmp_path: Path) -> None:
    """Same tree in two interpreters with different hash seeds -> same bytes."""
    import hashlib
    import subprocess
    import sys

    script = """
import sys, hashlib, io
from pathlib import Path
from tests.erofs.helpers import Spool
from tests.erofs.test_roundtrip import edge_tree, BUILD_TIME, BUILD_NSEC
from bdserver.erofs.writer import write_image
spool = Spool(Path(sys.argv[1]))
buf = io.BytesIO()
write_image(edge_tree(spool), buf, build_time=BUILD_TIME, build_time_nsec=BUILD_NSEC)
print(hashlib.sha256(buf.getvalue()).hexdigest())
"""
    cwd = Path(__file__).resolve().parents[2]
    digests = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        r = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"spool{seed}")], env=env, cwd=cwd,
                           capture_output=True, text=True, check=True)  # fmt: skip
        digests.add(r.stdout.strip())
    spool = Spool(tmp_path / "spool3")
    p = tmp_path / "img"
    _write(edge_tree(spool), p)
    digests.add(hashlib.sha256(p.read_bytes()).hexdigest())
    assert len(digests) == 1
    spool.close()


def test_output_on_another_filesystem(tmp_path: Path) -> None:
    """Spool on the test filesystem, image on tmpfs: copy_file_range may refuse (EXDEV); the
    bytes must be the same either way."""
    import shutil
    import tempfile

    if not os.path.isdir("/dev/shm"):
        pytest.fail("no /dev/shm")
    spool = Spool(tmp_path / "spool")
    root = edge_tree(spool)
    shm = Path(tempfile.mkdtemp(prefix="erofs-test-", dir="/dev/shm"))
    try:
        _write(root, shm / "img")
        _write(root, tmp_path / "img")
        assert (shm / "img").read_bytes() == (tmp_path / "img").read_bytes()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        spool.close()
