"""Layout of an EROFS image: which inode goes where, which layout each one gets, which
blocks its data take. Pure computation on the tree; `writer` turns the result into bytes.

Order: the root first (its NID must fit the superblock's 16 bits), then breadth-first in
sorted-name order, so a directory's children sit together and NIDs are stable. Placement:
inodes (with inline xattrs, chunk or lcluster indexes and inline dir/symlink tails) from byte
1152 (after the superblock, the lz4 config when big pclusters are used, and the device table), a tail never crossing a block; then the shared xattr
blocks; then data blocks in inode order.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from bdserver.errors import FormatError
from bdserver.erofs import structs as S
from bdserver.erofs.structs import DeviceSlot
from bdserver.erofs.tree import (
    BlockMap, CompressedData, CompressedMap, FileData, Inode, Segment, SpooledData, TailedBlockMap,
)
from bdserver.erofs.util import gc_paused
from bdserver.erofs.zmap import ZMap

BS = S.BLOCK_SIZE
BITS = S.BLKSZBITS
U32 = 0xFFFFFFFF
_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR


@dataclass(frozen=True)
class LayoutLimits:
    """What one image may make the layout allocate, whatever sizes the tree claims. A sparse
    file's logical size is free (a tar header says it); its chunk indexes and the image blocks
    its chunks take beyond its real data are not, so both are capped per image and a file is
    refused with FormatError before anything proportional to its logical size is allocated."""

    max_chunk_indexes: int = 1 << 23  # 8-byte chunk indexes in the whole image (64 MiB of metadata)
    max_sparse_overhead: int = 1 << 30  # image bytes sparse files take beyond their data


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
        "nblocks", "blkaddr", "chunk_bits", "chunks", "meta_len", "entries", "zmap", "zoffset", "data",
    )  # fmt: skip

    def __init__(self, inode: Inode, ino: int) -> None:
        self.inode = inode
        self.data = inode.data  # what the writer stores: the tree's data, or it compressed
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
        self.zmap: ZMap | None = None  # COMPRESSED_FULL: the extents
        self.zoffset = 0  # added to the extents' block addresses (the pclusters' place)
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


def _present_chunks(segs: Sequence[Segment], bits: int) -> Iterator[int]:
    """Indexes of the chunks of ``1 << bits`` bytes that hold data, ascending, each once."""
    last = -1
    for s in segs:
        a = max(s.file_offset >> bits, last + 1)
        last = max(last, (s.file_offset + s.length - 1) >> bits)
        yield from range(a, last + 1)


def _chunk_len(size: int, bits: int, i: int) -> int:
    """Bytes of image chunk ``i`` takes: whole chunks, the last one rounded up to blocks."""
    cs = 1 << bits
    return min(cs, ((size - i * cs + BS - 1) >> BITS) << BITS)


def _chunk_bits(size: int, segs: Sequence[Segment], max_chunks: int) -> int:
    """Pick a chunk size for a sparse file: minimise data bytes + 8-byte indexes, with at most
    `max_chunks` indexes (FormatError when no EROFS chunk size keeps within that)."""
    minbits = max(BITS, ((size - 1) // max(1, max_chunks)).bit_length())
    maxbits = min(max(BITS, (size - 1).bit_length()), BITS + S.CHUNK_FORMAT_BLKBITS_MASK)
    if minbits > BITS + S.CHUNK_FORMAT_BLKBITS_MASK:
        raise FormatError(f"a sparse file of {size} bytes would need more than {max_chunks} chunk indexes even "
                          "in the largest EROFS chunks (limit max_chunk_indexes)")
    best: tuple[int, int] | None = None
    for bits in range(minbits, max(minbits, maxbits) + 1):
        cs = 1 << bits
        n = (size + cs - 1) >> bits
        present = 0
        last = -1
        for s in segs:
            a = max(s.file_offset >> bits, last + 1)
            b = (s.file_offset + s.length - 1) >> bits
            if b >= a:
                present += b - a + 1
                last = b
        cost = present * cs + n * 8
        if best is None or cost < best[0]:
            best = (cost, bits)
    assert best is not None
    return best[1]


class _Budget:
    """Running totals of what the image allocates against `LayoutLimits`."""

    def __init__(self, limits: LayoutLimits) -> None:
        self.limits = limits
        self.chunk_indexes = 0
        self.overhead = 0

    @property
    def free_indexes(self) -> int:
        return max(1, self.limits.max_chunk_indexes - self.chunk_indexes)

    def indexes(self, n: int) -> None:
        self.chunk_indexes += n
        if self.chunk_indexes > self.limits.max_chunk_indexes:
            raise FormatError(f"the image needs more than {self.limits.max_chunk_indexes} chunk indexes "
                              "(limit max_chunk_indexes)")

    def sparse(self, size: int, covered: int, taken: int, bits: int) -> None:
        self.overhead += taken - covered
        if self.overhead > self.limits.max_sparse_overhead:
            raise FormatError(f"a sparse file of {size} bytes with {covered} bytes of data takes {taken} bytes "
                              f"of image in {1 << bits}-byte chunks; sparse files may take at most "
                              f"{self.limits.max_sparse_overhead} bytes beyond their data (limit max_sparse_overhead)")


def check_segments(d: SpooledData) -> list[Segment]:
    segs = [s for s in d.segments if s.length > 0]
    end = 0
    for s in segs:
        if s.file_offset < end or s.file_offset + s.length > d.size or s.source_offset < 0:
            raise FormatError("file segments overlap, are unsorted or exceed the file size")
        end = s.file_offset + s.length
    return segs


@dataclass(frozen=True)
class Compression:
    """What the superblock must say for the image's compressed inodes: lz4 with zero padding;
    big pclusters need the COMPR_CFGS area (an lz4 record) before the device table."""

    big_pcluster: bool
    max_distance: int
    max_pclusterblks: int

    @property
    def config_bytes(self) -> int:
        return S.Lz4Config.SIZE if self.big_pcluster else 0


def _compression(order: list[Plan]) -> Compression | None:
    zplans = [p for p in order if p.zmap is not None]
    if not zplans:
        return None
    big = any(p.zmap.advise & (S.Z_ADVISE_BIG_PCLUSTER_1 | S.Z_ADVISE_BIG_PCLUSTER_2) for p in zplans)  # type: ignore[union-attr]
    dist = max(getattr(p.data, "max_distance", S.LZ4_MAX_DISTANCE) for p in zplans)
    blocks = max((e.blocks for p in zplans for e in p.zmap.extents), default=1)  # type: ignore[union-attr]
    return Compression(big, dist, blocks)


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
    compression: Compression | None = None


def plan_image(
    root: Inode,
    *,
    build_time: int = 0,
    build_time_nsec: int = 0,
    devices: Sequence[DeviceSlot] = (),
    meta_only: bool = False,
    limits: LayoutLimits = LayoutLimits(),
) -> ImageInfo:
    """What `write_image` would produce, without writing: lets a caller learn the size of a
    merged metadata image (block addresses in `BlockMap`s do not change it) before it picks
    the layers' `mapped_blkaddr`s."""
    with gc_paused():
        lay = compute_layout(root, build_time, build_time_nsec, devices, meta_only, limits)
    return ImageInfo(blocks=lay.total_blocks, size=lay.total_blocks * BS, inodes=len(lay.order))


