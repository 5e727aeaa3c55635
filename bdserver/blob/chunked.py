"""Writers for chunk-indexed layer blobs (EROFS image layer spec §3.1-3.4).

`application/vnd.erofs+zstd`: one independent zstd frame per chunk, then (if the data end is not
4-byte aligned) a zero-padding skippable frame, then the chunk index in a skippable frame:

    [frame 0][frame 1]...[frame N-1][pad skippable frame?][index skippable frame]

`application/vnd.erofs` (raw): the image bytes unchanged, then the raw chunk-index payload.

Choices the spec leaves open, fixed here so output is byte-for-byte reproducible (§8.3):
* fixed-size chunks of `chunk_size` uncompressed bytes (default 128 KiB, a multiple of 4096 so a
  chunk is whole EROFS blocks); the last chunk is shorter.
* zstd: level 3, single-threaded, content size and the frame's xxhash checksum written, no
  dictionary id; output is stable for a given libzstd (pinned through the `zstandard` package).
* SHA-256 per chunk over its on-blob bytes (the compressed frame; §3.4.2).
* both skippable frames use magic 0x184D2A50. The pad frame sits between the last data frame and
  the index frame, so by §3.4.2 it belongs to the last chunk's on-blob bytes and is covered by that
  chunk's checksum; a standard zstd decoder skips it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from bdserver.digest import sha256_digest
from bdserver.blob.chunkindex import (
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    MEDIA_TYPE as CHUNK_INDEX_MEDIA_TYPE,
    ChunkEntry,
    ChunkIndex,
)

MEDIA_TYPE_RAW = "application/vnd.erofs"
MEDIA_TYPE_ZSTD = "application/vnd.erofs+zstd"
DEFAULT_CHUNK_SIZE = 128 * 1024
DEFAULT_LEVEL = 3
SKIPPABLE_MAGIC = 0x184D2A50
SKIPPABLE_MAGIC_MASK = 0xFFFFFFF0
SKIPPABLE_HEADER = struct.Struct("<II")

ANN_INDEX_RANGE = "org.erofs.chunk-index.range"
ANN_INDEX_DIGEST = "org.erofs.chunk-index.digest"
ANN_INDEX_MEDIA_TYPE = "org.erofs.chunk-index.mediaType"
ANN_UNCOMPRESSED_DIGEST = "org.erofs.uncompressed-digest"


@dataclass(frozen=True)
class ChunkedBlobInfo:
    """What a descriptor for the written blob needs. Digests are `sha256:<hex>`."""

    digest: str
    size: int
    uncompressed_digest: str
    uncompressed_size: int
    index_range: tuple[int, int]  # [start, end) of the chunk-index section in the blob
    index_digest: str  # over the payload (header + entries), not the frame header
    chunk_count: int
    chunk_size: int
    media_type: str = "application/vnd.erofs+zstd"


def skippable_frame(payload: bytes, magic: int = SKIPPABLE_MAGIC) -> bytes:
    return SKIPPABLE_HEADER.pack(magic, len(payload)) + payload


def is_skippable_magic(magic: int) -> bool:
    return magic & SKIPPABLE_MAGIC_MASK == SKIPPABLE_MAGIC


class _Out:
    """Counts and hashes everything written to the blob."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.pos = 0
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.out.write(view)
            if n is None:  # raw non-blocking streams are not supported
                raise OSError("short write to blob output")
            view = view[n:]
        self.sha.update(data)
        self.pos += len(data)


def _read_full(src: BinaryIO, n: int) -> bytes:
    """Read exactly n bytes unless EOF comes first (pipes and sockets return short reads)."""
    parts = []
    left = n
    while left:
        b = src.read(left)
        if not b:
            break
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size <= 0 or chunk_size % 4096:
        raise ValueError(f"chunk_size {chunk_size} must be a positive multiple of 4096")


