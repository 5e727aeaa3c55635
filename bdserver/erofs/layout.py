"""Layout of an EROFS image: which inode goes where, which layout each one gets, which
blocks its data take. Pure computation on the tree; `writer` turns the result into bytes.

Order: the root first (its NID must fit the superblock's 16 bits), then breadth-first in
sorted-name order, so a directory's children sit together and NIDs are stable. Placement:
inodes (with inline xattrs, chunk indexes and inline dir/symlink tails) from byte 1152 (after
the superblock and the device table), a tail never crossing a block; then the shared xattr
blocks; then data blocks in inode order.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Sequence

from bdserver.errors import FormatError
from bdserver.erofs import structs as S
from bdserver.erofs.structs import DeviceSlot
from bdserver.erofs.tree import BlockMap, Inode, Segment, SpooledData, TailedBlockMap
from bdserver.erofs.util import gc_paused

BS = S.BLOCK_SIZE
BITS = S.BLKSZBITS
U32 = 0xFFFFFFFF
_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR


@dataclass(frozen=True)
class ImageInfo:
    """Size of a written (or planned) image; `blocks` is what a device table slot records."""

    blocks: int  # image size in 4 KiB blocks (the primary device)
    size: int  # bytes = blocks * 4096
    inodes: int


_FILE_TYPES = {
    stat.S_IFREG: S.FT_REG,
    stat.S_IFDIR: S.FT_DIR,
    stat.S_IFCHR: S.FT_CHRDEV,
    stat.S_IFBLK: S.FT_BLKDEV,
    stat.S_IFIFO: S.FT_FIFO,
    stat.S_IFSOCK: S.FT_SOCK,
    stat.S_IFLNK: S.FT_SYMLINK,
}


def file_type(mode: int) -> int:
    return _FILE_TYPES.get(stat.S_IFMT(mode), S.FT_UNKNOWN)


class Plan:
    """Per-inode layout decisions, filled in by the passes of `compute_layout` (slots: one
    of these exists per inode of a possibly huge tree)."""

    __slots__ = (
        "inode", "nid", "pos", "ino", "nlink", "parent", "extended", "layout", "isize",
        "xattr_items", "xattr_shared", "xattr_isize", "size", "dir_blocks", "tail_len",
        "nblocks", "blkaddr", "chunk_bits", "chunks", "meta_len", "entries",
    )  # fmt: skip

    def __init__(self, inode: Inode, ino: int) -> None:
        self.inode = inode
        self.ino = ino
        self.nid = 0
        self.pos = 0
        self.nlink = 0
        self.parent: Plan | None = None
        self.extended = False
        self.layout = S.LAYOUT_FLAT_PLAIN
        self.isize = 32
        self.xattr_items: list[bytes] = []  # encoded inline entries (header+name+value+pad)
        self.xattr_shared: list[bytes] = []  # encoded entries that live in the shared area
        self.xattr_isize = 0
        self.size = 0
        self.dir_blocks: list[list[tuple[bytes, "Plan"]]] | None = None
        self.tail_len = 0  # bytes stored inline after inode+xattrs
        self.nblocks = 0  # data blocks in the data area (FLAT_* layouts)
        self.blkaddr = 0
        self.chunk_bits = 0
        self.chunks: list[int | None] | None = None  # CHUNK_BASED: block per chunk
        self.meta_len = 0
        self.entries: list[tuple[bytes, "Plan"]] | None = None


def _check_name(name: bytes) -> None:
    if not isinstance(name, bytes):
        raise FormatError(f"file names must be bytes, got {type(name).__name__}")
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > S.NAME_MAX:
        raise FormatError(f"invalid file name for EROFS: {name[:80]!r}")


def _collect(root: Inode) -> list[Plan]:
    """Breadth-first, sorted names: stable NIDs; a directory's children sit together."""
    if not root.is_dir or root.children is None:
        raise FormatError("the root of an EROFS tree must be a directory")
    plans: dict[int, Plan] = {}
    order: list[Plan] = []
    rp = Plan(root, 1)
    rp.parent = rp
    plans[id(root)] = rp
    order.append(rp)
    queue = [rp]
    qi = 0
    while qi < len(queue):
        dp = queue[qi]
        qi += 1
        children = dp.inode.children or {}
        entries: list[tuple[bytes, Plan]] = []
        subdirs = 0
        for name in sorted(children):
            if type(name) is not bytes or not 0 < len(name) <= S.NAME_MAX or b"/" in name or b"\0" in name:
                _check_name(name)  # raises with the precise reason
            elif name == b"." or name == b"..":
                _check_name(name)
            child = children[name]
            key = id(child)
            cp = plans.get(key)
            if child.mode & _S_IFMT == _S_IFDIR:
                if cp is not None:
                    raise FormatError(f"directory {name!r} appears twice in the tree (hardlinked directory)")
                cp = Plan(child, len(order) + 1)
                cp.parent = dp
                plans[key] = cp
                order.append(cp)
                queue.append(cp)
                subdirs += 1
            else:
                if cp is None:
                    cp = Plan(child, len(order) + 1)
                    plans[key] = cp
                    order.append(cp)
                cp.nlink += 1
            entries.append((name, cp))
        dp.nlink = 2 + subdirs
        dp.entries = entries
    return order


