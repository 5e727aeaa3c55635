"""Chunked, compressed, seekable layer blobs and their chunk indexes (EROFS image layer spec §3.4).

Knows no EROFS: a blob is an opaque byte stream cut into chunks.
"""

from bdserver.blob.chunked import (
    DEFAULT_CHUNK_SIZE,
    MEDIA_TYPE_RAW,
    MEDIA_TYPE_ZSTD,
    ChunkedBlobInfo,
    annotations,
    write_chunked_raw,
    write_chunked_zstd,
)
from bdserver.blob.chunkindex import ChunkEntry, ChunkIndex, ChunkIndexHeader
from bdserver.blob.reader import ChunkedBlob, ChunkedBlobReader, load_index

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MEDIA_TYPE_RAW",
    "MEDIA_TYPE_ZSTD",
    "ChunkEntry",
    "ChunkIndex",
    "ChunkIndexHeader",
    "ChunkedBlob",
    "ChunkedBlobInfo",
    "ChunkedBlobReader",
    "annotations",
    "load_index",
    "write_chunked_raw",
    "write_chunked_zstd",
]
