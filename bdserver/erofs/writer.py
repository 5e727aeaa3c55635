"""Write a `tree.Inode` tree as an uncompressed EROFS image (4 KiB blocks).

Layout (meta_blkaddr = 0, so NIDs count 32-byte slots from byte 0):

    block 0: [1 KiB zero][superblock][device table][root inode, other inodes ...]
    ...      inodes with inline xattrs, chunk indexes, inline dir/symlink tails
    shared xattr blocks (xattr_blkaddr)
    data blocks: directory blocks, symlink blocks, regular file data

Why this shape: the root inode comes first so its NID fits the superblock's 16 bits; regular
file data is never tail-inlined so that every byte of a layer is block-addressable and a merged
metadata image can point at it; everything is laid out in one deterministic pass (inodes in
breadth-first sorted-name order) so the same tree always yields the same bytes. Only metadata
is held in memory; file bytes are streamed (copy_file_range when both sides are real files).
"""

from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO, Sequence

from bdserver.errors import FormatError
from bdserver.erofs import structs as S
from bdserver.erofs.structs import DeviceSlot
from bdserver.erofs.tree import BlockMap, Inode, Segment, SpooledData
from bdserver.erofs.util import gc_paused

__all__ = ["ImageInfo", "DeviceSlot", "plan_image", "write_image"]

BS = S.BLOCK_SIZE
BITS = S.BLKSZBITS
_DIRENT = struct.Struct("<QHBB")
_CHUNK = struct.Struct("<HHI")
_COMPACT = S.InodeCompact.STRUCT
_EXTENDED = S.InodeExtended.STRUCT
_U32 = 0xFFFFFFFF
_COPY_BUF = 1 << 20


@dataclass(frozen=True)
class ImageInfo:
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


def _file_type(mode: int) -> int:
    return _FILE_TYPES.get(stat.S_IFMT(mode), S.FT_UNKNOWN)


class _Plan:
    """Per-inode layout decisions, filled in by the passes of `write_image`."""

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
        self.parent: _Plan | None = None
        self.extended = False
        self.layout = S.LAYOUT_FLAT_PLAIN
        self.isize = 32
        self.xattr_items: list[bytes] = []  # encoded inline entries (header+name+value+pad)
        self.xattr_shared: list[bytes] = []  # encoded entries that live in the shared area
        self.xattr_isize = 0
        self.size = 0
        self.dir_blocks: list[list[tuple[bytes, "_Plan"]]] | None = None
        self.tail_len = 0  # bytes stored inline after inode+xattrs
        self.nblocks = 0  # data blocks in the data area (FLAT_* layouts)
        self.blkaddr = 0
        self.chunk_bits = 0
        self.chunks: list[int | None] | None = None  # CHUNK_BASED: block per chunk
        self.meta_len = 0
        self.entries: list[tuple[bytes, "_Plan"]] | None = None


def _check_name(name: bytes) -> None:
    if not isinstance(name, bytes):
        raise FormatError(f"file names must be bytes, got {type(name).__name__}")
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > S.NAME_MAX:
        raise FormatError(f"invalid file name for EROFS: {name[:80]!r}")


def _collect(root: Inode) -> list[_Plan]:
    """Breadth-first, sorted names: stable NIDs; a directory's children sit together."""
    if not root.is_dir or root.children is None:
        raise FormatError("the root of an EROFS tree must be a directory")
    plans: dict[int, _Plan] = {}
    order: list[_Plan] = []
    rp = _Plan(root, 1)
    rp.parent = rp
    plans[id(root)] = rp
    order.append(rp)
    queue = [rp]
    qi = 0
    while qi < len(queue):
        dp = queue[qi]
        qi += 1
        children = dp.inode.children or {}
        entries: list[tuple[bytes, _Plan]] = []
        subdirs = 0
        for name in sorted(children):
            _check_name(name)
            child = children[name]
            cp = plans.get(id(child))
            if child.is_dir:
                if cp is not None:
                    raise FormatError(f"directory {name!r} appears twice in the tree (hardlinked directory)")
                cp = _Plan(child, len(order) + 1)
                cp.parent = dp
                plans[id(child)] = cp
                order.append(cp)
                queue.append(cp)
                subdirs += 1
            elif cp is None:
                cp = _Plan(child, len(order) + 1)
                plans[id(child)] = cp
                order.append(cp)
            if not child.is_dir:
                cp.nlink += 1
            entries.append((name, cp))
        dp.nlink = 2 + subdirs
        dp.entries = entries
    return order


