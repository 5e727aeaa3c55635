"""Byte-level input for tar layers: compression detection by magic and a hashing reader.

The diff_id of a layer is the SHA-256 of its *uncompressed* tar stream, so the hash is taken
here, below the header parser, over every byte the decompressor yields (including what follows
the end-of-archive marker). Truncated or corrupt compressed input always becomes FormatError.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import queue
import threading
import zlib
from typing import BinaryIO

import zstandard

from bdserver.errors import FormatError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_MAGICS = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x04\x22\x4d\x18": "lz4"}
_READ = 1 << 20


class _Peeked:
    """A stream with some already-read bytes put back in front."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self._head = head
        self._raw = raw

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0:
                data, self._head = self._head + self._raw.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            if len(data) < n:
                data += self._raw.read(n - len(data))
            return data
        return self._raw.read(n)

    def readable(self) -> bool:
        return True


def _peek(raw: BinaryIO, n: int) -> bytes:
    head = b""
    while len(head) < n:
        c = raw.read(n - len(head))
        if not c:
            break
        head += c
    return head


def detect_compression(head: bytes) -> str:
    """'gzip', 'zstd' or 'none' from the first bytes; other compressions are refused."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    # A zstd stream may start with a skippable frame (magic 0x184D2A50..5F, little endian).
    if len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and (head[0] & 0xF0) == 0x50:
        return "zstd"
    for magic, name in _OTHER_MAGICS.items():
        if head.startswith(magic):
            raise FormatError(f"layer is {name}-compressed; OCI layers are tar, tar+gzip or tar+zstd")
    return "none"


class _ZstdReader:
    """Decompress a (possibly multi-frame) zstd stream; a truncated frame is a FormatError."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._pending = b""
        self._eof = False
        self._in_frame = False

    def read(self, n: int = _READ) -> bytes:
        while not self._pending and not self._eof:
            data = self._raw.read(_READ)
            if not data:
                self._eof = True
                if self._in_frame:
                    raise FormatError("zstd stream is truncated (incomplete frame)")
                break
            self._feed(data)
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

    def _feed(self, data: bytes) -> None:
        chunks = []
        while data:
            try:
                chunks.append(self._obj.decompress(data))
            except zstandard.ZstdError as e:
                raise FormatError(f"corrupt zstd stream: {e}") from e
            self._in_frame = True
            if self._obj.eof:
                data = self._obj.unused_data
                self._obj = self._dctx.decompressobj()
                self._in_frame = False
            else:
                data = b""
        self._pending += b"".join(chunks)


class _GzipReader:
    """gzip.GzipFile with its errors translated (multi-member streams are fine)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._g = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]

    def read(self, n: int = _READ) -> bytes:
        try:
            return self._g.read(n)
        except EOFError as e:
            raise FormatError("gzip stream is truncated") from e
        except (OSError, zlib.error) as e:
            raise FormatError(f"corrupt gzip stream: {e}") from e


class _Hasher:
    """SHA-256 in a helper thread (hashlib drops the GIL), so hashing overlaps parsing and
    writing; the queue is bounded, so memory stays a few MiB."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._t = threading.Thread(target=self._run, name="tar-sha256", daemon=True)
        self._t.start()
        self._done = False

    def _run(self) -> None:
        while (c := self._q.get()) is not None:
            self._sha.update(c)

    def update(self, data: bytes) -> None:
        self._q.put(data)

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._q.put(None)
            self._t.join()

    def hexdigest(self) -> str:
        self.close()
        return self._sha.hexdigest()


def _direct_file(raw: BinaryIO) -> tuple[BinaryIO, int] | None:
    """(file, offset of the tar's first byte) when ``raw`` is a plain seekable OS file."""
    try:
        if isinstance(raw, (io.BufferedReader, io.FileIO)) and raw.seekable():
            raw.fileno()
            return raw, raw.tell()
    except (OSError, ValueError):
        pass
    return None


class TarInput:
    """Uncompressed tar bytes, read exactly, hashed on the way (diff_id).

    ``direct`` is set for an uncompressed tar in a seekable OS file: file data can then be
    described in place (no spool copy) at ``direct_base + tar offset``."""

    def __init__(self, raw: BinaryIO) -> None:
        d = _direct_file(raw)
        head = _peek(raw, 8)
        self.compression = detect_compression(head)
        self.direct: BinaryIO | None = d[0] if d and self.compression == "none" else None
        self.direct_base = d[1] if d else 0
        src: BinaryIO = _Peeked(head, raw)  # type: ignore[assignment]
        if self.compression == "gzip":
            src = _GzipReader(src)  # type: ignore[assignment]
        elif self.compression == "zstd":
            src = _ZstdReader(src)  # type: ignore[assignment]
        self._src = src
        self._buf = bytearray()
        self._sha = _Hasher()
        self.pos = 0  # offset in the uncompressed tar of the next byte handed out

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            c = self._src.read(max(_READ, n - len(self._buf)))
            if not c:
                return
            c = bytes(c)
            self._sha.update(c)
            self._buf += c

    def read(self, n: int) -> bytes:
        """Up to n bytes (fewer only at the end of the stream)."""
        self._fill(n)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.pos += len(out)
        return out

    def read_exact(self, n: int, what: str) -> bytes:
        out = self.read(n)
        if len(out) != n:
            raise FormatError(f"tar is truncated in {what} at byte {self.pos}")
        return out

    def copy_to(self, out: BinaryIO, n: int, what: str) -> None:
        while n > 0:
            self._fill(min(n, _READ))
            k = min(n, len(self._buf), _READ)
            if k == 0:
                raise FormatError(f"tar is truncated in {what} at byte {self.pos}")
            out.write(memoryview(self._buf)[:k])
            del self._buf[:k]
            self.pos += k
            n -= k

    def skip(self, n: int, what: str) -> None:
        while n > 0:
            self._fill(min(n, _READ))
            k = min(n, len(self._buf), _READ)
            if k == 0:
                raise FormatError(f"tar is truncated in {what} at byte {self.pos}")
            del self._buf[:k]
            self.pos += k
            n -= k

    def drain(self) -> None:
        """Consume the rest (after the end-of-archive marker) so the digest covers it all."""
        self.pos += len(self._buf)
        self._buf.clear()
        while True:
            c = self._src.read(_READ)
            if not c:
                return
            self._sha.update(c)
            self.pos += len(c)

    def diff_id(self) -> str:
        return "sha256:" + self._sha.hexdigest()

    def close(self) -> None:
        self._sha.close()