def write_chunked_zstd(
    src: BinaryIO, out: BinaryIO, *, chunk_size: int = DEFAULT_CHUNK_SIZE, level: int = DEFAULT_LEVEL
) -> ChunkedBlobInfo:
    """Stream `src` into `out` as an `application/vnd.erofs+zstd` blob with an embedded index."""
    _check_chunk_size(chunk_size)
    cctx = zstandard.ZstdCompressor(
        level=level, write_checksum=True, write_content_size=True, write_dict_id=False, threads=0
    )
    w = _Out(out)
    usha = hashlib.sha256()
    usize = 0
    entries: list[ChunkEntry] = []
    pending: tuple[int, int, bytes] | None = None  # last chunk's entry waits for a possible pad
    pending_hash = None
    while True:
        data = _read_full(src, chunk_size)
        if not data:
            break
        usha.update(data)
        frame = cctx.compress(data)
        if pending is not None:
            entries.append(ChunkEntry(pending[0], pending[1], pending_hash.digest()))
        pending = (w.pos, usize, frame)
        pending_hash = hashlib.sha256(frame)
        w.write(frame)
        usize += len(data)
        if len(data) < chunk_size:
            break
    if w.pos % 4:
        pad = skippable_frame(b"\0" * ((-w.pos) % 4))
        assert pending is not None
        pending_hash.update(pad)
        w.write(pad)
    if pending is not None:
        entries.append(ChunkEntry(pending[0], pending[1], pending_hash.digest()))
    index = ChunkIndex.build(
        compression=COMPRESSION_ZSTD, uncompressed_size=usize, entries=entries, data_end=w.pos
    )
    payload = index.pack()
    start = w.pos
    w.write(skippable_frame(payload))
    return ChunkedBlobInfo(
        media_type=MEDIA_TYPE_ZSTD,
        digest="sha256:" + w.sha.hexdigest(),
        size=w.pos,
        uncompressed_digest="sha256:" + usha.hexdigest(),
        uncompressed_size=usize,
        index_range=(start, w.pos),
        index_digest=sha256_digest(payload),
        chunk_count=len(entries),
        chunk_size=chunk_size,
    )


def write_chunked_raw(src: BinaryIO, out: BinaryIO, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkedBlobInfo:
    """Stream `src` into `out` as a raw `application/vnd.erofs` blob with the index appended.

    Per spec §5.2 the DiffID (uncompressed digest) of a raw layer is the digest of the whole blob,
    index included; `uncompressed_digest` here is therefore equal to `digest`.
    """
    _check_chunk_size(chunk_size)
    w = _Out(out)
    entries: list[ChunkEntry] = []
    while True:
        data = _read_full(src, chunk_size)
        if not data:
            break
        entries.append(ChunkEntry(w.pos, w.pos, hashlib.sha256(data).digest()))
        w.write(data)
        if len(data) < chunk_size:
            break
    usize = w.pos
    index = ChunkIndex.build(
        compression=COMPRESSION_NONE, uncompressed_size=usize, entries=entries, data_end=usize
    )
    payload = index.pack()
    w.write(payload)
    digest = "sha256:" + w.sha.hexdigest()
    return ChunkedBlobInfo(
        media_type=MEDIA_TYPE_RAW,
        digest=digest,
        size=w.pos,
        uncompressed_digest=digest,
        uncompressed_size=usize,
        index_range=(usize, w.pos),
        index_digest=sha256_digest(payload),
        chunk_count=len(entries),
        chunk_size=chunk_size,
    )


def annotations(info: ChunkedBlobInfo) -> dict[str, str]:
    """The spec's descriptor annotations for a blob with an embedded chunk index (§2.3, §8.1.5/7).

    `org.erofs.chunk-index.mediaType` is omitted: consumers default it to the v1 type. The
    uncompressed digest is emitted for +zstd only (for raw it equals the descriptor digest).
    Roles and bdserver's own annotations are the caller's business.
    """
    ann = {
        ANN_INDEX_RANGE: f"{info.index_range[0]}:{info.index_range[1]}",
        ANN_INDEX_DIGEST: info.index_digest,
    }
    if info.media_type == MEDIA_TYPE_ZSTD:
        ann[ANN_UNCOMPRESSED_DIGEST] = info.uncompressed_digest
    return ann


__all__ = [
    "CHUNK_INDEX_MEDIA_TYPE",
    "ChunkedBlobInfo",
    "DEFAULT_CHUNK_SIZE",
    "MEDIA_TYPE_RAW",
    "MEDIA_TYPE_ZSTD",
    "annotations",
    "write_chunked_raw",
    "write_chunked_zstd",
]