def compute_layout(
    root: Inode, build_time: int, build_time_nsec: int, devices: Sequence[DeviceSlot], meta_only: bool,
    limits: LayoutLimits = LayoutLimits(), stored: Mapping[int, FileData] | None = None,
) -> Layout:
    """The passes, in order: collect inodes, share xattrs, shape inodes, place them, allocate
    data blocks. Pure computation. `stored` (id of an inode -> data) replaces what the tree
    says a file holds with what the writer stores for it (its compressed form)."""
    order = _collect(root)
    if stored:
        for p in order:
            p.data = stored.get(id(p.inode), p.data)
    shared = _share_xattrs(order)
    any_chunked = _shape_inodes(order, shared, build_time, build_time_nsec, meta_only, limits)
    comp = _compression(order)
    devt_off = S.SB_OFFSET + 128 + (-(-comp.config_bytes // 128) * 128 if comp else 0)
    meta_end = _place_inodes(order, devt_off + 128 * len(devices))
    meta_blocks = (meta_end + BS - 1) >> BITS
    xattr_blkaddr = meta_blocks if shared.size else 0
    total_blocks = _allocate_blocks(order, meta_blocks + ((shared.size + BS - 1) >> BITS))
    return Layout(order, shared.keys, shared.ids, meta_blocks, xattr_blkaddr, total_blocks, any_chunked, devt_off,
                  comp)


@dataclass
class _SharedXattrs:
    """The shared xattr area: its entries in order, each one's id (4-byte units), its size."""

    keys: list[bytes]
    ids: dict[bytes, int]
    size: int


def _share_xattrs(order: list[Plan]) -> _SharedXattrs:
    """Encode every inode's xattrs; an entry that two or more inodes carry goes to the shared
    area once (EROFS stores it by id) instead of inline in each."""
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
    keys = sorted(k for k, c in xcount.items() if c >= 2 and len(k) > 4)
    ids: dict[bytes, int] = {}
    off = 0
    for k in keys:
        ids[k] = off // 4
        off += len(k)
    return _SharedXattrs(keys, ids, off)


def _shape_inodes(order: list[Plan], shared: _SharedXattrs, build_time: int, build_time_nsec: int,
                  meta_only: bool, limits: LayoutLimits) -> bool:
    """Each inode's shape: xattr body, size, data layout, compact or extended. Returns whether
    any inode is chunk-based (the superblock says so)."""
    budget = _Budget(limits)
    for p in order:
        _split_xattrs(p, shared.ids)
        fmt = stat.S_IFMT(p.inode.mode)
        if fmt == stat.S_IFDIR:
            _dir_layout(p)
        elif fmt == stat.S_IFLNK:
            _shape_symlink(p)
        elif fmt == stat.S_IFREG:
            _shape_regular(p, meta_only, budget)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            p.size = 0
        else:
            raise FormatError(f"unsupported file mode {p.inode.mode:o}")
        _shape_attrs(p, build_time, build_time_nsec)
    return any(p.layout == S.LAYOUT_CHUNK_BASED for p in order)


def _split_xattrs(p: Plan, shared_ids: dict[bytes, int]) -> None:
    if p.xattr_items:
        inline = [e for e in p.xattr_items if e not in shared_ids]
        p.xattr_shared = [e for e in p.xattr_items if e in shared_ids]
        p.xattr_items = inline
        body = 12 + 4 * len(p.xattr_shared) + sum(len(e) for e in inline)
        if body > 12 + 4 * 0xFFFE:
            raise FormatError("too many xattrs on one inode for EROFS")
        p.xattr_isize = body


def _shape_symlink(p: Plan) -> None:
    target = p.inode.symlink
    p.size = len(target)
    if not target or len(target) >= 4096 or b"\0" in target:
        raise FormatError(f"symlink target must be 1..4095 bytes without NUL: {target[:80]!r}")


def _shape_regular(p: Plan, meta_only: bool, budget: _Budget) -> None:
    """Size and layout of a regular file from its data: chunk-based for data already on the
    device (block maps) and for sparse spooled data, flat otherwise."""
    d = p.data
    if d is not None and not 0 <= d.size < 1 << 63:  # the kernel's i_size is a signed loff_t
        raise FormatError(f"file size {d.size} does not fit EROFS (must be below 2**63)")
    if d is None or d.size == 0:
        p.size = 0
    elif isinstance(d, BlockMap):
        p.size = d.size
        if not BITS <= d.chunk_bits <= BITS + S.CHUNK_FORMAT_BLKBITS_MASK:
            raise FormatError(f"BlockMap chunk_bits {d.chunk_bits} out of range")
        n = (d.size + (1 << d.chunk_bits) - 1) >> d.chunk_bits
        if len(d.blocks) != n:
            raise FormatError(f"BlockMap has {len(d.blocks)} chunks, size needs {n}")
        budget.indexes(n)
        p.layout = S.LAYOUT_CHUNK_BASED
        p.chunk_bits = d.chunk_bits
        p.chunks = list(d.blocks)
    elif isinstance(d, TailedBlockMap):
        p.size = d.size
        if len(d.blocks) != d.size >> BITS or len(d.tail) != d.size % BS:
            raise FormatError(
                f"TailedBlockMap of {d.size} bytes needs {d.size >> BITS} blocks and a "
                f"{d.size % BS}-byte tail, got {len(d.blocks)} and {len(d.tail)}"
            )
        budget.indexes(len(d.blocks) + (1 if d.tail else 0))
        p.layout = S.LAYOUT_CHUNK_BASED
        p.chunk_bits = BITS
        p.chunks = list(d.blocks) + ([0] if d.tail else [])  # tail block: allocated with the data
    elif isinstance(d, CompressedMap):
        p.size = d.size
        _shape_compressed(p, d.zmap, budget)
        p.zoffset = d.block_offset
    elif isinstance(d, CompressedData):
        if meta_only:
            raise ValueError("meta_only image got a regular file with compressed data")
        p.size = d.size
        _shape_compressed(p, d.zmap, budget)
        p.nblocks = d.zmap.blocks  # its pclusters, placed with the flat data; zoffset = blkaddr
    elif isinstance(d, SpooledData):
        if meta_only:
            raise ValueError("meta_only image got a regular file with spooled data")
        p.size = d.size
        _shape_spooled(p, d, budget)
    else:
        raise FormatError(f"unsupported file data type {type(d).__name__}")


def _shape_compressed(p: Plan, zm: ZMap, budget: _Budget) -> None:
    if zm.size != p.size or not 0 < zm.size:
        raise FormatError(f"compressed map of {zm.size} bytes for a file of {p.size}")
    budget.indexes(((zm.size + BS - 1) >> BITS) + 1)
    p.layout = S.LAYOUT_COMPRESSED_FULL
    p.zmap = zm


def zindex_bytes(size: int) -> int:
    """Bytes of a COMPRESSED_FULL inode's map after its inline xattrs (from an 8-aligned start):
    the map header, 8 reserved bytes, an index per lcluster and one zero index after them."""
    return S.ZMapHeader.SIZE + 8 + 8 * (((size + BS - 1) >> BITS) + 1)


def _shape_spooled(p: Plan, d: SpooledData, budget: _Budget) -> None:
    """Spooled bytes: chunk-based when the best chunk size leaves a chunk as a hole, within
    the budget; flat otherwise."""
    segs = check_segments(d)
    covered = sum(s.length for s in segs)
    if covered < d.size:
        bits = _chunk_bits(d.size, segs, budget.free_indexes)
        n = (d.size + (1 << bits) - 1) >> bits
        taken = sum(_chunk_len(d.size, bits, i) for i in _present_chunks(segs, bits))
        if taken < d.size:  # some chunk is a hole: CHUNK_BASED, else FLAT_PLAIN
            budget.indexes(n)
            budget.sparse(d.size, covered, taken, bits)
            p.layout = S.LAYOUT_CHUNK_BASED
            p.chunk_bits = bits
            p.chunks = [None] * n
            for i in _present_chunks(segs, bits):
                p.chunks[i] = 0  # allocated with the data
            return
    p.nblocks = (d.size + BS - 1) >> BITS


def _shape_attrs(p: Plan, build_time: int, build_time_nsec: int) -> None:
    """Compact (32 bytes) when mtime, ids, nlink and size fit it, else extended; refuse what
    neither can hold."""
    ino = p.inode
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
    if stat.S_IFMT(ino.mode) in (stat.S_IFCHR, stat.S_IFBLK) and (
        not 0 <= ino.rdev < (1 << 64) or os.major(ino.rdev) > 0xFFF or os.minor(ino.rdev) > 0xFFFFF
    ):
        raise FormatError(f"device number {ino.rdev:#x} does not fit EROFS (major < 4096, minor < 2^20)")
    p.isize = 64 if p.extended else 32


def _place_inodes(order: list[Plan], start: int) -> int:
    """Give each inode its position (and NID) in the metadata area from byte `start`, with its
    inline xattrs, chunk indexes and inline directory/symlink tail (a tail never crosses a
    block). Returns the end of the metadata."""
    pos = (start + 31) & ~31
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
        elif p.layout == S.LAYOUT_COMPRESSED_FULL:
            meta = ((base + 7) & ~7) + zindex_bytes(p.size)
        else:
            if fmt in (stat.S_IFDIR, stat.S_IFLNK):
                p.nblocks = (p.size + BS - 1) >> BITS
            meta = base
        p.pos = pos
        p.nid = pos >> S.ISLOT_BITS
        p.meta_len = meta
        pos = (pos + meta + 31) & ~31
    if order[0].nid > 0xFFFF:
        raise FormatError("root NID exceeds 16 bits (device table too large)")
    return pos


def _allocate_blocks(order: list[Plan], next_blk: int) -> int:
    """Data blocks from `next_blk` on, in inode order: flat runs first, then the chunks of
    chunk-based files that this image holds (sparse data, copied tails). Returns the image's
    size in blocks."""
    for p in order:
        if p.nblocks:
            p.blkaddr = next_blk
            next_blk += p.nblocks
            if isinstance(p.data, CompressedData):
                p.zoffset = p.blkaddr
    for p in order:
        d = p.data
        if isinstance(d, TailedBlockMap) and d.tail:
            assert p.chunks is not None
            p.chunks[-1] = next_blk  # the copied tail lives in this image
            next_blk += 1
        elif p.layout == S.LAYOUT_CHUNK_BASED and isinstance(d, SpooledData):
            assert p.chunks is not None
            for i, c in enumerate(p.chunks):
                if c is not None:
                    p.chunks[i] = next_blk
                    next_blk += _chunk_len(p.size, p.chunk_bits, i) >> BITS
    if next_blk > U32:
        raise FormatError("image exceeds 2^32 blocks")
    return next_blk
