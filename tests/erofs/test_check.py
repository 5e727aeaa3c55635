"""erofs/check.py: the images bdserver's writer and mkfs.erofs make pass; one-field corruptions of
a real merged metadata image are each refused with a message naming the inode and the field."""

from __future__ import annotations

import random
import struct
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest

from bdserver.convert.image import convert_tar_layers
from bdserver.erofs import structs as S
from bdserver.erofs.check import DeviceGeometry, ExpectedSlot, check_image
from bdserver.erofs.reader import ErofsImage
from bdserver.erofs.writer import write_image
from bdserver.errors import FormatError
from tests.erofs.helpers import Spool
from tests.fixtures.layers import debian_layers, edge_layers, sparse_pax01
from tests.fixtures.tarwriter import TarWriter

D, F = b"5", b"0"


def geometry_of(dev) -> DeviceGeometry:  # type: ignore[no-untyped-def]
    """What vdev passes for a device built from these layers: the plan's slots."""
    return DeviceGeometry(dev.meta.blocks, tuple(ExpectedSlot(s.mapped_blkaddr, s.blocks) for s in dev.meta.devices),
                          dev.meta.device_blocks)


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, DeviceGeometry]:
    """Merged metadata over two layers: directories, a big file, a sparse file, a symlink, xattrs."""
    tmp = tmp_path_factory.mktemp("merged")
    w = TarWriter()
    w.add("a/", D)
    w.add("a/b/", D)
    w.add("a/b/c/", D)
    w.add("a/big", F, random.Random(1).randbytes(40_000))
    w.add("a/link", b"2", link="big")
    w.add("x", F, b"xattrs", pax={"SCHILY.xattr.user.one": b"1", "SCHILY.xattr.user.two": b"2"})
    w.raw(sparse_pax01(b"sparse", 1 << 24, [(0, 4096), (1 << 23, 4096)]))
    (tmp / "1.tar").write_bytes(w.close())
    w = TarWriter()
    w.add("top", F, random.Random(2).randbytes(50_000))
    (tmp / "2.tar").write_bytes(w.close())
    dev = convert_tar_layers([lambda p=p: open(p, "rb") for p in (tmp / "1.tar", tmp / "2.tar")], tmp / "out")
    return dev.meta_path.read_bytes(), geometry_of(dev)


def _img(raw: bytes | bytearray) -> ErofsImage:
    data = bytes(raw)
    return ErofsImage(lambda off, n: data[off : off + n])


def _fix_csum(raw: bytearray) -> None:
    struct.pack_into("<I", raw, 1028, S.sb_checksum(raw))


def _chunks(img: ErofsImage, path: str) -> tuple[int, list[int]]:
    """(byte offset of the chunk index array, indexes of the present chunks) of a file."""
    info = img.lookup(path)
    assert info.layout == S.LAYOUT_CHUNK_BASED
    start = (info.data_off + 7) & ~7
    _, table = img._chunk_table(info)
    return start, [i for i, (_, b) in enumerate(table) if b is not None]


def _set_chunk(raw: bytearray, img: ErofsImage, path: str, which: int, blk: int, dev: int = 0) -> None:
    start, present = _chunks(img, path)
    struct.pack_into("<HHI", raw, start + 8 * present[which], 0, dev, blk)


def _dirent_off(img: ErofsImage, dir_path: str, name: bytes) -> int:
    d = img.lookup(dir_path)
    assert d.layout == S.LAYOUT_FLAT_INLINE and d.size < 4096
    names = [n for n, _, _ in img.listdir(d)]
    return d.data_off + 12 * names.index(name)


def _inode_off(img: ErofsImage, path: str) -> int:
    return img.sb.meta_blkaddr * 4096 + (img.lookup(path).nid << 5)


Corruption = Callable[[bytearray, ErofsImage, DeviceGeometry], DeviceGeometry | None]


def _slot_end(geo: DeviceGeometry, k: int) -> int:
    return geo.slots[k].mapped_blkaddr + geo.slots[k].blocks


