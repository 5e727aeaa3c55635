"""Test helpers: spooled trees, real kernel mounts (file-backed and loop), tree comparison.

Everything here uses the real kernel and real erofs-utils; mounts and loop devices are always
released in `finally` so concurrent test runs of other engineers are not disturbed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import BinaryIO, Iterator

from bdserver.erofs.reader import ErofsImage
from bdserver.erofs.tree import BlockMap, Inode, Segment, SpooledData, TailedBlockMap

MS_RDONLY = 1
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class Spool:
    """A spool file to which test file contents are appended (like convert/tar does)."""

    def __init__(self, path: Path) -> None:
        self.f: BinaryIO = open(path, "w+b")

    def dense(self, data: bytes) -> SpooledData:
        off = self.f.seek(0, os.SEEK_END)
        self.f.write(data)
        self.f.flush()
        return SpooledData.dense(self.f, off, len(data))

    def sparse(self, size: int, pieces: list[tuple[int, bytes]]) -> SpooledData:
        segs = []
        for fo, data in pieces:
            off = self.f.seek(0, os.SEEK_END)
            self.f.write(data)
            segs.append(Segment(fo, len(data), off))
        self.f.flush()
        return SpooledData(self.f, size, segs)

    def close(self) -> None:
        self.f.close()


def reg(data: SpooledData | BlockMap | None = None, mode: int = 0o644, **kw: object) -> Inode:
    return Inode(mode=stat.S_IFREG | mode, data=data, **kw)  # type: ignore[arg-type]


def symlink(target: bytes, **kw: object) -> Inode:
    return Inode(mode=stat.S_IFLNK | 0o777, symlink=target, **kw)  # type: ignore[arg-type]


def spooled_bytes(d: SpooledData, offset: int = 0, length: int | None = None) -> bytes:
    """Expected file bytes [offset, offset+length) of a SpooledData (holes read as zeros)."""
    end = d.size if length is None else min(d.size, offset + length)
    out = bytearray(max(0, end - offset))
    for s in d.segments:
        a, b = max(s.file_offset, offset), min(s.file_offset + s.length, end)
        if a < b:
            d.source.seek(s.source_offset + (a - s.file_offset))
            out[a - offset : b - offset] = d.source.read(b - a)
    return bytes(out)


def sample_ranges(size: int) -> list[tuple[int, int]]:
    """Ranges worth comparing in a file too big to read whole."""
    if size <= 64 << 20:
        return [(0, size)]
    pts = [0, 4095, 1 << 20, (1 << 32) - 3, size // 2, size - 5000]
    return [(p, 8192) for p in pts if 0 <= p < size]


def fsck(image: Path, *devices: str) -> None:
    args = ["fsck.erofs", *[f"--device={d}" for d in devices], str(image)]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"


@contextlib.contextmanager
def mounted(image: Path, mnt: Path, how: str = "file") -> Iterator[Path]:
    """Mount an EROFS image read-only: "file" = file-backed mount(2) with the regular file as
    source (no loop device), "loop" = through a loop device made with losetup."""
    mnt.mkdir(parents=True, exist_ok=True)
    loop = None
    try:
        if how == "loop":
            loop = subprocess.run(
                ["losetup", "--find", "--show", "--read-only", str(image)],
                check=True, capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            source = loop
        else:
            source = str(image)
        if _libc.mount(os.fsencode(source), os.fsencode(str(mnt)), b"erofs", MS_RDONLY, None) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mount {source} {mnt}: {os.strerror(e)}")
        try:
            if how == "file":
                # a file-backed mount has an anonymous device, not a loop (major 7)
                assert os.major(os.stat(mnt).st_dev) != 7
            yield mnt
        finally:
            if _libc.umount2(os.fsencode(str(mnt)), 0) != 0:
                _libc.umount2(os.fsencode(str(mnt)), MNT_DETACH)
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)


def _expected_nlinks(root: Inode) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _, node in root.walk():
        if not node.is_dir:
            counts[id(node)] = counts.get(id(node), 0) + 1
    return counts


def _content_of(node: Inode, device: BinaryIO | None, offset: int, length: int) -> bytes:
    d = node.data
    if d is None:
        return b""
    if isinstance(d, SpooledData):
        return spooled_bytes(d, offset, length)
    if isinstance(d, TailedBlockMap):
        full = len(d.blocks) * 4096
        head = _content_of(Inode(mode=node.mode, data=BlockMap(full, 12, d.blocks)), device, offset, length)
        a, b = max(offset, full), min(d.size, offset + length)
        return head + (d.tail[a - full : b - full] if a < b else b"")
    assert isinstance(d, BlockMap) and device is not None
    out = bytearray()
    end = min(d.size, offset + length)
    cs = 1 << d.chunk_bits
    pos = offset
    while pos < end:
        ci = pos // cs
        take = min(end, (ci + 1) * cs) - pos
        blk = d.blocks[ci]
        if blk is None:
            out += bytes(take)
        else:
            device.seek(blk * 4096 + pos - ci * cs)
            out += device.read(take)
        pos += take
    return bytes(out)


def assert_mount_matches(
    root: Inode, mnt: Path, device: BinaryIO | None = None, dir_nlink: bool = True, skip: tuple[bytes, ...] = ()
) -> None:
    """The mounted tree equals `root`: names, types, modes, owners, mtimes (ns), xattrs,
    symlinks, device numbers, hardlink identity, contents. `device` backs `BlockMap` files;
    entries under the relative paths in `skip` are not compared."""
    nlinks = _expected_nlinks(root)
    expected_paths = set()
    ino_of: dict[int, int] = {}
    for path, node in root.walk():
        rel = path.lstrip(b"/")
        p = os.path.join(os.fsencode(str(mnt)), rel) if rel else os.fsencode(str(mnt))
        expected_paths.add(rel)
        st = os.lstat(p)
        assert st.st_mode == node.mode, (path, oct(st.st_mode), oct(node.mode))
        assert (st.st_uid, st.st_gid) == (node.uid, node.gid), path
        assert st.st_mtime_ns == node.mtime * 1_000_000_000 + node.mtime_nsec, path
        got_x = {k: os.getxattr(p, k, follow_symlinks=False) for k in os.listxattr(p, follow_symlinks=False)}
        assert got_x == node.xattrs, (path, got_x, node.xattrs)
        if node.is_dir:
            if dir_nlink:
                subdirs = sum(1 for c in (node.children or {}).values() if c.is_dir)
                assert st.st_nlink == 2 + subdirs, path
        else:
            assert st.st_nlink == nlinks[id(node)], path
            if id(node) in ino_of:
                assert ino_of[id(node)] == st.st_ino, f"hardlink {path!r} lost its identity"
            ino_of[id(node)] = st.st_ino
        if stat.S_ISLNK(node.mode):
            assert os.readlink(p) == node.symlink, path
        elif stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
            assert st.st_rdev == node.rdev, path
        elif stat.S_ISREG(node.mode):
            assert st.st_size == node.size, path
            with open(p, "rb") as f:
                for off, ln in sample_ranges(node.size):
                    f.seek(off)
                    assert f.read(ln) == _content_of(node, device, off, ln), (path, off)
    # distinct inodes stay distinct
    assert len(set(ino_of.values())) == len(ino_of)
    got_paths = set()
    top = os.fsencode(str(mnt))
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, n), top)
            if not any(rel == sk or rel.startswith(sk + b"/") for sk in skip):
                got_paths.add(rel)
    got_paths.add(b"")
    assert got_paths == expected_paths


def assert_reader_matches(
    root: Inode, img: ErofsImage, device: BinaryIO | None = None, dir_nlink: bool = True, skip: tuple[bytes, ...] = ()
) -> None:
    """Our reader sees exactly `root` (same checks as the mount comparison); absolute paths in
    `skip` and everything under them are ignored."""
    nlinks = _expected_nlinks(root)
    want = dict(root.walk())
    got = {p: i for p, i in img.walk() if not any(p == sk or p.startswith(sk + b"/") for sk in skip)}
    assert set(got) == set(want)
    nid_of: dict[int, int] = {}
    for path, node in want.items():
        info = got[path]
        assert info.mode == node.mode, path
        assert (info.uid, info.gid, info.mtime, info.mtime_nsec) == (node.uid, node.gid, node.mtime, node.mtime_nsec)
        assert info.xattrs == node.xattrs, path
        if node.is_dir:
            if dir_nlink:
                assert info.nlink == 2 + sum(1 for c in (node.children or {}).values() if c.is_dir)
        else:
            assert info.nlink == nlinks[id(node)], path
            assert nid_of.setdefault(id(node), info.nid) == info.nid
        if stat.S_ISLNK(node.mode):
            assert info.symlink == node.symlink
        if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
            assert info.rdev == node.rdev
        if stat.S_ISREG(node.mode):
            assert info.size == node.size
            for off, ln in sample_ranges(node.size):
                assert info.read(off, ln) == _content_of(node, device, off, ln), (path, off)
    assert len(set(nid_of.values())) == len(nid_of)


def disk_tree_equals_reader(top: Path, img: ErofsImage, contents: bool = True) -> None:
    """A directory on disk (e.g. a mount made by the kernel) equals what our reader reads
    (file contents too unless `contents` is False)."""
    topb = os.fsencode(str(top))
    seen: dict[int, int] = {}
    count = 0
    for path, info in img.walk():
        rel = path.lstrip(b"/")
        p = os.path.join(topb, rel) if rel else topb
        st = os.lstat(p)
        count += 1
        assert st.st_mode == info.mode, path
        assert (st.st_uid, st.st_gid) == (info.uid, info.gid), path
        assert st.st_mtime_ns == info.mtime * 1_000_000_000 + info.mtime_nsec, path
        assert st.st_nlink == info.nlink, path
        got_x = {k: os.getxattr(p, k, follow_symlinks=False) for k in os.listxattr(p, follow_symlinks=False)}
        assert got_x == info.xattrs, path
        assert seen.setdefault(st.st_ino, info.nid) == info.nid
        if stat.S_ISLNK(st.st_mode):
            assert os.readlink(p) == info.symlink
        elif stat.S_ISREG(st.st_mode):
            assert st.st_size == info.size, path
            if contents:
                with open(p, "rb") as f:
                    assert f.read() == info.read(), path
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            assert st.st_rdev == info.rdev
    n = sum(len(ds) + len(fs) for _, ds, fs in os.walk(topb)) + 1
    assert n == count


def tree_from_dir(top: Path, spool_path: Path) -> tuple[Inode, int]:
    """Build a tree of `top`, copying file bytes into one spool file. Returns (tree, bytes)."""
    spool = open(spool_path, "w+b")
    by_ino: dict[tuple[int, int], Inode] = {}
    total = 0

    def node_for(path: str, st: os.stat_result) -> Inode:
        nonlocal total
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in by_ino:
            return by_ino[key]
        xattrs = {}
        for k in os.listxattr(path, follow_symlinks=False):
            if k.startswith(("user.", "trusted.", "security.", "system.posix_acl")):
                xattrs[k] = os.getxattr(path, k, follow_symlinks=False)
        n = Inode(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime=st.st_mtime_ns // 10**9,
                  mtime_nsec=st.st_mtime_ns % 10**9, xattrs=xattrs, rdev=st.st_rdev)  # fmt: skip
        if stat.S_ISDIR(st.st_mode):
            n.children = {}
        elif stat.S_ISLNK(st.st_mode):
            n.symlink = os.fsencode(os.readlink(path))
        elif stat.S_ISREG(st.st_mode) and st.st_size:
            off = spool.seek(0, os.SEEK_END)
            with open(path, "rb") as f:
                shutil.copyfileobj(f, spool, 1 << 20)
            size = spool.tell() - off
            n.data = SpooledData.dense(spool, off, size)
            total += size
        by_ino[key] = n
        return n

    root = node_for(str(top), os.lstat(top))
    stack = [(str(top), root)]
    while stack:
        d, node = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                child = node_for(e.path, st)
                node.children[os.fsencode(e.name)] = child  # type: ignore[index]
                if stat.S_ISDIR(st.st_mode):
                    stack.append((e.path, child))
    spool.flush()
    return root, total
