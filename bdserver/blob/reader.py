"""Random access into a chunk-indexed blob through a range-fetch callable (spec §3.4.4).

Every chunk is checked against its checksum BEFORE it is decompressed, so unverified bytes never
reach the decompressor, let alone a caller; the decompressed length must match the index.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import zstandard

from bdserver.blob.chunked import (
    ANN_INDEX_DIGEST,
    ANN_INDEX_MEDIA_TYPE,
    ANN_INDEX_RANGE,
    MEDIA_TYPE_RAW,
    MEDIA_TYPE_ZSTD,
    SKIPPABLE_HEADER,
    is_skippable_magic,
)
from bdserver.blob.chunkindex import (
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    MEDIA_TYPE as CHUNK_INDEX_MEDIA_TYPE,
    ChunkIndex,
)
from bdserver.digest import parse_digest, verify_bytes
from bdserver.errors import BdError, FetchError, FormatError, IntegrityError

FetchRange = Callable[[int, int], bytes]  # (offset, length) -> exactly `length` bytes

_RANGE_RE = re.compile(r"^([0-9]+)(?::([0-9]+))?$")
# A generous ceiling on an index payload (~1.4M entries): refuse before fetching absurd ranges.
MAX_INDEX_SIZE = 64 << 20


def parse_range(value: str, blob_size: int) -> tuple[int, int]:
    """Parse `org.erofs.chunk-index.range` (`offset[:end]`, end defaults to the blob end)."""
    m = _RANGE_RE.match(value or "")
    if not m:
        raise FormatError(f"malformed {ANN_INDEX_RANGE} {value!r}")
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) is not None else blob_size
    if not 0 <= start < end <= blob_size:
        raise FormatError(f"{ANN_INDEX_RANGE} {value!r} outside a blob of {blob_size} bytes")
    if end != blob_size:
        raise FormatError(f"{ANN_INDEX_RANGE} {value!r}: an embedded index must be the blob's tail")
    return start, end


def _fetch(fetch_range: FetchRange, offset: int, length: int, what: str) -> bytes:
    try:
        data = fetch_range(offset, length)
    except BdError:
        raise
    except Exception as e:  # network stacks raise all sorts; the device maps FetchError to EIO
        raise FetchError(f"{what}: fetching [{offset}, {offset + length}) failed: {e}") from e
    if len(data) != length:
        raise FetchError(f"{what}: asked for {length} bytes at {offset}, got {len(data)}")
    return bytes(data)


def _skippable_only(rest: bytes) -> bool:
    pos = 0
    while pos < len(rest):
        if len(rest) - pos < 8:
            return False
        magic, size = SKIPPABLE_HEADER.unpack_from(rest, pos)
        if not is_skippable_magic(magic):
            return False
        pos += 8 + size
    return pos == len(rest)


def decompress_frame(on_blob: bytes, expected: int) -> bytes:
    """Decompress exactly one zstd frame (optionally followed by skippable frames) of `expected` bytes."""
    try:
        fcs = zstandard.frame_content_size(on_blob)
    except zstandard.ZstdError as e:
        raise FormatError(f"not a zstd frame: {e}") from e
    if fcs not in (-1, expected):
        raise FormatError(f"zstd frame declares {fcs} bytes, the index says {expected}")
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        if fcs == -1:
            # No declared size: feed small slices so a hostile frame cannot balloon memory.
            parts, got, pos = [], 0, 0
            for pos in range(0, len(on_blob), 64):
                piece = dobj.decompress(on_blob[pos : pos + 64])
                parts.append(piece)
                got += len(piece)
                if got > expected or dobj.eof:
                    break
            out = b"".join(parts)
            tail = on_blob[pos + 64 :]
        else:
            out = dobj.decompress(on_blob)
            tail = b""
    except zstandard.ZstdError as e:
        raise FormatError(f"zstd frame does not decompress: {e}") from e
    if len(out) != expected or not dobj.eof:
        raise FormatError(f"zstd frame gives {len(out)} bytes, the index says {expected}")
    if not _skippable_only(dobj.unused_data + tail):
        raise FormatError("trailing bytes after a chunk's zstd frame")
    return out


class ChunkedBlob:
    """A blob plus its verified chunk index; hands out verified, decompressed chunks."""

    def __init__(self, index: ChunkIndex, fetch_range: FetchRange, *, name: str = "blob") -> None:
        if len(index) and not index.has_checksums:
            raise FormatError(f"{name}: chunk index carries no per-chunk checksums; refusing to read lazily")
        self.index = index
        self.fetch_range = fetch_range
        self.name = name

    @property
    def size(self) -> int:
        """Uncompressed size of the image data."""
        return self.index.uncompressed_size

    def __len__(self) -> int:
        return len(self.index)

    def chunk_span(self, i: int) -> tuple[int, int]:
        """(blob offset, on-blob length) of chunk i."""
        return self.index.blob_span(i)

    def uncompressed_span(self, i: int) -> tuple[int, int]:
        return self.index.uncompressed_span(i)

    def decode_chunk(self, i: int, on_blob: bytes) -> bytes:
        """Verify chunk i's on-blob bytes, then decompress them. IntegrityError on mismatch."""
        if not self.index.checksum_ok(i, on_blob):
            raise IntegrityError(f"{self.name}: chunk {i} does not match its checksum")
        expected = self.index.uncompressed_span(i)[1]
        if self.index.compression == COMPRESSION_ZSTD:
            return decompress_frame(on_blob, expected)
        return on_blob

    def read_chunks(self, first: int, last: int) -> list[bytes]:
        """Chunks first..last INCLUSIVE, fetched with one range request when they are adjacent on the blob."""
        if not 0 <= first <= last < len(self.index):
            raise IndexError(f"{self.name}: chunks {first}..{last} outside [0, {len(self.index)})")
        spans = [self.index.blob_span(i) for i in range(first, last + 1)]
        contiguous = all(spans[k][0] + spans[k][1] == spans[k + 1][0] for k in range(len(spans) - 1))
        if contiguous:
            start = spans[0][0]
            data = _fetch(self.fetch_range, start, spans[-1][0] + spans[-1][1] - start, self.name)
            raw = [data[o - start : o - start + n] for o, n in spans]
        else:  # raw indexes may scatter chunks; fetch them one by one
            raw = [_fetch(self.fetch_range, o, n, self.name) for o, n in spans]
        return [self.decode_chunk(first + k, b) for k, b in enumerate(raw)]

    def read_chunk(self, i: int) -> bytes:
        return self.read_chunks(i, i)[0]

    def read(self, offset: int, length: int) -> bytes:
        """Uncompressed bytes [offset, offset+length) (no cache; for tools and tests)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{self.name}: range [{offset}, {offset + length}) outside [0, {self.size})")
        if length == 0:
            return b""
        first = self.index.chunk_at(offset)
        last = self.index.chunk_at(offset + length - 1)
        data = b"".join(self.read_chunks(first, last))
        skip = offset - self.index.uncompressed_span(first)[0]
        return data[skip : skip + length]


# Contract name (docs/CONTRACTS.md).
ChunkedBlobReader = ChunkedBlob


def load_index(
    fetch_range: FetchRange,
    blob_size: int,
    annotations: Mapping[str, str],
    *,
    media_type: str | None = None,
    require_digest: bool = True,
    name: str = "blob",
) -> ChunkIndex:
    """Fetch the embedded chunk index named by the descriptor annotations, verify, parse.

    The payload is checked against `org.erofs.chunk-index.digest` before a single entry is read
    (spec §8.2.4); without that annotation there is no chain of trust, so by default we refuse.
    `media_type` is the layer descriptor's; when None it is inferred from the index section.
    """
    ci_type = annotations.get(ANN_INDEX_MEDIA_TYPE, CHUNK_INDEX_MEDIA_TYPE)
    if ci_type != CHUNK_INDEX_MEDIA_TYPE:
        raise FormatError(f"{name}: unsupported chunk-index media type {ci_type!r}")
    if ANN_INDEX_RANGE not in annotations:
        raise FormatError(f"{name}: no {ANN_INDEX_RANGE} annotation: the blob has no embedded chunk index")
    digest = annotations.get(ANN_INDEX_DIGEST)
    if digest is None and require_digest:
        raise FormatError(f"{name}: no {ANN_INDEX_DIGEST} annotation; the chunk index cannot be verified")
    if digest is not None:
        parse_digest(digest)
    start, end = parse_range(annotations[ANN_INDEX_RANGE], blob_size)
    if end - start > MAX_INDEX_SIZE:
        raise FormatError(f"{name}: chunk index of {end - start} bytes is implausibly large")
    section = _fetch(fetch_range, start, end - start, f"{name} chunk index")
    framed = len(section) >= 8 and is_skippable_magic(SKIPPABLE_HEADER.unpack_from(section, 0)[0])
    if media_type is None:
        media_type = MEDIA_TYPE_ZSTD if framed else MEDIA_TYPE_RAW
    if media_type == MEDIA_TYPE_ZSTD:
        if not framed:
            raise FormatError(f"{name}: +zstd chunk index is not in a skippable frame")
        size = SKIPPABLE_HEADER.unpack_from(section, 0)[1]
        if size != len(section) - 8:
            raise FormatError(f"{name}: skippable frame holds {size} bytes, the range {len(section) - 8}")
        payload = section[8:]
        want = COMPRESSION_ZSTD
    elif media_type == MEDIA_TYPE_RAW:
        if framed:
            raise FormatError(f"{name}: a raw layer's chunk index must not be in a zstd frame")
        payload = section
        want = COMPRESSION_NONE
    else:
        raise FormatError(f"{name}: media type {media_type!r} carries no embedded chunk index")
    return index_from_payload(payload, data_end=start, compression=want, digest=digest, name=name)


def index_from_payload(
    payload: bytes, *, data_end: int, compression: int, digest: str | None, name: str = "blob"
) -> ChunkIndex:
    """Verify a chunk-index payload against its digest, parse it, check its CompressionType.

    Lets callers that cached the payload (content-addressed by its digest) skip the fetch.
    """
    if digest is not None:
        verify_bytes(payload, digest, what=f"{name} chunk index")
    index = ChunkIndex.parse(payload, data_end=data_end)
    if index.compression != compression:
        raise FormatError(f"{name}: CompressionType {index.compression} does not fit the layer's media type")
    return index
