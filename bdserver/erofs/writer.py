"""Write a `tree.Inode` tree as an EROFS image (4 KiB blocks).

Layout (meta_blkaddr = 0, so NIDs count 32-byte slots from byte 0):

    block 0: [1 KiB zero][superblock][lz4 config][device table][root inode, other inodes ...]
    ...      inodes with inline xattrs, chunk or lcluster indexes, inline dir/symlink tails
    shared xattr blocks (xattr_blkaddr)
    data blocks: directory blocks, symlink blocks, regular file data

Why this shape: the root inode comes first so its NID fits the superblock's 16 bits; regular
file data is never tail-inlined so that every byte of a layer is block-addressable and a merged
metadata image can point at it; everything is laid out in one deterministic pass (inodes in
breadth-first sorted-name order) so the same tree always yields the same bytes. Only metadata
is held in memory; file bytes are streamed (copy_file_range when both sides are real files).
Compressed files (`CompressedMap`: a layer's lz4 extents the merged metadata points at;
`CompressedData`: pclusters compressed by `erofs.compress`) get COMPRESSED_FULL inodes.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import tempfile
from typing import BinaryIO, Sequence

from bdserver.errors import FormatError
from bdserver.erofs import structs as S
from bdserver.erofs.compress import compress_tree
from bdserver.erofs.layout import (
    BITS, BS, U32, ImageInfo, LayoutLimits, Plan, compute_layout, file_type, plan_image,
)
from bdserver.erofs.sink import Sink
from bdserver.erofs.structs import DeviceSlot
from bdserver.erofs.tree import CompressedData, Inode, SpooledData, TailedBlockMap
from bdserver.erofs.util import gc_paused
from bdserver.erofs.zmap import CARRIED_ADVISE, encode_full

__all__ = ["ImageInfo", "DeviceSlot", "LayoutLimits", "plan_image", "write_image"]

_DIRENT = struct.Struct("<QHBB")
_CHUNK = struct.Struct("<HHI")
_COMPACT = S.InodeCompact.STRUCT
_EXTENDED = S.InodeExtended.STRUCT


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
    limits: LayoutLimits = LayoutLimits(),
    compress: str = "none",
    tmpdir: str | None = None,
) -> ImageInfo:
    """Write `root` as an EROFS image at the current position of the seekable `out`.

    `devices` become the superblock device table (device ids 1..N; tags must be non-empty so
    flatdev works on 6.4-6.6 kernels). With `meta_only`, a regular file whose bytes would have to
    be copied (`SpooledData` with data) is an error: merged metadata must only point at layers.
    The output is truncated at the image's end; bytes not written read as zeros. `limits` caps
    what sparse files may make the image allocate (FormatError beyond). ``compress="lz4"``:
    files worth it are stored lz4-compressed (erofs/compress.py; pclusters spooled in `tmpdir`).
    """
    if len(uuid) != 16:
        raise ValueError("uuid must be 16 bytes")
    if len(volume_name) > 15:
        raise ValueError("volume_name must be at most 15 bytes (6.1 kernels need a NUL)")
    for d in devices:
        if not d.tag or len(d.tag) > 64:
            raise ValueError("device tags must be 1..64 bytes")
    if compress not in ("none", "lz4"):
        raise ValueError(f"unknown compression {compress!r}")

    with gc_paused(), tempfile.TemporaryFile(dir=tmpdir, prefix="bdserver-pclusters-") as spool:
        stored = compress_tree(root, spool) if compress == "lz4" else None
        return _write(root, out, build_time, build_time_nsec, uuid, volume_name, devices, meta_only, limits,
                      stored)


def _write(
    root: Inode,
    out: BinaryIO,
    build_time: int,
    build_time_nsec: int,
    uuid: bytes,
    volume_name: bytes,
    devices: Sequence[DeviceSlot],
    meta_only: bool,
    limits: LayoutLimits,
    stored: dict[int, CompressedData] | None,
) -> ImageInfo:
    lay = compute_layout(root, build_time, build_time_nsec, devices, meta_only, limits, stored)
    order, shared_keys, shared_ids = lay.order, lay.shared_keys, lay.shared_ids
    meta_blocks, xattr_blkaddr, total_blocks = lay.meta_blocks, lay.xattr_blkaddr, lay.total_blocks
    any_chunked, devt_off = lay.any_chunked, lay.devt_off

    # -- pass 4: metadata bytes -----------------------------------------------------------
    meta = bytearray(meta_blocks * BS)
    sink = Sink(out, out.tell())
    try:
        out.truncate(sink.base)
    except (OSError, io.UnsupportedOperation):
        pass
    comp = lay.compression
    if comp is not None and comp.big_pcluster:
        cfg = S.Lz4Config(max_distance=comp.max_distance, max_pclusterblks=comp.max_pclusterblks).pack()
        meta[S.SB_OFFSET + 128 : S.SB_OFFSET + 128 + len(cfg)] = cfg
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
        | (S.INCOMPAT_DEVICE_TABLE if devices else 0)
        | (S.INCOMPAT_ZERO_PADDING if comp else 0)
        | (S.INCOMPAT_COMPR_CFGS if comp and comp.big_pcluster else 0),
        u1=0 if comp is None else (1 << S.COMPR_LZ4) if comp.big_pcluster else comp.max_distance,
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
        elif fmt == stat.S_IFREG and isinstance(p.data, SpooledData) and p.size:
            _emit_file(p, sink)
        elif fmt == stat.S_IFREG and isinstance(p.data, CompressedData):
            sink.copy(p.data.source, p.data.source_offset, p.blkaddr * BS, p.nblocks * BS)
        elif fmt == stat.S_IFREG and isinstance(p.data, TailedBlockMap) and p.data.tail:
            assert p.chunks is not None and p.chunks[-1] is not None
            sink.pwrite(p.data.tail, p.chunks[-1] * BS)
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


def _dir_bytes(p: Plan, first: int, count: int) -> bytearray:
    """Directory blocks [first, first+count); the last block of the directory is cut short."""
    assert p.dir_blocks is not None
    nblk = len(p.dir_blocks)
    buf = bytearray(count * BS)
    for bi in range(first, first + count):
        ents = p.dir_blocks[bi]
        o = (bi - first) * BS
        nameoff = 12 * len(ents)
        for j, (name, cp) in enumerate(ents):
            _DIRENT.pack_into(buf, o + 12 * j, cp.nid, nameoff, file_type(cp.inode.mode), 0)
            buf[o + nameoff : o + nameoff + len(name)] = name
            nameoff += len(name)
    if first + count == nblk and p.size % BS:
        del buf[(count - 1) * BS + p.size % BS :]
    return buf


def _emit_inode(p: Plan, meta: bytearray, shared_ids: dict[bytes, int]) -> None:
    ino = p.inode
    fmt = stat.S_IFMT(ino.mode)
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        u = S.encode_rdev(ino.rdev)
    elif p.layout == S.LAYOUT_CHUNK_BASED:
        u = (p.chunk_bits - BITS) | S.CHUNK_FORMAT_INDEXES
    elif p.layout == S.LAYOUT_COMPRESSED_FULL:
        assert p.zmap is not None
        u = p.zmap.blocks
    elif p.layout == S.LAYOUT_FLAT_INLINE and p.nblocks == 0:
        u = U32
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
    elif p.layout == S.LAYOUT_COMPRESSED_FULL:
        assert p.zmap is not None
        o = (o + 7) & ~7
        hdr = S.ZMapHeader(advise=p.zmap.advise & CARRIED_ADVISE, algorithmtype=p.zmap.algorithmtype)
        meta[o : o + S.ZMapHeader.SIZE] = hdr.pack()
        index = encode_full(p.zmap, p.zoffset)
        o += S.ZMapHeader.SIZE + 8
        meta[o : o + len(index)] = index
    elif p.layout == S.LAYOUT_CHUNK_BASED:
        assert p.chunks is not None
        o = (o + 7) & ~7
        for c in p.chunks:
            if c is not None and not 0 <= c < U32:
                raise FormatError(f"chunk block address {c} does not fit 32 bits")
            _CHUNK.pack_into(meta, o, 0, 0, U32 if c is None else c)
            o += 8


def _emit_file(p: Plan, sink: Sink) -> None:
    """Copy a spooled file's segments to its blocks (FLAT_PLAIN run or present chunks)."""
    d = p.data
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
