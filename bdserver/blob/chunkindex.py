"""The chunk index of the EROFS image layer spec (`application/vnd.erofs.chunk-index.v1`, spec §3.4).

Layout (little-endian):

    header (32 bytes)
      0  Magic            4   CD E4 EC 67
      4  Version          1   1
      5  CompressionType  1   0 = none (raw ranges), 1 = zstd (one frame per chunk)
      6  Flags            2   0
      8  UncompressedSize 8
     16  NumChunks        4
     20  HashAlgo         1   0 = none, 1 = SHA-2
     21  HashSize         1   0 | 32 (SHA-256) | 64 (SHA-512)
     22  Reserved        10   zero
    entries (NumChunks x (16 + HashSize))
      BlockOffset 8 | UncompressedOffset 8 | Checksum HashSize

The checksum covers a chunk's *on-blob* bytes (the compressed zstd frame for type 1). The on-blob
length of chunk i is the distance to the next entry's BlockOffset, or to the start of the chunk-index
section ("data end") for the last one; parsing therefore needs that data end.

Parsing is strict: this is hostile input until its digest has been checked, and even then a
producer bug must fail loudly rather than address the wrong bytes.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from dataclasses import dataclass, field

from bdserver.errors import FormatError

MEDIA_TYPE = "application/vnd.erofs.chunk-index.v1"
MAGIC = b"\xcd\xe4\xec\x67"
VERSION = 1
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
HASH_NONE = 0
HASH_SHA2 = 1
HEADER_SIZE = 32

_HEADER = struct.Struct("<4sBBHQIBB10s")
_ENTRY_HEAD = struct.Struct("<QQ")
assert _HEADER.size == HEADER_SIZE

# A consumer limit, not a spec one: one chunk is decompressed in memory, so refuse absurd chunks.
MAX_CHUNK_SIZE = 64 << 20
_HASHES = {32: "sha256", 64: "sha512"}


@dataclass(frozen=True)
class ChunkIndexHeader:
    """The 32-byte header (spec §3.4.1)."""

    compression: int
    uncompressed_size: int
    num_chunks: int
    hash_algo: int = HASH_SHA2
    hash_size: int = 32
    version: int = VERSION
    flags: int = 0

    @property
    def entry_size(self) -> int:
        return 16 + self.hash_size

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            self.version,
            self.compression,
            self.flags,
            self.uncompressed_size,
            self.num_chunks,
            self.hash_algo,
            self.hash_size,
            b"\0" * 10,
        )

    @classmethod
    def unpack(cls, data: bytes) -> "ChunkIndexHeader":
        if len(data) < HEADER_SIZE:
            raise FormatError(f"chunk index: {len(data)} bytes, shorter than the 32-byte header")
        magic, ver, comp, flags, usize, n, halgo, hsize, reserved = _HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise FormatError(f"chunk index: bad magic {magic.hex()}")
        if ver != VERSION:
            raise FormatError(f"chunk index: unsupported version {ver}")
        if comp not in (COMPRESSION_NONE, COMPRESSION_ZSTD):
            raise FormatError(f"chunk index: unknown CompressionType {comp}")
        if flags:
            raise FormatError(f"chunk index: unknown Flags bits {flags:#06x}")
        if reserved != b"\0" * 10:
            raise FormatError("chunk index: reserved header bytes are not zero")
        if halgo == HASH_NONE:
            if hsize != 0:
                raise FormatError("chunk index: HashSize must be 0 when HashAlgo is 0")
        elif halgo == HASH_SHA2:
            if hsize not in _HASHES:
                raise FormatError(f"chunk index: SHA-2 HashSize {hsize} is neither 32 nor 64")
        else:
            raise FormatError(f"chunk index: unknown HashAlgo {halgo}")
        return cls(comp, usize, n, halgo, hsize, ver, flags)


@dataclass(frozen=True)
class ChunkEntry:
    """One chunk entry (spec §3.4.2)."""

    block_offset: int
    uncompressed_offset: int
    checksum: bytes = b""

    def pack(self) -> bytes:
        return _ENTRY_HEAD.pack(self.block_offset, self.uncompressed_offset) + self.checksum


@dataclass(frozen=True)
class ChunkIndex:
    """A parsed, validated chunk index plus the data end that bounds the last chunk.

    `data_end` is the blob offset where chunk data stops: the start of the embedded chunk-index
    section (`org.erofs.chunk-index.range` offset), or the blob size for a standalone index.
    """

    header: ChunkIndexHeader
    entries: tuple[ChunkEntry, ...]
    data_end: int
    _uoffs: list[int] = field(repr=False, compare=False, default_factory=list)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        *,
        compression: int,
        uncompressed_size: int,
        entries: list[ChunkEntry],
        data_end: int,
        hash_size: int = 32,
    ) -> "ChunkIndex":
        hdr = ChunkIndexHeader(
            compression=compression,
            uncompressed_size=uncompressed_size,
            num_chunks=len(entries),
            hash_algo=HASH_SHA2 if hash_size else HASH_NONE,
            hash_size=hash_size,
        )
        return cls.parse(hdr.pack() + b"".join(e.pack() for e in entries), data_end=data_end)

    def pack(self) -> bytes:
        return self.header.pack() + b"".join(e.pack() for e in self.entries)

    @classmethod
    def parse(cls, payload: bytes, data_end: int) -> "ChunkIndex":
        """Parse and validate the payload (header + entries, no frame header). FormatError if off."""
        hdr = ChunkIndexHeader.unpack(payload)
        esize = hdr.entry_size
        expected = HEADER_SIZE + hdr.num_chunks * esize
        if len(payload) != expected:
            raise FormatError(
                f"chunk index: {len(payload)} bytes, expected {expected} for {hdr.num_chunks} chunks"
            )
        if data_end < 0:
            raise FormatError("chunk index: negative data end")
        n = hdr.num_chunks
        usize = hdr.uncompressed_size
        if n == 0:
            if usize != 0:
                raise FormatError("chunk index: no chunks but UncompressedSize is not 0")
            return cls(hdr, (), data_end, [])
        if usize == 0:
            raise FormatError("chunk index: chunks present but UncompressedSize is 0")
        entries = []
        pos = HEADER_SIZE
        for _ in range(n):
            boff, uoff = _ENTRY_HEAD.unpack_from(payload, pos)
            csum = bytes(payload[pos + 16 : pos + esize])
            entries.append(ChunkEntry(boff, uoff, csum))
            pos += esize
        uoffs = [e.uncompressed_offset for e in entries]
        if uoffs[0] != 0:
            raise FormatError("chunk index: first chunk does not start at uncompressed offset 0")
        ends = uoffs[1:] + [usize]
        for i in range(n):
            length = ends[i] - uoffs[i]
            if length <= 0:
                raise FormatError(f"chunk index: chunk {i} is empty or out of order")
            if length > MAX_CHUNK_SIZE:
                raise FormatError(f"chunk index: chunk {i} is {length} bytes (limit {MAX_CHUNK_SIZE})")
        if hdr.compression == COMPRESSION_ZSTD:
            bends = [e.block_offset for e in entries[1:]] + [data_end]
            for i in range(n):
                if bends[i] <= entries[i].block_offset:
                    raise FormatError(f"chunk index: zstd frame {i} is empty, overlaps or runs past the data end")
        else:
            spans = sorted((e.block_offset, e.block_offset + ends[i] - uoffs[i], i) for i, e in enumerate(entries))
            prev_end = 0
            for start, end, i in spans:
                if start < prev_end:
                    raise FormatError(f"chunk index: raw chunk {i} overlaps another chunk")
                prev_end = end
            if prev_end > data_end:
                raise FormatError("chunk index: a raw chunk runs past the data end")
        return cls(hdr, tuple(entries), data_end, uoffs)

    # ---- geometry ---------------------------------------------------------------------

    def __len__(self) -> int:
        return self.header.num_chunks

    @property
    def compression(self) -> int:
        return self.header.compression

    @property
    def uncompressed_size(self) -> int:
        return self.header.uncompressed_size

    @property
    def has_checksums(self) -> bool:
        return self.header.hash_algo != HASH_NONE

    def uncompressed_offsets(self) -> list[int]:
        """Chunk start offsets in the uncompressed stream, plus the total size as a final fence."""
        return list(self._uoffs) + [self.uncompressed_size]

    def uncompressed_span(self, i: int) -> tuple[int, int]:
        """(offset, length) of chunk i in the uncompressed image data."""
        self._check(i)
        start = self._uoffs[i]
        end = self._uoffs[i + 1] if i + 1 < len(self._uoffs) else self.uncompressed_size
        return start, end - start

    def blob_span(self, i: int) -> tuple[int, int]:
        """(offset, length) of chunk i's on-blob bytes (spec §3.4.2)."""
        self._check(i)
        e = self.entries[i]
        if self.compression == COMPRESSION_ZSTD:
            end = self.entries[i + 1].block_offset if i + 1 < len(self.entries) else self.data_end
            return e.block_offset, end - e.block_offset
        return e.block_offset, self.uncompressed_span(i)[1]

    def chunk_at(self, offset: int) -> int:
        """Index of the chunk holding uncompressed byte `offset` (binary search: sizes may vary)."""
        if not 0 <= offset < self.uncompressed_size:
            raise ValueError(f"offset {offset} outside [0, {self.uncompressed_size})")
        return bisect.bisect_right(self._uoffs, offset) - 1

    def hash_name(self) -> str | None:
        return _HASHES.get(self.header.hash_size) if self.has_checksums else None

    def checksum_ok(self, i: int, on_blob: bytes) -> bool:
        """Whether `on_blob` matches chunk i's checksum; False when the index carries none."""
        name = self.hash_name()
        if name is None:
            return False
        return hashlib.new(name, on_blob).digest() == self.entries[i].checksum

    def _check(self, i: int) -> None:
        if not 0 <= i < len(self.entries):
            raise IndexError(f"chunk {i} outside [0, {len(self.entries)})")
