"""The in-memory tree that the EROFS writer lays out and the reader yields.

This is the contract between `convert/` (which builds trees from tar layers and merges
them) and `erofs/writer.py` (which turns a tree into image bytes). It holds metadata only:
file contents stay where they are (a spool file, a layer image) and are described by a
`FileData`, so a tree of a multi-GiB layer costs memory per entry, not per byte.

Names are `bytes` (POSIX file names are bytes; tar PAX names are decoded from UTF-8 by the
tar reader and re-encoded), xattr names are full `str` names such as
``"security.capability"`` and values are `bytes`.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Protocol, Sequence

from bdserver.erofs.structs import LZ4_MAX_DISTANCE
from bdserver.erofs.zmap import ZMap


class FileData(Protocol):
    """Contents of a regular file, however they are stored."""

    size: int


@dataclass(frozen=True)
class Segment:
    """A run of file bytes that exists (not a hole): ``length`` bytes of the file starting
    at ``file_offset`` are found at ``source_offset`` in ``source``."""

    file_offset: int
    length: int
    source_offset: int


@dataclass
class SpooledData:
    """File bytes held in a seekable spool file (e.g. copied out of a tar stream).

    ``segments`` lists the non-hole runs in file order; anything not covered reads as zeros
    (sparse tar entries). The writer copies these bytes into data blocks of the image.
    """

    source: BinaryIO
    size: int
    segments: Sequence[Segment]

    @classmethod
    def dense(cls, source: BinaryIO, offset: int, size: int) -> "SpooledData":
        segs = [Segment(0, size, offset)] if size else []
        return cls(source, size, segs)


@dataclass
class BlockMap:
    """File bytes that already live on the (virtual) device: chunk ``i`` of
    ``1 << chunk_bits`` bytes starts at block ``blocks[i]`` (unified device address, in
    4 KiB blocks), or is a hole when ``None``. The writer emits a CHUNK_BASED inode with
    8-byte chunk indexes (device_id 0) and copies no data.
    """

    size: int
    chunk_bits: int
    blocks: Sequence[int | None]


@dataclass
class TailedBlockMap:
    """Like a `BlockMap` with 4 KiB chunks, except that the file's last partial block is not
    on the device but given as ``tail`` bytes (``size % 4096`` of them). This is how a file
    whose tail another producer packed inline into its inode (mkfs.erofs without
    ``-Enoinline_data``) can still be pointed at: the writer copies the tail into a block of the
    image it writes (metadata-sized, allowed in merged metadata) and points the last chunk there.
    ``blocks`` has ``size // 4096`` entries (unified addresses, ``None`` = hole).
    """

    size: int
    blocks: Sequence[int | None]
    tail: bytes


@dataclass
class CompressedMap:
    """File bytes that EROFS compressed and that already live on the (virtual) device: the
    extents of `zmap` with their pcluster block addresses moved by `block_offset` (a layer's
    place on the device). The writer emits a COMPRESSED_FULL inode and copies no data; the
    kernel decompresses. `max_distance` is the lz4 window the source image declared."""

    zmap: ZMap
    block_offset: int = 0
    max_distance: int = LZ4_MAX_DISTANCE

    @property
    def size(self) -> int:
        return self.zmap.size


@dataclass
class CompressedData:
    """File bytes the writer compressed itself: the pclusters of `zmap`, `zmap.blocks` blocks in
    extent order from `source_offset` in `source`, block addresses counted from 0 (the writer
    places them)."""

    source: BinaryIO
    source_offset: int
    zmap: ZMap

    @property
    def size(self) -> int:
        return self.zmap.size


@dataclass
class Inode:
    """One inode. Hardlinks are several directory entries naming the same `Inode` object."""

    mode: int  # full st_mode: type bits | permission bits
    uid: int = 0
    gid: int = 0
    mtime: int = 0  # seconds since the epoch (may be negative)
    mtime_nsec: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    rdev: int = 0  # (major, minor) packed with os.makedev, for char/block devices
    symlink: bytes = b""  # target, for symlinks
    data: FileData | None = None  # for regular files; None means empty
    children: dict[bytes, "Inode"] | None = None  # for directories: name -> inode

    @classmethod
    def directory(cls, mode: int = 0o755, **kw: object) -> "Inode":
        return cls(mode=stat.S_IFDIR | (mode & 0o7777), children={}, **kw)  # type: ignore[arg-type]

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def size(self) -> int:
        if self.is_dir:
            raise TypeError("directory sizes are decided by the writer")
        if stat.S_ISLNK(self.mode):
            return len(self.symlink)
        if stat.S_ISREG(self.mode):
            return self.data.size if self.data is not None else 0
        return 0

    def walk(self, prefix: bytes = b"") -> Iterator[tuple[bytes, "Inode"]]:
        """Yield ``(path, inode)`` depth-first in sorted name order, the root as ``b"/"``.
        Iterative: a tree may be deeper than Python's recursion limit."""
        yield (prefix or b"/"), self
        stack = [(prefix, self.children or {}, iter(sorted(self.children or {})))]
        while stack:
            pfx, children, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            child = children[name]
            path = pfx + b"/" + name
            yield path, child
            if child.is_dir and child.children:
                stack.append((path, child.children, iter(sorted(child.children))))


OVERLAY_OPAQUE = "trusted.overlay.opaque"
OVERLAY_ORIGIN = "trusted.overlay.origin"


def whiteout(uid: int = 0, gid: int = 0, mtime: int = 0) -> Inode:
    """An overlayfs whiteout: a character device 0:0."""
    return Inode(mode=stat.S_IFCHR, uid=uid, gid=gid, mtime=mtime, rdev=0)


def is_whiteout(inode: Inode) -> bool:
    return stat.S_ISCHR(inode.mode) and inode.rdev == 0
