"""The writer's lz4 pass: which files of a tree EROFS stores compressed, and their pclusters.

Every regular file with more than a block of data and no holes is cut into extents of
`EXTENT_BYTES` (whole blocks; the last one shorter), each compressed on its own into as few
blocks as it needs (a big pcluster), or kept raw block by block when that saves nothing
(erofs/zdata.py). A file that would save no block at all, a sparse file (its holes stay holes)
and a small file stay uncompressed. The pclusters go to a spool in file order; the writer copies
them into the image and writes FULL lcluster indexes (erofs/zmap.py). Deterministic: the same
tree gives the same bytes (the lz4 library is pinned).
"""

from __future__ import annotations

import os
from typing import BinaryIO

from bdserver.erofs import structs as S
from bdserver.erofs.layout import check_segments
from bdserver.erofs.tree import CompressedData, Inode, SpooledData
from bdserver.erofs.zdata import compress_lz4
from bdserver.erofs.zmap import ZExtent, ZMap

BS = S.BLOCK_SIZE
EXTENT_BYTES = 64 << 10  # decompressed bytes per pcluster: a 4 KiB read decodes at most this much


def compress_tree(root: Inode, spool: BinaryIO, *, extent_bytes: int = EXTENT_BYTES,
                  hc: bool = True) -> dict[int, CompressedData]:
    """The compressed form of each file of `root` worth compressing, by id() of its inode
    (hardlinks: one inode, compressed once); pclusters appended to `spool`."""
    if extent_bytes % BS or extent_bytes <= 0:
        raise ValueError("extent_bytes must be a positive multiple of the block size")
    out: dict[int, CompressedData] = {}
    for _, ino in root.walk():
        d = ino.data
        if id(ino) in out or not isinstance(d, SpooledData) or d.size <= BS:
            continue
        segs = check_segments(d)
        if len(segs) != 1 or segs[0].length != d.size:
            continue  # sparse: a hole would be compressed zeros; keep the chunk-based holes
        got = _compress_file(d.source, segs[0].source_offset, d.size, spool, extent_bytes, hc)
        if got is not None:
            out[id(ino)] = got
    return out


def _pread(src: BinaryIO, offset: int, n: int) -> bytes:
    try:
        fd = src.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd >= 0 and getattr(src, "_rolled", True) is not False:
        src.flush()
        return os.pread(fd, n, offset)
    src.seek(offset)
    return src.read(n)


def _compress_file(src: BinaryIO, offset: int, size: int, spool: BinaryIO, extent_bytes: int,
                   hc: bool) -> CompressedData | None:
    extents: list[ZExtent] = []
    pieces: list[bytes] = []
    blk = 0
    for start in range(0, size, extent_bytes):
        data = _pread(src, offset + start, min(extent_bytes, size - start))
        if len(data) != min(extent_bytes, size - start):
            raise OSError("spool file is shorter than its segments say")
        packed = compress_lz4(data, BS, hc=hc)
        if packed is not None:
            extents.append(ZExtent(start, S.LCLUSTER_HEAD1, blk, len(packed) // BS))
            pieces.append(packed)
            blk += len(packed) // BS
            continue
        for o in range(0, len(data), BS):  # raw, one block per extent
            extents.append(ZExtent(start + o, S.LCLUSTER_PLAIN, blk, 1))
            pieces.append(data[o : o + BS].ljust(BS, b"\0"))
            blk += 1
    if blk >= -(-size // BS):
        return None
    big = any(e.blocks > 1 for e in extents)
    zm = ZMap(size, S.Z_ADVISE_BIG_PCLUSTER_1 if big else 0, S.COMPR_LZ4, tuple(extents))
    at = spool.seek(0, os.SEEK_END)
    for piece in pieces:
        spool.write(piece)
    spool.flush()
    return CompressedData(spool, at, zm)


__all__ = ["EXTENT_BYTES", "compress_tree"]
