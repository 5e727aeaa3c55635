"""The bytes of one pcluster of a compressed file: lz4 the way the kernel's EROFS decodes it.

An lz4 pcluster is ONE raw lz4 block (no frame, no size prefix) placed at the END of its
blocks, zero bytes before it (the ZERO_PADDING feature, which every image bdserver reads or
writes has): the decoder skips the zeros of the first block and decodes the rest to exactly the
extent's length. A raw (PLAIN) pcluster holds the extent's bytes at its start ("shifted"), or
at the extent's offset inside the block, wrapping around ("interlaced").

Compression here is fixed *input*: an extent is a run of whole blocks of the file compressed
into as few blocks as it needs (big pclusters), and stored raw when that saves no block. The lz4
library is pinned (pyproject.toml): the same input gives the same bytes.
"""

from __future__ import annotations

import lz4.block

from bdserver.errors import FormatError

LZ4_HC_LEVEL = 9  # lz4hc's default level


def decode_lz4(pcluster: bytes, length: int, block_size: int, *, what: str) -> bytes:
    """The `length` bytes an lz4 pcluster (zero padding first) decodes to."""
    head = pcluster[:block_size]
    pad = len(head) - len(head.lstrip(b"\0"))
    if pad == len(head):
        raise FormatError(f"{what}: the first block of an lz4 pcluster is all zero padding")
    try:
        out = lz4.block.decompress(pcluster[pad:], uncompressed_size=length)
    except lz4.block.LZ4BlockError as e:
        raise FormatError(f"{what}: lz4 data does not decode: {e}") from None
    if len(out) != length:
        raise FormatError(f"{what}: lz4 data decodes to {len(out)} bytes, the extent has {length}")
    return out


def decode_plain(pcluster: bytes, lstart: int, length: int, block_size: int, *, interlaced: bool) -> bytes:
    """A raw extent's bytes: from the pcluster's start, or (interlaced) from the extent's offset
    inside its block, the rest wrapping to the pcluster's start."""
    if not interlaced:
        return pcluster[:length]
    ofs = lstart % block_size
    first = pcluster[ofs : ofs + length]
    return first + pcluster[: length - len(first)]


def compress_lz4(data: bytes, block_size: int, *, hc: bool = True) -> bytes | None:
    """`data` as an lz4 pcluster (padded at the head to whole blocks), or None when it would
    take as many blocks as the data itself."""
    if hc:
        raw = lz4.block.compress(data, mode="high_compression", compression=LZ4_HC_LEVEL, store_size=False)
    else:
        raw = lz4.block.compress(data, store_size=False)
    blocks = -(-len(raw) // block_size)
    if blocks >= -(-len(data) // block_size):
        return None
    return bytes(blocks * block_size - len(raw)) + raw


__all__ = ["compress_lz4", "decode_lz4", "decode_plain"]
