"""Corrupt or hostile images give FormatError (never hangs or other exceptions); bad trees are
refused by the writer with FormatError."""

from __future__ import annotations

import io
import os
import random
import stat
import struct
from pathlib import Path

import pytest

from bdserver.errors import FormatError
from bdserver.erofs import structs as S
from bdserver.erofs.reader import ErofsImage
from bdserver.erofs.tree import BlockMap, Inode
from bdserver.erofs.writer import write_image
from tests.erofs.helpers import Spool, reg, symlink


def _image(tmp_path: Path) -> bytearray:
    spool = Spool(tmp_path / "spool")
    root = Inode.directory()
    a = Inode.directory(xattrs={"user.a": b"1", "trusted.overlay.opaque": b"y"})
    root.children[b"a"] = a  # type: ignore[index]
    b = Inode.directory()
    a.children[b"b"] = b  # type: ignore[index]
    b.children[b"c"] = Inode.directory()  # type: ignore[index]
    b.children[b"file"] = reg(spool.dense(b"x" * 5000))  # type: ignore[index]
    b.children[b"l"] = symlink(b"file")  # type: ignore[index]
    root.children[b"sparse"] = reg(spool.sparse(1 << 20, [(500_000, b"y")]), mtime=7)  # type: ignore[index]
    for i in range(40):
        root.children[b"f%02d" % i] = reg(spool.dense(b"%d" % i), xattrs={"security.x": b"same"})  # type: ignore[index]
    buf = io.BytesIO()
    write_image(root, buf)
    spool.close()
    return bytearray(buf.getvalue())


def _open(raw: bytes | bytearray) -> ErofsImage:
    data = bytes(raw)
    return ErofsImage(lambda off, n: data[off : off + n])


def _fix_csum(raw: bytearray) -> None:
    struct.pack_into("<I", raw, 1028, S.sb_checksum(raw))


def _read_everything(img: ErofsImage) -> None:
    for _, info in img.walk():
        if info.is_reg:
            info.read(0, 1 << 20)
    img.to_tree()


def test_bad_magic(tmp_path: Path) -> None:
    raw = _image(tmp_path)
    raw[1024] ^= 0xFF
    with pytest.raises(FormatError, match="magic"):
        _open(raw)


def test_bad_checksum(tmp_path: Path) -> None:
    raw = _image(tmp_path)
    raw[1200] ^= 1  # inside the root inode, covered by the checksum
    with pytest.raises(FormatError, match="checksum"):
        _open(raw)


def test_unknown_incompat_feature(tmp_path: Path) -> None:
    raw = _image(tmp_path)
    struct.pack_into("<I", raw, 1024 + 80, S.INCOMPAT_48BIT)
    _fix_csum(raw)
    with pytest.raises(FormatError, match="48bit"):
        _open(raw)


@pytest.mark.parametrize("cut", [0, 100, 1100, 2000, 4096, 8192])
def test_truncated(tmp_path: Path, cut: int) -> None:
    raw = _image(tmp_path)
    with pytest.raises(FormatError):
        _read_everything(_open(raw[:cut]))


def test_truncated_data(tmp_path: Path) -> None:
    raw = _image(tmp_path)
    img = _open(raw[: len(raw) - 4096])
    with pytest.raises(FormatError, match="truncated"):
        _read_everything(img)


def _patch_dirent(raw: bytearray, img: ErofsImage, dir_path: str, name: bytes, nid: int) -> None:
    d = img.lookup(dir_path)
    assert d.layout == S.LAYOUT_FLAT_INLINE and d.size < 4096
    for i, (n, _, _) in enumerate(img.listdir(d)):
        if n == name:
            struct.pack_into("<Q", raw, d.data_off + 12 * i, nid)
            break
    else:
        raise AssertionError(name)
    _fix_csum(raw)


def test_directory_cycle(tmp_path: Path) -> None:
    raw = _image(tmp_path)
    img = _open(raw)
    a = img.lookup("/a")
    _patch_dirent(raw, img, "/a/b", b"c", a.nid)  # /a/b/c -> /a
    with pytest.raises(FormatError, match="cycle"):
        list(_open(raw).walk())
    with pytest.raises(FormatError):
        _open(raw).to_tree()


@pytest.mark.parametrize("nid", [10**12, 2**63, 2**64 - 1])
def test_dirent_to_garbage(tmp_path: Path, nid: int) -> None:
    raw = _image(tmp_path)
    img = _open(raw)
    _patch_dirent(raw, img, "/a/b", b"file", nid)
    with pytest.raises(FormatError):
        _read_everything(_open(raw))
    # and through a real file descriptor (pread with a huge offset)
    p = tmp_path / "img"
    p.write_bytes(raw)
    with ErofsImage.open(p) as e, pytest.raises(FormatError):
        _read_everything(e)