def _dir_layout(p: _Plan) -> None:
    """Split the sorted entries (with "." and "..") into directory blocks."""
    assert p.entries is not None and p.parent is not None
    allents = p.entries + [(b".", p), (b"..", p.parent)]
    allents.sort(key=lambda e: e[0])
    blocks: list[list[tuple[bytes, _Plan]]] = []
    cur: list[tuple[bytes, _Plan]] = []
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


def _check_segments(d: SpooledData) -> list[Segment]:
    segs = [s for s in d.segments if s.length > 0]
    end = 0
    for s in segs:
        if s.file_offset < end or s.file_offset + s.length > d.size or s.source_offset < 0:
            raise FormatError("file segments overlap, are unsorted or exceed the file size")
        end = s.file_offset + s.length
    return segs


class _Sink:
    """Positional writes to the output, through the fd when there is one."""

    def __init__(self, out: BinaryIO, base: int) -> None:
        self.out = out
        self.base = base
        self.fd: int | None = None
        self.use_cfr = True
        try:
            out.flush()
            self.fd = out.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            self.fd = None

    def pwrite(self, data: bytes | bytearray | memoryview, off: int) -> None:
        off += self.base
        if self.fd is not None:
            mv = memoryview(data)
            while mv:
                n = os.pwrite(self.fd, mv, off)
                mv = mv[n:]
                off += n
        else:
            self.out.seek(off)
            self.out.write(data)

    def copy(self, src: BinaryIO, src_off: int, off: int, n: int) -> None:
        src_fd = _real_fd(src)
        if src_fd is not None and self.fd is not None and self.use_cfr:
            try:
                self._copy_fd(src_fd, src_off, off + self.base, n)
                return
            except OSError:
                # EXDEV (different filesystems, 5.19+), EINVAL, ENOSYS: copy through a buffer,
                # and stop trying for this image.
                self.use_cfr = False
        while n > 0:
            want = min(n, _COPY_BUF)
            if src_fd is not None:
                buf = os.pread(src_fd, want, src_off)
            else:
                src.seek(src_off)
                buf = src.read(want)
            if len(buf) != want:
                raise FormatError("spool file is shorter than its segments say")
            self.pwrite(buf, off)
            src_off += want
            off += want
            n -= want

    def _copy_fd(self, src_fd: int, src_off: int, off: int, n: int) -> None:
        assert self.fd is not None
        while n > 0:
            done = os.copy_file_range(src_fd, self.fd, min(n, 1 << 30), src_off, off)
            if done <= 0:
                raise FormatError("spool file is shorter than its segments say")
            src_off += done
            off += done
            n -= done


def _real_fd(f: BinaryIO) -> int | None:
    if getattr(f, "_rolled", True) is False:  # SpooledTemporaryFile still in memory
        return None
    try:
        f.flush()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    try:
        return f.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


@dataclass
class _Layout:
    order: list[_Plan]
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
        lay = _layout(root, build_time, build_time_nsec, devices, meta_only)
    return ImageInfo(blocks=lay.total_blocks, size=lay.total_blocks * BS, inodes=len(lay.order))


def _layout(
    root: Inode, build_time: int, build_time_nsec: int, devices: Sequence[DeviceSlot], meta_only: bool
) -> _Layout:
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
            elif isinstance(d, SpooledData):
                if meta_only:
                    raise ValueError("meta_only image got a regular file with spooled data")
                p.size = d.size
                segs = _check_segments(d)
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
        if ino.uid < 0 or ino.gid < 0 or ino.uid > _U32 or ino.gid > _U32:
            raise FormatError(f"uid/gid out of range: {ino.uid}/{ino.gid}")
        if not 0 <= ino.mtime_nsec < 1_000_000_000:
            raise FormatError(f"mtime_nsec out of range: {ino.mtime_nsec}")
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
        if p.layout == S.LAYOUT_CHUNK_BASED and isinstance(p.inode.data, SpooledData):
            assert p.chunks is not None
            cs = 1 << p.chunk_bits
            for i, c in enumerate(p.chunks):
                if c is not None:
                    plen = min(cs, ((p.size - i * cs + BS - 1) >> BITS) << BITS)
                    p.chunks[i] = next_blk
                    next_blk += plen >> BITS
    total_blocks = next_blk
    if total_blocks > _U32:
        raise FormatError("image exceeds 2^32 blocks")

    return _Layout(order, shared_keys, shared_ids, meta_blocks, xattr_blkaddr, total_blocks, any_chunked,
                   devt_off)