CORRUPTIONS: dict[str, tuple[Corruption, str]] = {
    "block_past_the_device": (
        lambda raw, img, geo: _set_chunk(raw, img, "/a/big", 0, _slot_end(geo, 1) + 10),
        r"inode \d+ \(/a/big\): chunk 0: blocks \[\d+, \d+\) are not inside one region"),
    "chunk_in_another_layers_slot": (
        lambda raw, img, geo: _set_chunk(raw, img, "/sparse", 1, geo.slots[1].mapped_blkaddr),
        r"inode \d+ \(/sparse\): chunk \d+: .* lie in layer 2, the inode's other data in layer 1"),
    "chunk_across_two_layers": (
        lambda raw, img, geo: _set_chunk(raw, img, "/a/big", 0, _slot_end(geo, 0) - 2),
        r"\(/a/big\): chunk 0: .* not inside one region"),
    "device_id_past_the_table": (
        lambda raw, img, geo: _set_chunk(raw, img, "/a/big", 0, 0, dev=3),
        r"\(/a/big\): chunk 0: device_id 3, the image has 2 devices"),
    "device_local_block_past_its_slot": (
        lambda raw, img, geo: _set_chunk(raw, img, "/a/big", 0, geo.slots[0].blocks - 1, dev=1),
        r"\(/a/big\): chunk 0: device 1 blocks \[\d+, \d+\) lie outside its \d+ blocks"),
    "dirent_nameoff_out_of_bounds": (
        lambda raw, img, geo: struct.pack_into("<H", raw, _dirent_off(img, "/a", b"b") + 8, 4000),
        r"inode \d+ \(/a\): directory block 0: dirent \d+ name at \[\d+, 4000\) is out of order or out of bounds"),
    "directory_loop": (
        lambda raw, img, geo: struct.pack_into("<Q", raw, _dirent_off(img, "/a/b", b"c"), img.lookup("/a").nid),
        r"\(/a/b\): directory block 0: inode \d+ \(/a/b/c\) is a directory reached twice"),
    "dirent_nid_outside_the_image": (
        lambda raw, img, geo: struct.pack_into("<Q", raw, _dirent_off(img, "/a", b"big"), 1 << 40),
        r"inode 1099511627776 \(/a/big\): nid 1099511627776 lies outside the image"),
    "dot_names_another_directory": (
        lambda raw, img, geo: struct.pack_into("<Q", raw, _dirent_off(img, "/a/b", b"."), img.lookup("/a").nid),
        r"\(/a/b\): directory block 0: '\.' names nid \d+, not directory \d+"),
    "file_type_mismatch": (
        lambda raw, img, geo: struct.pack_into("<B", raw, _dirent_off(img, "/a", b"big") + 10, S.FT_DIR),
        r"dirent b'big' file_type 2 does not match inode \d+ \(/a/big\)"),
    "giant_directory_i_size": (
        lambda raw, img, geo: struct.pack_into("<I", raw, _inode_off(img, "/a") + 8, 0xFFFF0000),
        r"inode \d+ \(/a\): directory i_size 4294901760 is empty or larger than the image"),
    "giant_file_i_size": (
        lambda raw, img, geo: struct.pack_into("<Q" if img.lookup("/sparse").extended else "<I", raw,
                                               _inode_off(img, "/sparse") + 8, (1 << 62) if
                                               img.lookup("/sparse").extended else 0xFFFFFFFF),
        r"\(/sparse\): i_size \d+ needs \d+ chunk indexes, more than the image holds"),
    "symlink_size": (
        lambda raw, img, geo: struct.pack_into("<I", raw, _inode_off(img, "/a/link") + 8, 0),
        r"\(/a/link\): symlink i_size 0 is not 1..4095"),
    "xattr_shared_count": (
        lambda raw, img, geo: struct.pack_into("<B", raw, _inode_off(img, "/x") + (64 if img.lookup("/x").extended
                                                                                   else 32) + 4, 200),
        r"\(/x\): xattr h_shared_count 200 overflows"),
    "i_format_unknown_bits": (
        lambda raw, img, geo: struct.pack_into("<H", raw, _inode_off(img, "/top"),
                                               struct.unpack_from("<H", raw, _inode_off(img, "/top"))[0] | 0x10),
        r"\(/top\): i_format 0x\w+ has unknown bits"),
    "compressed_layout": (
        lambda raw, img, geo: struct.pack_into("<H", raw, _inode_off(img, "/top"),
                                               (struct.unpack_from("<H", raw, _inode_off(img, "/top"))[0] & 1) | 3 << 1),
        r"inode \d+ \(/top\): "),  # garbage read as lcluster indexes: refused, whatever it says
    "device_table_disagrees_with_the_plan": (
        lambda raw, img, geo: struct.pack_into("<I", raw, img.sb.devt_slotoff * 128 + 128 + 64,
                                               geo.slots[1].blocks + 1),
        r"device 2: blocks \d+ at mapped_blkaddr \d+, the layer plan has \d+ at \d+"),
    "device_table_misses_a_layer": (
        lambda raw, img, geo: replace(geo, slots=geo.slots[:1]),
        r"device table has 2 devices, the layer plan has 1"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_one_field_corruption_is_refused(merged: tuple[bytes, DeviceGeometry], name: str) -> None:
    meta, geo = merged
    check_image(meta, geo)  # the original passes
    corrupt, pattern = CORRUPTIONS[name]
    raw = bytearray(meta)
    geo2 = corrupt(raw, _img(meta), geo) or geo
    _fix_csum(raw)  # so that the field itself, not the checksum, is what is refused
    with pytest.raises(FormatError, match=pattern):
        check_image(bytes(raw), geo2, name="merged")


def test_bad_checksum(merged: tuple[bytes, DeviceGeometry]) -> None:
    meta, geo = merged
    raw = bytearray(meta)
    raw[1500] ^= 1
    with pytest.raises(FormatError, match=r"superblock checksum 0x\w+ does not match"):
        check_image(bytes(raw), geo)


def test_read_at_and_bytes_agree(merged: tuple[bytes, DeviceGeometry]) -> None:
    meta, geo = merged
    assert check_image(lambda off, n: meta[off : off + n], geo) == check_image(meta, geo)


def test_random_corruption_only_raises_formaterror(merged: tuple[bytes, DeviceGeometry]) -> None:
    meta, geo = merged
    end = ErofsImage(lambda o, n: meta[o : o + n]).sb.blocks * 4096
    rng = random.Random(7)
    refused = 0
    for _ in range(500):
        raw = bytearray(meta)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(1024 + 8, end)] = rng.randrange(256)
        _fix_csum(raw)
        try:
            check_image(bytes(raw), geo)
        except FormatError:
            refused += 1
    assert refused > 100


# --- what must pass ----------------------------------------------------------------------


def test_writer_edge_image_passes(tmp_path: Path) -> None:
    from tests.erofs.test_roundtrip import BUILD_NSEC, BUILD_TIME, edge_tree

    spool = Spool(tmp_path / "spool")
    img = tmp_path / "edge.erofs"
    with open(img, "wb") as out:
        write_image(edge_tree(spool), out, build_time=BUILD_TIME, build_time_nsec=BUILD_NSEC)
    spool.close()
    r = check_image(img.read_bytes())
    assert r.inodes > 150 and r.chunk_indexes > 0


@pytest.mark.parametrize("layers", ["edge", "debian"])
def test_converted_merged_metadata_passes(layers: str, tmp_path: Path) -> None:
    tars = edge_layers() if layers == "edge" else debian_layers()
    dev = convert_tar_layers([lambda t=t: open(t, "rb") for t in tars], tmp_path / "out")
    r = check_image(dev.meta_path.read_bytes(), geometry_of(dev))
    assert r.inodes > 1000
    for p in dev.layer_paths:  # and every layer image on its own
        check_image(p.read_bytes())


MKFS = {
    "inline": [],
    "noinline": ["-Enoinline_data"],
    "chunk-blockmap": ["--chunksize=8192"],
    "chunk-indexes": ["--chunksize=4096", "-Eforce-chunk-indexes"],
    "lz4hc": ["-zlz4hc"],
    "lz4hc-big": ["-zlz4hc", "-C65536"],
}


@pytest.fixture(scope="module")
def mkfs_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.rootfs import debootstrap_rootfs

    return debootstrap_rootfs() / "etc"


@pytest.mark.parametrize("kind", sorted(MKFS))
def test_mkfs_images_pass(kind: str, mkfs_source: Path, tmp_path: Path) -> None:
    img = tmp_path / "img"
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", *MKFS[kind], str(img), str(mkfs_source)], check=True)
    r = check_image(img.read_bytes())
    assert r.inodes > 100
    assert (r.chunk_indexes > 0) == kind.startswith("chunk")
    assert (r.compressed_extents > 0) == kind.startswith("lz4")


def test_ztailpacking_is_refused_by_name(mkfs_source: Path, tmp_path: Path) -> None:
    img = tmp_path / "img"
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", "-zlz4hc", "-Eztailpacking", str(img), str(mkfs_source)],
                   check=True)
    with pytest.raises(FormatError, match=r"inode \d+ \(/.*\): ztailpacking .* is not supported"):
        check_image(img.read_bytes())