def test_random_corruption_only_raises_formaterror(tmp_path: Path) -> None:
    """Flip bytes in the metadata (checksum fixed up so parsing goes deep)."""
    base = _image(tmp_path)
    meta_end = 4096 * 3
    rng = random.Random(1234)
    outcomes = {"ok": 0, "FormatError": 0}
    for _ in range(400):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(1024 + 8, meta_end)
            raw[pos] = rng.randrange(256)
        _fix_csum(raw)
        try:
            _read_everything(_open(raw))
            outcomes["ok"] += 1
        except (FormatError, FileNotFoundError):
            outcomes["FormatError"] += 1
    assert outcomes["FormatError"] > 0


# --- the writer refuses what EROFS cannot hold ---------------------------------------------


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"a\0b", b"n" * 256])
def test_writer_bad_names(name: bytes) -> None:
    root = Inode.directory()
    root.children[name] = reg()  # type: ignore[index]
    with pytest.raises(FormatError):
        write_image(root, io.BytesIO())


@pytest.mark.parametrize("xname", ["system.foo", "os2.x", "user.", "trusted", "x"])
def test_writer_unknown_xattr_prefix(xname: str) -> None:
    root = Inode.directory(xattrs={xname: b"v"})
    with pytest.raises(FormatError, match="prefix"):
        write_image(root, io.BytesIO())


def test_writer_hardlinked_directory() -> None:
    root = Inode.directory()
    d = Inode.directory()
    root.children[b"x"] = d  # type: ignore[index]
    root.children[b"y"] = d  # type: ignore[index]
    with pytest.raises(FormatError):
        write_image(root, io.BytesIO())


def test_writer_bad_blockmap() -> None:
    root = Inode.directory()
    root.children[b"f"] = reg(BlockMap(size=10000, chunk_bits=12, blocks=[1]))  # type: ignore[index]
    with pytest.raises(FormatError, match="chunks"):
        write_image(root, io.BytesIO())


def test_writer_root_must_be_directory() -> None:
    with pytest.raises(FormatError):
        write_image(Inode(mode=stat.S_IFREG | 0o644), io.BytesIO())


@pytest.mark.parametrize(
    "node",
    [
        Inode(mode=stat.S_IFCHR, rdev=os.makedev(4096, 0)),
        Inode(mode=stat.S_IFBLK, rdev=os.makedev(1, 1 << 20)),
        Inode(mode=stat.S_IFREG, mtime=1 << 63),
        Inode(mode=stat.S_IFREG, mtime_nsec=10**9),
        Inode(mode=stat.S_IFREG, uid=1 << 32),
        Inode(mode=0o170000),
        Inode(mode=stat.S_IFLNK | 0o777, symlink=b"x" * 4096),
    ],
    ids=["major", "minor", "mtime", "nsec", "uid", "mode", "symlink"],
)
def test_writer_refuses_unrepresentable(node: Inode) -> None:
    root = Inode.directory()
    root.children[b"n"] = node  # type: ignore[index]
    with pytest.raises(FormatError):
        write_image(root, io.BytesIO())


_LAYOUT_BOMB = r"""
import io, os, resource, stat, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from bdserver.errors import FormatError
from bdserver.erofs.tree import Inode, Segment, SpooledData
from bdserver.erofs.writer import write_image
src = io.BytesIO(b"x" * 4096)
size, step = int(sys.argv[1]), int(sys.argv[2])
segs = [Segment(off, 1, 0) for off in range(0, size, step)] if step else [Segment(size - 1, 1, 0)]
root = Inode.directory()
root.children[b"s"] = Inode(mode=stat.S_IFREG | 0o644, data=SpooledData(src, size, segs))
try:
    write_image(root, io.BytesIO())
    print("written")
except FormatError as e:
    print("FormatError", e)
except MemoryError:
    print("MemoryError")
print([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1])
"""


@pytest.mark.parametrize("size,step,limit", [(1 << 62, 0, "max_sparse_overhead"), (1 << 63, 0, "2**63"),
                                             (1 << 43, 1 << 32, "max_sparse_overhead")],
                         ids=["2**62", "2**63", "spread"])
def test_writer_sparse_bomb_allocates_nothing_per_block(size: int, step: int, limit: str) -> None:
    """A sparse file's logical size never sizes a list: the layout refuses what would exceed
    its LayoutLimits before allocating chunk tables (checked in a child with 1 GiB of address
    space and its peak RSS)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _LAYOUT_BOMB, str(size), str(step)], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[2])
    out = r.stdout.splitlines()
    assert r.returncode == 0 and out[0].startswith("FormatError") and limit in out[0], (r.stdout, r.stderr[-2000:])
    assert int(out[1]) < 64 * 1024, f"peak RSS {int(out[1]) // 1024} MiB"