def _dir_layout(p: Plan) -> None:
    """Split the sorted entries (with "." and "..") into directory blocks."""
    assert p.entries is not None and p.parent is not None
    allents = p.entries + [(b".", p), (b"..", p.parent)]
    allents.sort(key=lambda e: e[0])
    blocks: list[list[tuple[bytes, Plan]]] = []
    cur: list[tuple[bytes, Plan]] = []
    used = 0
    for ent in allents:
        need = 12 + len(ent[0])
        if used + need > BS:
            blocks.append(cur)
            cur, used = [], 0
        cur.append(ent)
        used += need
    blocks.append(cur)
    p.dir_blocks = blocks
    p.size = (len(blocks) - 1) * BS + used
    p.entries = None


def _chunk_plan(size: int, segs: Sequence[Segment]) -> tuple[int, list[bool]] | None:
    """Pick a chunk size for a sparse file: minimise data bytes + 8-byte indexes. Returns
    (chunk_bits, present-per-chunk) or None when no chunk would be a hole (store FLAT_PLAIN)."""
    best: tuple[int, int] | None = None
    maxbits = max(BITS, (size - 1).bit_length())
    for bits in range(BITS, min(maxbits, BITS + 31) + 1):
        cs = 1 << bits
        n = (size + cs - 1) >> bits
        present = 0
        last = -1
        for s in segs:
            if s.length <= 0:
                continue
            a = s.file_offset >> bits
            b = (s.file_offset + s.length - 1) >> bits
            if a <= last:
                a = last + 1
            if b >= a:
                present += b - a + 1
                last = b
        cost = present * cs + n * 8
        if best is None or cost < best[0]:
            best = (cost, bits)
    assert best is not None
    bits = best[1]
    n = (size + (1 << bits) - 1) >> bits
    flags = [False] * n
    for s in segs:
        if s.length <= 0:
            continue
        for c in range(s.file_offset >> bits, ((s.file_offset + s.length - 1) >> bits) + 1):
            flags[c] = True
    if all(flags):
        return None
    return bits, flags


def check_segments(d: SpooledData) -> list[Segment]:
    segs = [s for s in d.segments if s.length > 0]
    end = 0
    for s in segs:
        if s.file_offset < end or s.file_offset + s.length > d.size or s.source_offset < 0:
            raise FormatError("file segments overlap, are unsorted or exceed the file size")
        end = s.file_offset + s.length
    return segs


@dataclass
class Layout:
    """Everything `writer` needs: plans in NID order and where the areas start."""

    order: list[Plan]
    shared_keys: list[bytes]
    shared_ids: dict[bytes, int]
    meta_blocks: int
    xattr_blkaddr: int
    total_blocks: int
    any_chunked: bool
    devt_off: int


def plan_image(
    root: Inode,
    *,
    build_time: int = 0,
    build_time_nsec: int = 0,
    devices: Sequence[DeviceSlot] = (),
    meta_only: bool = False,
) -> ImageInfo:
    """What `write_image` would produce, without writing: lets a caller learn the size of a
    merged metadata image (block addresses in `BlockMap`s do not change it) before it picks
    the layers' `mapped_blkaddr`s."""
    with gc_paused():
        lay = compute_layout(root, build_time, build_time_nsec, devices, meta_only)
    return ImageInfo(blocks=lay.total_blocks, size=lay.total_blocks * BS, inodes=len(lay.order))