def _compressed_inode(img: ErofsImage) -> tuple[str, object]:
    """The largest compact-indexed file of an image."""
    best = max(((p, i) for p, i in img.walk() if i.layout == S.LAYOUT_COMPRESSED_COMPACT), key=lambda x: x[1].size)
    return best[0].decode(), best[1]


@pytest.fixture(scope="module")
def lz4_layer(mkfs_source: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    img = tmp_path_factory.mktemp("lz4") / "img"
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", "-zlz4hc", "-C16384", str(img), str(mkfs_source)], check=True)
    return img.read_bytes()


def _pack_base(raw: bytearray, img: ErofsImage, info, value: int) -> None:  # type: ignore[no-untyped-def]
    """Set the block address of the compact pack holding the file's first lcluster."""
    ebase = S.zmap_header_pos(info.data_off) + 8
    initial = ((32 - ebase % 32) // 4) & 7
    packbytes = 8 if initial else 32
    struct.pack_into("<I", raw, ebase + packbytes - 4, value)


def test_compressed_extent_outside_the_image_is_refused(lz4_layer: bytes) -> None:
    raw = bytearray(lz4_layer)
    img = _img(raw)
    path, info = _compressed_inode(img)
    _pack_base(raw, img, info, len(raw) // 4096 + 5)
    with pytest.raises(FormatError, match=rf"\({path}\): pcluster of the extent at byte 0: blocks \[\d+, \d+\) are "
                                          "not inside one region"):
        check_image(bytes(raw))


def test_pcluster_bigger_than_the_superblock_allows_is_refused(lz4_layer: bytes) -> None:
    raw = bytearray(lz4_layer)
    img = _img(raw)
    assert img.compression.max_pclusterblks == 4
    struct.pack_into("<H", raw, 1024 + 128 + 4, 1)  # the lz4 record's max_pclusterblks
    _fix_csum(raw)
    with pytest.raises(FormatError, match=r"a pcluster of [234] blocks, the superblock allows 1"):
        check_image(bytes(raw))
