"""Tar parsing and per-layer tree semantics (no kernel needed)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import struct
from pathlib import Path

import pytest
import zstandard

from bdserver.convert.layer import convert_layer
from bdserver.convert.tar import LayerTree, read_layer
from bdserver.convert.tarheader import acl_text_to_xattr, parse_pax_time
from bdserver.erofs.tree import OVERLAY_OPAQUE, OVERLAY_ORIGIN, Inode, SpooledData, is_whiteout
from bdserver.errors import FormatError
from tests.fixtures.layers import hostile_tars
from tests.fixtures.tarwriter import TarWriter, header, pad

D, F, L, S = b"5", b"0", b"1", b"2"


def tree(raw: bytes) -> LayerTree:
    return read_layer(io.BytesIO(raw))


def get(t: LayerTree | Inode, path: str) -> Inode:
    node = t.root if isinstance(t, LayerTree) else t
    for c in path.strip("/").split("/"):
        assert node.children is not None, path
        node = node.children[c.encode()]
    return node


def names(node: Inode) -> list[str]:
    assert node.children is not None
    return sorted(n.decode() for n in node.children)


def content(t: LayerTree, path: str) -> bytes:
    d = get(t, path).data
    if d is None:
        return b""
    assert isinstance(d, SpooledData)
    out = bytearray(d.size)
    for s in d.segments:
        d.source.seek(s.source_offset)
        out[s.file_offset : s.file_offset + s.length] = d.source.read(s.length)
    return bytes(out)


# ---------------------------------------------------------------- hostile input

@pytest.mark.parametrize("name", sorted(hostile_tars()))
def test_hostile_is_format_error_and_writes_nothing_outside(name: str, tmp_path: Path, monkeypatch) -> None:
    raw = hostile_tars()[name]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = set(os.listdir("/tmp"))
    out = tmp_path / "out.erofs"
    with pytest.raises(FormatError) as ei:
        with open(out, "wb") as o:
            convert_layer(io.BytesIO(raw), o, tmpdir=str(work))
    assert str(ei.value)  # a message a user can act on
    assert os.listdir(work) == []  # the spool is anonymous and gone
    assert not os.path.lexists("/tmp/bdserver-evil")
    assert {n for n in set(os.listdir("/tmp")) - before if "evil" in n} == set()
    assert ei.value.exit_code == 3


# ---------------------------------------------------------------- formats

def _sample(fmt: str = "pax") -> bytes:
    w = TarWriter(fmt=fmt)
    w.add("./", D, mode=0o755, mtime=5)
    w.add("a/", D, mtime=6)
    w.add("a/f", F, b"hello", mtime=7)
    w.add("a/" + "x" * 120 + "/y", F, b"long", mtime=8)
    w.add("a/l", S, link="t" * (100 if fmt == "ustar" else 200), mode=0o777)
    return w.close()


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
def test_formats_give_the_same_tree(fmt: str) -> None:
    t = tree(_sample(fmt))
    assert names(t.root) == ["a"]
    assert content(t, "a/f") == b"hello"
    assert content(t, "a/" + "x" * 120 + "/y") == b"long"
    assert get(t, "a/l").symlink == b"t" * (100 if fmt == "ustar" else 200)
    assert get(t, "/a/f").mtime == 7 and t.root.mtime == 5


def test_compression_detected_by_magic_and_diff_id_is_of_the_tar() -> None:
    raw = _sample()
    want = "sha256:" + hashlib.sha256(raw).hexdigest()
    half = len(raw) // 2
    variants = {
        "none": raw,
        "gzip": gzip.compress(raw),
        "gzip-multimember": gzip.compress(raw[:half]) + gzip.compress(raw[half:]),
        "zstd": zstandard.ZstdCompressor().compress(raw),
        "zstd-multiframe": zstandard.ZstdCompressor().compress(raw[:half]) + zstandard.ZstdCompressor().compress(raw[half:]),
        "zstd-skippable-first": struct.pack("<II", 0x184D2A50, 3) + b"abc" + zstandard.ZstdCompressor().compress(raw),
    }
    for name, blob in variants.items():
        t = tree(blob)
        assert t.diff_id == want, name
        assert t.tar_size == len(raw)
        assert t.compression == name.split("-")[0]
        assert content(t, "a/f") == b"hello"


def test_trailing_bytes_after_eof_marker_are_hashed_not_parsed() -> None:
    raw = _sample() + b"\0" * 10240 + b"garbage after the end"
    t = tree(raw)
    assert t.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_pax_times_uids_xattrs() -> None:
    w = TarWriter()
    w.add("f", F, b"x", pax={"mtime": b"1700000000.123456789", "uid": b"3000000", "gid": b"4000000",
                             "SCHILY.xattr.user.a": b"v\n=\0", "SCHILY.xattr.security.capability": b"\1\2",
                             "LIBARCHIVE.xattr.user.lib%3Dx": b"aGVsbG8",
                             "SCHILY.xattr.trusted.overlay.opaque": b"y"})
    w.add("g", F, b"y", pax={"mtime": b"-1.25"})
    t = tree(w.close())
    f = get(t, "f")
    assert (f.mtime, f.mtime_nsec, f.uid, f.gid) == (1700000000, 123456789, 3000000, 4000000)
    assert f.xattrs == {"user.a": b"v\n=\0", "security.capability": b"\1\2", "user.lib=x": b"hello"}
    g = get(t, "g")
    assert (g.mtime, g.mtime_nsec) == (-2, 750000000)
    assert parse_pax_time(b"12.0000000019") == (12, 1)


def test_acl_text_to_xattr() -> None:
    v = acl_text_to_xattr(b"user::rw-,user:bob:r--:1000,group::r--,group:50:rwx,mask::rwx,other::---")
    ents = [struct.unpack("<HHI", v[4 + i * 8 : 12 + i * 8]) for i in range((len(v) - 4) // 8)]
    assert struct.unpack("<I", v[:4])[0] == 2
    assert ents == [(1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF), (8, 7, 50), (0x10, 7, 0xFFFFFFFF),
                    (0x20, 0, 0xFFFFFFFF)]
    with pytest.raises(FormatError):
        acl_text_to_xattr(b"user:bob:r--")  # a name with no numeric id cannot be resolved here


def test_base256_and_ustar_prefix() -> None:
    w = TarWriter(fmt="ustar")
    name = "p" * 80 + "/" + "q" * 80 + "/file"
    w.add(name, F, b"prefixed", uid=70_000_000)  # > 8 octal digits -> base-256
    t = tree(w.close())
    assert get(t, name).uid == 70_000_000
    assert content(t, name) == b"prefixed"


def test_devices_fifo_symlink_modes() -> None:
    w = TarWriter()
    w.add("c", b"3", mode=0o620, devmajor=136, devminor=5)
    w.add("b", b"4", devmajor=8, devminor=1)
    w.add("p", b"6", mode=0o600)
    w.add("s", S, link="/abs/target", mode=0o644)
    w.add("suid", F, b"", mode=0o4755)
    t = tree(w.close())
    c = get(t, "c")
    assert stat.S_ISCHR(c.mode) and os.major(c.rdev) == 136 and os.minor(c.rdev) == 5 and c.mode & 0o7777 == 0o620
    assert stat.S_ISBLK(get(t, "b").mode) and get(t, "b").rdev == os.makedev(8, 1)
    assert stat.S_ISFIFO(get(t, "p").mode)
    assert get(t, "s").symlink == b"/abs/target" and get(t, "s").mode == stat.S_IFLNK | 0o777
    assert get(t, "suid").mode == stat.S_IFREG | 0o4755 and get(t, "suid").data is None


# ---------------------------------------------------------------- tree semantics

def test_duplicates_later_wins() -> None:
    w = TarWriter()
    w.add("f", F, b"one")
    w.add("f", F, b"two")
    w.add("d/", D, mode=0o700)
    w.add("d/x", F, b"x")
    w.add("d/", D, mode=0o750, mtime=9)  # attributes updated, children kept
    w.add("d2f/", D)
    w.add("d2f/y", F, b"y")
    w.add("d2f", F, b"file now")  # replaces the directory and its subtree
    w.add("f2d", F, b"file")
    w.add("f2d/", D)
    w.add("f2d/z", F, b"z")
    t = tree(w.close())
    assert content(t, "f") == b"two"
    assert get(t, "d").mode & 0o7777 == 0o750 and get(t, "d").mtime == 9 and names(get(t, "d")) == ["x"]
    assert content(t, "d2f") == b"file now"
    assert get(t, "f2d").is_dir and names(get(t, "f2d")) == ["z"]


def test_implicit_parents_and_root() -> None:
    w = TarWriter()
    w.add("deep/a/b/file", F, b"x")
    w.add("deep/", D, mode=0o700, uid=3)
    t = tree(w.close())
    a = get(t, "deep/a")
    assert a.mode == stat.S_IFDIR | 0o755 and (a.uid, a.gid, a.mtime) == (0, 0, 0)
    assert t.is_implicit(a) and t.is_implicit(t.root)
    assert not t.is_implicit(get(t, "deep")) and get(t, "deep").uid == 3


def test_hardlinks_are_one_inode() -> None:
    w = TarWriter()
    w.add("a", F, b"data")
    w.add("sub/b", L, link="a")
    w.add("c", L, link="./a")
    w.add("a", F, b"new a")  # replaces the name only; b and c keep the old inode
    t = tree(w.close())
    assert get(t, "sub/b") is get(t, "c")
    assert get(t, "a") is not get(t, "c")
    assert content(t, "c") == b"data" and content(t, "a") == b"new a"


def test_whiteouts_and_opaque() -> None:
    w = TarWriter()
    w.add("d/.wh.gone", F, mtime=11)
    w.add("o/", D)
    w.add("o/.wh..wh..opq", F)
    w.add("o/new", F, b"n")
    w.add("s/.wh.f", F)
    w.add("s/f", F, b"same layer wins")
    w.add("s/.wh.dir", F)
    w.add("s/dir/x", F, b"x")
    w.add("aufs/.wh..wh.plnk", F)
    w.add("aufs/.wh..wh.orph/", D)
    w.add("aufs/.wh..wh.orph/x", F, b"x")
    w.add("root-opq/.wh..wh..opq", F)
    t = tree(w.close())
    gone = get(t, "d/gone")
    assert is_whiteout(gone) and gone.mode == stat.S_IFCHR and gone.mtime == 11
    assert get(t, "d").xattrs == {OVERLAY_ORIGIN: b""}
    assert get(t, "o").xattrs.get(OVERLAY_OPAQUE) == b"y" and names(get(t, "o")) == ["new"]
    assert content(t, "s/f") == b"same layer wins"
    assert get(t, "s/dir").xattrs.get(OVERLAY_OPAQUE) == b"y"  # whiteout + dir of one layer: opaque
    assert OVERLAY_ORIGIN not in get(t, "s").xattrs  # no whiteout left in s
    assert names(get(t, "aufs")) == []
    for _, node in t.root.walk():
        assert node.children is None or not any(n.startswith(b".wh.") for n in node.children)


def test_sparse_pax_10_map_and_holes() -> None:
    size = 5 << 30
    body = b"2\n4096\n100\n" + b"%d\n" % (size - 10) + b"10\n"
    mapblk = pad(body)
    stored = mapblk + b"A" * 100 + b"B" * 10
    w = TarWriter()
    w.add("./GNUSparseFile.0/s", F, stored, pax={"GNU.sparse.major": b"1", "GNU.sparse.minor": b"0",
                                                 "GNU.sparse.name": b"sparse", "GNU.sparse.realsize": b"%d" % size})
    t = tree(w.close())
    d = get(t, "sparse").data
    assert isinstance(d, SpooledData) and d.size == size
    assert [(s.file_offset, s.length) for s in d.segments] == [(4096, 100), (size - 10, 10)]


def test_old_gnu_sparse_with_extension_blocks() -> None:
    runs = [(i * 8192, 512) for i in range(10)]  # > 4 entries: needs an extension block
    hdr = bytearray(header(b"old", b"S", size=512 * 10, fmt="gnu"))
    for i, (o, n) in enumerate(runs[:4]):
        hdr[386 + i * 24 : 386 + i * 24 + 24] = b"%011o\0%011o\0" % (o, n)
    hdr[482] = 1
    hdr[483:495] = b"%011o\0" % (10 * 8192)
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    ext = bytearray(512)
    for i, (o, n) in enumerate(runs[4:]):
        ext[i * 24 : i * 24 + 24] = b"%011o\0%011o\0" % (o, n)
    raw = bytes(hdr) + bytes(ext) + b"".join(bytes([65 + i]) * 512 for i in range(10)) + b"\0" * 1024
    t = tree(raw)
    d = get(t, "old").data
    assert isinstance(d, SpooledData) and d.size == 10 * 8192
    assert [(s.file_offset, s.length) for s in d.segments] == runs
    assert content(t, "old")[8192 * 3 : 8192 * 3 + 512] == b"D" * 512


def test_layer_conversion_is_deterministic(tmp_path: Path) -> None:
    raw = _sample()
    outs = []
    for i in range(2):
        p = tmp_path / f"{i}.erofs"
        with open(p, "wb") as o:
            r = convert_layer(io.BytesIO(raw), o)
        outs.append(p.read_bytes())
        assert r.size == len(outs[-1]) and r.blocks * 4096 == r.size
    assert outs[0] == outs[1]


def test_zstd_garbage_after_frames_is_refused() -> None:
    raw = zstandard.ZstdCompressor().compress(_sample()) + b"not a frame"
    with pytest.raises(FormatError, match="zstd"):
        tree(raw)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["zstd", "gzip"])
def test_decompression_bomb_memory_is_bounded(how: str, tmp_path: Path) -> None:
    """1 GiB of zeros after a small tar, compressed to almost nothing: parsed and hashed with
    bounded memory (peak RSS of a child process)."""
    import subprocess
    import sys

    bomb = tmp_path / "bomb"
    zeros = b"\0" * (16 << 20)
    with open(bomb, "wb") as f:
        if how == "zstd":
            c = zstandard.ZstdCompressor(level=3).compressobj()
            f.write(c.compress(_sample()))
            for _ in range(64):
                f.write(c.compress(zeros))
            f.write(c.flush())
        else:
            g = gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1)
            g.write(_sample())
            for _ in range(64):
                g.write(zeros)
            g.close()
    # VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) high-water mark across exec.
    code = ("import sys\n"
            "from bdserver.convert.tar import read_layer\n"
            "t = read_layer(open(sys.argv[1], 'rb'))\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
            "print(t.tar_size, hwm)\n")
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    assert int(out[0]) >= 1 << 30
    assert int(out[1]) < 150 * 1024, f"peak RSS {int(out[1]) // 1024} MiB"


def test_whiteout_name_as_directory_is_refused() -> None:
    w = TarWriter()
    w.add("a/.wh.b/c", F, b"x")
    with pytest.raises(FormatError, match="whiteout name"):
        tree(w.close())


def test_global_pax_volume_label_unknown_types_v7_dirs() -> None:
    from tests.fixtures.tarwriter import pax_record

    g = pax_record("uid", b"4242") + pax_record("SCHILY.xattr.user.g", b"global")
    raw = header(b"pax_global_header", b"g", size=len(g)) + pad(g)
    raw += header(b"label", b"V")
    raw += header(b"a", b"0", size=2) + pad(b"aa")
    raw += header(b"b", b"0", size=2, uid=7) + pad(b"bb")
    raw += header(b"c", b"Z", size=3) + pad(b"ccc")  # unknown type: a regular file (POSIX)
    raw += header(b"olddir/", b"\0")  # pre-POSIX directory
    raw += header(b"dump/", b"D", size=5) + pad(b"x\0y\0\0")  # GNU dumpdir: a directory
    loc = pax_record("uid", b"")  # an empty record cancels the global value for one member
    raw += header(b"PaxHeaders/d", b"x", size=len(loc)) + pad(loc) + header(b"d", b"0", uid=9)
    raw += b"\0" * 1024
    t = tree(raw)
    assert get(t, "a").uid == 4242 and get(t, "b").uid == 4242  # global wins over the header field
    assert get(t, "a").xattrs == {"user.g": b"global"}
    assert get(t, "d").uid == 9
    assert content(t, "c") == b"ccc" and stat.S_ISREG(get(t, "c").mode)
    assert get(t, "olddir").is_dir and get(t, "dump").is_dir
    assert "label" not in names(t.root)


def test_pax_size_overrides_the_header() -> None:
    from tests.fixtures.tarwriter import pax_record

    rec = pax_record("size", b"5")
    raw = header(b"PaxHeaders/f", b"x", size=len(rec)) + pad(rec) + header(b"f", b"0", size=0) + pad(b"12345")
    t = tree(raw + b"\0" * 1024)
    assert content(t, "f") == b"12345"


@pytest.mark.parametrize("how", ["none", "gzip"])
def test_blob_digest_mismatch_is_integrity_error(how: str, tmp_path: Path) -> None:
    """A layer streamed through a verifying reader (as from a registry): altered or truncated
    bytes surface as IntegrityError, never as a converted layer."""
    from bdserver.errors import IntegrityError
    from bdserver.digest import VerifyingReader

    raw = _sample()
    blob = gzip.compress(raw) if how == "gzip" else raw
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    for bad in (blob[:-1] if how == "gzip" else blob + b"\0" * 512, blob[:-100]):
        with pytest.raises(IntegrityError) as ei, open(tmp_path / "o", "wb") as o:
            convert_layer(VerifyingReader(io.BytesIO(bad), digest, len(blob)), o)  # type: ignore[arg-type]
        assert isinstance(ei.value, IntegrityError), ei.value
    with open(tmp_path / "o", "wb") as o:
        r = convert_layer(VerifyingReader(io.BytesIO(blob), digest, len(blob)), o)  # type: ignore[arg-type]
    assert r.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