def compute_layout(
    root: Inode, build_time: int, build_time_nsec: int, devices: Sequence[DeviceSlot], meta_only: bool
) -> Layout:
    """Passes 1-3: shapes, inode placement, block allocation. Pure computation."""
    order = _collect(root)

    # -- pass 1: per-inode shapes (xattrs, layouts, sizes) --------------------------------
    xcount: dict[bytes, int] = {}
    for p in order:
        ino = p.inode
        if ino.xattrs:
            items = []
            for name in sorted(ino.xattrs):
                idx, suffix = S.split_xattr_name(name)
                entry = S.xattr_entry_bytes(idx, suffix, bytes(ino.xattrs[name]))
                items.append(entry)
                xcount[entry] = xcount.get(entry, 0) + 1
            p.xattr_items = items
    shared_keys = sorted(k for k, c in xcount.items() if c >= 2 and len(k) > 4)
    shared_ids: dict[bytes, int] = {}
    off = 0
    for k in shared_keys:
        shared_ids[k] = off // 4
        off += len(k)
    shared_bytes = off
    del xcount

    any_chunked = False
    for p in order:
        ino = p.inode
        mode = ino.mode
        fmt = stat.S_IFMT(mode)
        if p.xattr_items:
            inline = [e for e in p.xattr_items if e not in shared_ids]
            p.xattr_shared = [e for e in p.xattr_items if e in shared_ids]
            p.xattr_items = inline
            body = 12 + 4 * len(p.xattr_shared) + sum(len(e) for e in inline)
            if body > 12 + 4 * 0xFFFE:
                raise FormatError("too many xattrs on one inode for EROFS")
            p.xattr_isize = body
        if fmt == stat.S_IFDIR:
            _dir_layout(p)
        elif fmt == stat.S_IFLNK:
            p.size = len(ino.symlink)
            if not ino.symlink or len(ino.symlink) >= 4096 or b"\0" in ino.symlink:
                raise FormatError(f"symlink target must be 1..4095 bytes without NUL: {ino.symlink[:80]!r}")
        elif fmt == stat.S_IFREG:
            d = ino.data
            if d is None or d.size == 0:
                p.size = 0
            elif isinstance(d, BlockMap):
                p.size = d.size
                if not BITS <= d.chunk_bits <= BITS + 31:
                    raise FormatError(f"BlockMap chunk_bits {d.chunk_bits} out of range")
                n = (d.size + (1 << d.chunk_bits) - 1) >> d.chunk_bits
                if len(d.blocks) != n:
                    raise FormatError(f"BlockMap has {len(d.blocks)} chunks, size needs {n}")
                p.layout = S.LAYOUT_CHUNK_BASED
                p.chunk_bits = d.chunk_bits
                p.chunks = list(d.blocks)
                any_chunked = True
            elif isinstance(d, TailedBlockMap):
                p.size = d.size
                if len(d.blocks) != d.size >> BITS or len(d.tail) != d.size % BS:
                    raise FormatError(
                        f"TailedBlockMap of {d.size} bytes needs {d.size >> BITS} blocks and a "
                        f"{d.size % BS}-byte tail, got {len(d.blocks)} and {len(d.tail)}"
                    )
                p.layout = S.LAYOUT_CHUNK_BASED
                p.chunk_bits = BITS
                p.chunks = list(d.blocks) + ([0] if d.tail else [])  # tail block: allocated in pass 3
                any_chunked = True
            elif isinstance(d, SpooledData):
                if meta_only:
                    raise ValueError("meta_only image got a regular file with spooled data")
                p.size = d.size
                segs = check_segments(d)
                covered = sum(s.length for s in segs)
                if covered < d.size:
                    cp = _chunk_plan(d.size, segs)
                    if cp is not None:
                        p.layout = S.LAYOUT_CHUNK_BASED
                        p.chunk_bits = cp[0]
                        p.chunks = [0 if f else None for f in cp[1]]
                        any_chunked = True
                if p.layout == S.LAYOUT_FLAT_PLAIN:
                    p.nblocks = (d.size + BS - 1) >> BITS
            else:
                raise FormatError(f"unsupported file data type {type(d).__name__}")
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            p.size = 0
        else:
            raise FormatError(f"unsupported file mode {mode:o}")

        p.extended = (
            ino.mtime != build_time
            or ino.mtime_nsec != build_time_nsec
            or ino.uid > 0xFFFF
            or ino.gid > 0xFFFF
            or p.nlink > 0xFFFF
            or p.size > 0xFFFFFFFF
        )
        if ino.uid < 0 or ino.gid < 0 or ino.uid > U32 or ino.gid > U32:
            raise FormatError(f"uid/gid out of range: {ino.uid}/{ino.gid}")
        if not 0 <= ino.mtime_nsec < 1_000_000_000:
            raise FormatError(f"mtime_nsec out of range: {ino.mtime_nsec}")
        if not -(1 << 63) <= ino.mtime < (1 << 63):
            raise FormatError(f"mtime out of range: {ino.mtime}")
        if fmt in (stat.S_IFCHR, stat.S_IFBLK) and (
            not 0 <= ino.rdev < (1 << 64) or os.major(ino.rdev) > 0xFFF or os.minor(ino.rdev) > 0xFFFFF
        ):
            raise FormatError(f"device number {ino.rdev:#x} does not fit EROFS (major < 4096, minor < 2^20)")
        p.isize = 64 if p.extended else 32

    # -- pass 2: place inodes in the metadata area ----------------------------------------
    devt_off = S.SB_OFFSET + 128
    pos = devt_off + 128 * len(devices)
    pos = (pos + 31) & ~31
    for p in order:
        base = p.isize + p.xattr_isize
        fmt = stat.S_IFMT(p.inode.mode)
        tail = 0
        if fmt in (stat.S_IFDIR, stat.S_IFLNK) and p.size % BS:
            tail = p.size % BS
            if base + tail > BS:
                tail = 0  # cannot keep inode + tail in one block: tail gets its own block
        if tail:
            room = BS - (pos % BS)
            if base + tail > room:
                pos = (pos + BS - 1) & ~(BS - 1)  # start a fresh block: the tail may not cross one
            p.layout = S.LAYOUT_FLAT_INLINE
            p.tail_len = tail
            p.nblocks = p.size >> BITS
            meta = base + tail
        elif p.layout == S.LAYOUT_CHUNK_BASED:
            assert p.chunks is not None
            meta = ((base + 7) & ~7) + 8 * len(p.chunks)
        else:
            if fmt in (stat.S_IFDIR, stat.S_IFLNK):
                p.nblocks = (p.size + BS - 1) >> BITS
            meta = base
        p.pos = pos
        p.nid = pos >> S.ISLOT_BITS
        p.meta_len = meta
        pos = (pos + meta + 31) & ~31
    meta_end = pos
    if order[0].nid > 0xFFFF:
        raise FormatError("root NID exceeds 16 bits (device table too large)")
    meta_blocks = (meta_end + BS - 1) >> BITS
    xattr_blkaddr = meta_blocks if shared_bytes else 0
    next_blk = meta_blocks + ((shared_bytes + BS - 1) >> BITS)

    # -- pass 3: data blocks --------------------------------------------------------------
    for p in order:
        if p.nblocks:
            p.blkaddr = next_blk
            next_blk += p.nblocks
    for p in order:
        d = p.inode.data
        if isinstance(d, TailedBlockMap) and d.tail:
            assert p.chunks is not None
            p.chunks[-1] = next_blk  # the copied tail lives in this image
            next_blk += 1
        elif p.layout == S.LAYOUT_CHUNK_BASED and isinstance(d, SpooledData):
            assert p.chunks is not None
            cs = 1 << p.chunk_bits
            for i, c in enumerate(p.chunks):
                if c is not None:
                    plen = min(cs, ((p.size - i * cs + BS - 1) >> BITS) << BITS)
                    p.chunks[i] = next_blk
                    next_blk += plen >> BITS
    total_blocks = next_blk
    if total_blocks > U32:
        raise FormatError("image exceeds 2^32 blocks")

    return Layout(order, shared_keys, shared_ids, meta_blocks, xattr_blkaddr, total_blocks, any_chunked,
                   devt_off)
