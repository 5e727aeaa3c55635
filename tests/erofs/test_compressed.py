"""Files EROFS compressed itself (mkfs.erofs -zlz4hc): our reader decodes them as the kernel
does, and merged metadata pointing at their compressed extents inside the layers of a flat
device is read right by this kernel (the issue's kernel check; tests/lab/test_erofs_compressed.py
does the same on Debian's 6.12)."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from bdserver.erofs import structs as S
from bdserver.erofs.reader import ErofsImage
from bdserver.erofs.tree import CompressedMap
from bdserver.erofs.zmap import ZExtent, ZMap, encode_full, read_extents
from bdserver.errors import FormatError
from tests.convert.conftest import fsck, mounted
from tests.fixtures.erofs_layers import MIXED, flat_device, layer_views, mkfs_layer, reference
from tests.fixtures.reftree import compare_trees


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("native")
    views = layer_views(base)
    layers = [mkfs_layer(v, base / f"layer{i}.erofs", variant) for i, (v, variant) in enumerate(zip(views, MIXED))]
    meta, flat = flat_device(layers, base / "flat.img")
    return {"base": base, "views": views, "layers": layers, "meta": meta, "flat": flat, "ref": reference(base)}


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def test_mkfs_layers_really_are_compressed(native: dict) -> None:
    """Guards the fixture: compact and big-pcluster compressed inodes, lz4 with zero padding."""
    layouts = []
    for img in native["layers"][:2]:
        with ErofsImage.open(img) as e:
            assert e.compression.zero_padding
            for _, info in e.walk():
                if info.is_reg:
                    layouts.append(info.layout)
                    if info.layout == S.LAYOUT_COMPRESSED_COMPACT:
                        blocks = {x.blocks for x in e.zmap(info).extents}
                        assert blocks == {1} or e.compression.max_pclusterblks == 16
    assert S.LAYOUT_COMPRESSED_COMPACT in layouts and S.LAYOUT_FLAT_INLINE in layouts


@pytest.mark.parametrize("variant", ["lz4hc", "lz4hc-big"])
def test_reader_decodes_mkfs_compressed_files(native: dict, variant: str, tmp_path: Path) -> None:
    view = layer_views(tmp_path / "v", 1)[0]
    img = mkfs_layer(view, tmp_path / "l.erofs", variant)
    want = _files(view)
    with ErofsImage.open(img) as e:
        got = {p.decode().lstrip("/"): e.read_inode(info) for p, info in e.walk() if info.is_reg}
        assert got == want
        info = e.lookup("text/big.txt")
        assert info.layout == S.LAYOUT_COMPRESSED_COMPACT
        assert e.read_inode(info, 1_234_567, 99_999) == want["text/big.txt"][1_234_567 : 1_234_567 + 99_999]


def test_merged_meta_points_at_compressed_extents_and_the_kernel_reads_them(native: dict) -> None:
    """The kernel check: COMPRESSED_FULL inodes of the merged metadata whose pclusters lie in
    layer regions of ONE flat device (unified block addresses), mounted file-backed (flatdev)."""
    with ErofsImage.open(native["meta"]) as m:
        compressed = [info for _, info in m.walk() if info.layout == S.LAYOUT_COMPRESSED_FULL]
        windows = [(d.mapped_blkaddr, d.mapped_blkaddr + d.blocks) for d in m.devices]
        assert len(compressed) >= 5
        for info in compressed:
            for e in m.zmap(info).extents:
                assert any(a <= e.blkaddr and e.blkaddr + e.blocks <= b for a, b in windows[:2])
    with mounted(native["flat"]) as mnt:
        diffs = compare_trees(mnt, native["ref"])
        big = (mnt / "srv" / "two" / "data").read_bytes()
    assert diffs == [], "\n".join(diffs)
    assert big == (native["ref"] / "srv" / "two" / "data").read_bytes()


def test_merged_meta_is_fsck_clean_and_extracts(native: dict, tmp_path: Path) -> None:
    """erofs-utils 1.5 reads our FULL indexes too (fsck, and extraction from the flat device)."""
    r = fsck(native["meta"], devices=3)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "x"
    r = subprocess.run(["fsck.erofs", *["--device=/dev/null"] * 3, f"--extract={out}", str(native["flat"])],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _files(out) == _files(native["ref"])


def test_our_reader_reads_the_merged_flat_device(native: dict) -> None:
    with ErofsImage.open(native["flat"]) as e:
        got = {p.decode().lstrip("/"): e.read_inode(info) for p, info in e.walk() if info.is_reg}
    assert got == _files(native["ref"])


def test_to_tree_gives_compressed_maps(native: dict) -> None:
    with ErofsImage.open(native["layers"][1]) as e:
        tree = e.to_tree(block_offset=1000)
    d = tree.children[b"srv"].children[b"one"].children[b"data"].data
    assert isinstance(d, CompressedMap) and d.block_offset == 1000 and d.size == 1_000_000
    assert d.zmap.advise & S.Z_ADVISE_BIG_PCLUSTER_1 and max(x.blocks for x in d.zmap.extents) > 1


# -- the index codec on its own --------------------------------------------------------------------


def _roundtrip(zm: ZMap) -> ZMap:
    full = encode_full(zm)
    img = bytes(16) + full  # map header (zeros: lz4, 1-block lclusters) + 8 reserved bytes
    hdr = struct.pack("<IHBB", 0, zm.advise, zm.algorithmtype, 0)
    img = hdr + img[8:]
    return read_extents(lambda o, n: img[o : o + n], 0, zm.size, S.LAYOUT_COMPRESSED_FULL, what="t")


def test_full_indexes_round_trip() -> None:
    big = S.Z_ADVISE_BIG_PCLUSTER_1
    zm = ZMap(70_000, big, 0, (ZExtent(0, 1, 10, 3), ZExtent(20_480, 0, 13, 1), ZExtent(24_576, 1, 14, 1),
                               ZExtent(40_000, 1, 15, 2)))
    assert _roundtrip(zm) == zm
    plain = ZMap(9000, 0, 0, (ZExtent(0, 1, 5, 1), ZExtent(5000, 1, 6, 1)))
    assert _roundtrip(plain) == plain


def test_unencodable_extents_are_refused() -> None:
    with pytest.raises(FormatError, match="one lcluster"):
        encode_full(ZMap(9000, 0, 0, (ZExtent(0, 1, 5, 1), ZExtent(100, 1, 6, 1))))
    with pytest.raises(FormatError, match="big pclusters"):
        encode_full(ZMap(9000, 0, 0, (ZExtent(0, 1, 5, 2),)))


@pytest.mark.parametrize("patch, match", [
    (lambda b: b[:8] + struct.pack("<HHHH", 2, 0, 0, 1) + b[16:], "lcluster 0"),  # a NONHEAD first
    (lambda b: b[:16] + struct.pack("<HHHH", 2, 0, 5, 1) + b[24:], "delta"),  # looks back past its head
    (lambda b: b[:8] + struct.pack("<HHI", 1, 5000, 3) + b[16:], "lcluster 0"),  # clusterofs beyond it
])
def test_inconsistent_full_indexes_are_refused(patch, match) -> None:  # type: ignore[no-untyped-def]
    zm = ZMap(20_000, 0, 0, (ZExtent(0, 1, 10, 1), ZExtent(9000, 1, 11, 1)))
    full = bytes(8) + encode_full(zm)
    bad = struct.pack("<IHBB", 0, 0, 0, 0) + patch(full)
    with pytest.raises(FormatError, match=match):
        read_extents(lambda o, n: bad[o : o + n], 0, zm.size, S.LAYOUT_COMPRESSED_FULL, what="t")


@pytest.mark.parametrize("opts, feature", [(["-Eztailpacking"], "ztailpacking")])
def test_unsupported_compression_features_are_named(tmp_path: Path, opts: list[str], feature: str) -> None:
    view = layer_views(tmp_path / "v", 1)[0]
    img = tmp_path / "l.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", "-zlz4hc", *opts, str(img), str(view)], check=True)
    with ErofsImage.open(img) as e, pytest.raises(FormatError, match=feature):
        e.to_tree(inline_tails=True)


def test_inspect_counts_and_verifies_compressed_files(native: dict) -> None:
    from bdserver.erofs.inspect import summarize, verify

    with ErofsImage.open(native["layers"][1]) as e:
        s = summarize(e)
        assert s["tree"]["layouts"].get("compressed_compact", 0) >= 2
        assert "outside" not in s["tree"]["data_blocks_by_device"]
        v = verify(e)
        assert v["bytes_read"] == s["tree"]["regular_file_bytes"]


# -- the writer's own lz4 (convert --compress lz4) ---------------------------------------------------


def _lz4_tree(tmp_path: Path):  # type: ignore[no-untyped-def]
    import random

    from bdserver.erofs.tree import Inode
    from tests.erofs.helpers import Spool, reg
    from tests.fixtures.erofs_layers import compressible

    spool = Spool(tmp_path / "spool")
    files = {
        b"text": compressible(300_001, 1),  # several 64 KiB extents, a short last one
        b"exact": compressible(128 << 10, 2),  # extents end on the file's end
        b"random": random.Random(3).randbytes(70_000),  # nothing compresses: stays flat
        b"mixed": compressible(65_536, 4) + random.Random(5).randbytes(65_536) + compressible(10_000, 6),
        b"block": compressible(4096, 7),  # one block: never compressed
        b"tail": compressible(4097, 8),  # a compressed extent, then a raw block of 1 byte
    }
    root = Inode.directory()
    for name, data in files.items():
        root.children[name] = reg(spool.dense(data))
    root.children[b"hard"] = root.children[b"text"]  # a hardlink: compressed once
    sparse = spool.sparse(1 << 20, [(0, compressible(8192, 9)), (900_000, b"end")])
    root.children[b"sparse"] = reg(sparse)  # holes stay holes (chunk-based)
    return root, files, spool


def test_writer_lz4_is_deterministic_mountable_and_fsck_clean(tmp_path: Path) -> None:
    from bdserver.erofs.writer import write_image

    root, files, spool = _lz4_tree(tmp_path)
    outs = []
    for k in range(2):
        p = tmp_path / f"img{k}"
        with open(p, "wb") as f:
            write_image(root, f, compress="lz4", tmpdir=str(tmp_path))
        outs.append(p)
    plain = tmp_path / "plain"
    with open(plain, "wb") as f:
        write_image(root, f)
    spool.close()
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert outs[0].stat().st_size < plain.stat().st_size
    r = fsck(outs[0])
    assert r.returncode == 0, r.stderr
    with ErofsImage.open(outs[0]) as e:
        layouts = {p.decode().lstrip("/"): i.layout for p, i in e.walk() if i.is_reg}
        assert e.zmap(e.lookup("text")).blocks < 300_001 // 4096
        assert {x.head for x in e.zmap(e.lookup("mixed")).extents} == {S.LCLUSTER_PLAIN, S.LCLUSTER_HEAD1}
    assert layouts["text"] == layouts["exact"] == layouts["mixed"] == layouts["tail"] == S.LAYOUT_COMPRESSED_FULL
    assert layouts["random"] == S.LAYOUT_FLAT_PLAIN and layouts["block"] == S.LAYOUT_FLAT_PLAIN
    assert layouts["sparse"] == S.LAYOUT_CHUNK_BASED
    with mounted(outs[0]) as mnt:
        for name, data in files.items():
            assert (mnt / name.decode()).read_bytes() == data, name
        assert os.stat(mnt / "hard").st_ino == os.stat(mnt / "text").st_ino
        with open(mnt / "sparse", "rb") as f:
            f.seek(900_000)
            assert f.read(3) == b"end"