def write_image(
    root: Inode,
    out: BinaryIO,
    *,
    build_time: int = 0,
    build_time_nsec: int = 0,
    uuid: bytes = b"\0" * 16,
    volume_name: bytes = b"",
    devices: Sequence[DeviceSlot] = (),
    meta_only: bool = False,
) -> ImageInfo:
    """Write `root` as an EROFS image at the current position of the seekable `out`.

    `devices` become the superblock device table (device ids 1..N; tags must be non-empty so
    flatdev works on 6.4-6.6 kernels). With `meta_only`, a regular file whose bytes would have to
    be copied (`SpooledData` with data) is an error: merged metadata must only point at layers.
    The output is truncated at the image's end; bytes not written read as zeros.
    """
    if len(uuid) != 16:
        raise ValueError("uuid must be 16 bytes")
    if len(volume_name) > 15:
        raise ValueError("volume_name must be at most 15 bytes (6.1 kernels need a NUL)")
    for d in devices:
        if not d.tag or len(d.tag) > 64:
            raise ValueError("device tags must be 1..64 bytes")

    with gc_paused():
        return _write(root, out, build_time, build_time_nsec, uuid, volume_name, devices, meta_only)


def _write(
    root: Inode,
    out: BinaryIO,
    build_time: int,
    build_time_nsec: int,
    uuid: bytes,
    volume_name: bytes,
    devices: Sequence[DeviceSlot],
    meta_only: bool,
) -> ImageInfo:
    lay = _layout(root, build_time, build_time_nsec, devices, meta_only)
    order, shared_keys, shared_ids = lay.order, lay.shared_keys, lay.shared_ids
    meta_blocks, xattr_blkaddr, total_blocks = lay.meta_blocks, lay.xattr_blkaddr, lay.total_blocks
    any_chunked, devt_off = lay.any_chunked, lay.devt_off

    # -- pass 4: metadata bytes -----------------------------------------------------------
    meta = bytearray(meta_blocks * BS)
    sink = _Sink(out, out.tell())
    try:
        out.truncate(sink.base)
    except (OSError, io.UnsupportedOperation):
        pass
    for i, d in enumerate(devices):
        meta[devt_off + 128 * i : devt_off + 128 * (i + 1)] = d.pack()
    for p in order:
        _emit_inode(p, meta, shared_ids)
    sb = S.Superblock(
        feature_compat=S.COMPAT_SB_CHKSUM | S.COMPAT_MTIME,
        root_nid=order[0].nid,
        inos=len(order),
        build_time=build_time,
        build_time_nsec=build_time_nsec,
        blocks=total_blocks,
        meta_blkaddr=0,
        xattr_blkaddr=xattr_blkaddr,
        uuid=uuid,
        volume_name=volume_name,
        feature_incompat=(S.INCOMPAT_CHUNKED_FILE if any_chunked else 0)
        | (S.INCOMPAT_DEVICE_TABLE if devices else 0),
        extra_devices=len(devices),
        devt_slotoff=(devt_off // 128) if devices else 0,
    )
    meta[S.SB_OFFSET : S.SB_OFFSET + 128] = sb.pack()
    struct.pack_into("<I", meta, S.SB_OFFSET + 4, S.sb_checksum(meta))
    sink.pwrite(meta, 0)
    del meta

    if shared_keys:
        sink.pwrite(b"".join(shared_keys), xattr_blkaddr * BS)

    # -- pass 5: data ---------------------------------------------------------------------
    for p in order:
        fmt = stat.S_IFMT(p.inode.mode)
        if fmt == stat.S_IFDIR and p.nblocks:
            sink.pwrite(_dir_bytes(p, 0, p.nblocks), p.blkaddr * BS)
        elif fmt == stat.S_IFLNK and p.nblocks:
            sink.pwrite(p.inode.symlink[: p.nblocks * BS], p.blkaddr * BS)
        elif fmt == stat.S_IFREG and isinstance(p.inode.data, SpooledData) and p.size:
            _emit_file(p, sink)
    end = total_blocks * BS
    if sink.fd is not None:
        os.ftruncate(sink.fd, sink.base + end)
        out.seek(sink.base + end)
    else:
        out.seek(sink.base + end - 1)
        cur = out.read(1)
        out.seek(sink.base + end - 1)
        out.write(cur or b"\0")
    return ImageInfo(blocks=total_blocks, size=end, inodes=len(order))


def _dir_bytes(p: _Plan, first: int, count: int) -> bytearray:
    """Directory blocks [first, first+count); the last block of the directory is cut short."""
    assert p.dir_blocks is not None
    nblk = len(p.dir_blocks)
    buf = bytearray(count * BS)
    for bi in range(first, first + count):
        ents = p.dir_blocks[bi]
        o = (bi - first) * BS
        nameoff = 12 * len(ents)
        for j, (name, cp) in enumerate(ents):
            _DIRENT.pack_into(buf, o + 12 * j, cp.nid, nameoff, _file_type(cp.inode.mode), 0)
            buf[o + nameoff : o + nameoff + len(name)] = name
            nameoff += len(name)
    if first + count == nblk and p.size % BS:
        del buf[(count - 1) * BS + p.size % BS :]
    return buf


def _emit_inode(p: _Plan, meta: bytearray, shared_ids: dict[bytes, int]) -> None:
    ino = p.inode
    fmt = stat.S_IFMT(ino.mode)
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        u = S.encode_rdev(ino.rdev)
    elif p.layout == S.LAYOUT_CHUNK_BASED:
        u = (p.chunk_bits - BITS) | S.CHUNK_FORMAT_INDEXES
    elif p.layout == S.LAYOUT_FLAT_INLINE and p.nblocks == 0:
        u = _U32
    elif p.nblocks:
        u = p.blkaddr
    else:
        u = 0
    fmtbits = (1 if p.extended else 0) | (p.layout << 1)
    icount = 0 if not p.xattr_isize else (p.xattr_isize - 12) // 4 + 1
    if p.extended:
        _EXTENDED.pack_into(meta, p.pos, fmtbits, icount, ino.mode & 0xFFFF, 0, p.size, u, p.ino,
                            ino.uid, ino.gid, ino.mtime, ino.mtime_nsec, p.nlink, b"")
    else:
        _COMPACT.pack_into(meta, p.pos, fmtbits, icount, ino.mode & 0xFFFF, p.nlink, p.size, 0, u,
                           p.ino, ino.uid, ino.gid, 0)
    o = p.pos + p.isize
    if p.xattr_isize:
        meta[o + 4] = len(p.xattr_shared)
        o += 12
        for e in p.xattr_shared:
            struct.pack_into("<I", meta, o, shared_ids[e])
            o += 4
        for e in p.xattr_items:
            meta[o : o + len(e)] = e
            o += len(e)
    if p.layout == S.LAYOUT_FLAT_INLINE:
        if fmt == stat.S_IFDIR:
            tail = _dir_bytes(p, p.nblocks, 1)
        else:
            tail = ino.symlink[p.nblocks * BS :]
        assert len(tail) == p.tail_len
        meta[o : o + p.tail_len] = tail
    elif p.layout == S.LAYOUT_CHUNK_BASED:
        assert p.chunks is not None
        o = (o + 7) & ~7
        for c in p.chunks:
            if c is not None and not 0 <= c < _U32:
                raise FormatError(f"chunk block address {c} does not fit 32 bits")
            _CHUNK.pack_into(meta, o, 0, 0, _U32 if c is None else c)
            o += 8


def _emit_file(p: _Plan, sink: _Sink) -> None:
    """Copy a spooled file's segments to its blocks (FLAT_PLAIN run or present chunks)."""
    d = p.inode.data
    assert isinstance(d, SpooledData)
    if p.layout == S.LAYOUT_FLAT_PLAIN:
        base = p.blkaddr * BS
        for s in d.segments:
            if s.length > 0:
                sink.copy(d.source, s.source_offset, base + s.file_offset, s.length)
        return
    assert p.chunks is not None
    bits = p.chunk_bits
    cs = 1 << bits
    for s in d.segments:
        fo, n, so = s.file_offset, s.length, s.source_offset
        while n > 0:
            ci = fo >> bits
            within = fo - (ci << bits)
            take = min(n, cs - within)
            blk = p.chunks[ci]
            assert blk is not None
            sink.copy(d.source, so, blk * BS + within, take)
            fo += take
            so += take
            n -= take
