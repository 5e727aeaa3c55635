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


class _ZstdFrames:
    """Walks zstd frame and block headers as the compressed bytes stream past, so that a
    truncated stream is detected. Kept (issue 10.7) because zstandard 0.25 offers bounded output
    or truncation detection, never both: `stream_reader` and `decompressobj(read_across_frames=
    True)` bound what one call returns but end silently inside a cut frame (and report no end
    of frame), while a per-frame `decompressobj` reports `eof` but returns everything one input
    piece decodes to (4 KiB of RLE blocks: 127 MiB in one call)."""

    _FCS = (0, 2, 4, 8)
    _DICT = (0, 1, 2, 4)

    def __init__(self) -> None:
        self.state = "magic"
        self.buf = b""
        self.skip = 0
        self.rest = 0
        self.checksum = False
        self.frames = 0

    def _need(self) -> int:
        return {"magic": 4, "skipsize": 4, "fhd": 1, "fhrest": self.rest, "block": 3, "checksum": 4}[self.state]

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.skip:
                k = min(self.skip, n - i)
                self.skip -= k
                i += k
                continue
            need = self._need()
            take = min(need - len(self.buf), n - i)
            self.buf += data[i : i + take]
            i += take
            if len(self.buf) < need:
                return
            self._advance()
            while not self.skip and self.state == "fhrest" and self.rest == 0:
                self._advance()

    def _advance(self) -> None:
        b, self.buf = self.buf, b""
        st = self.state
        if st == "magic":
            m = int.from_bytes(b, "little")
            if m == 0xFD2FB528:
                self.state = "fhd"
            elif (m & 0xFFFFFFF0) == 0x184D2A50:
                self.state = "skipsize"
            else:
                raise FormatError("corrupt zstd stream: data after the last frame is not a frame")
        elif st == "skipsize":
            self.skip = int.from_bytes(b, "little")
            self.state = "magic"
        elif st == "fhd":
            fhd = b[0]
            if fhd & 0x08:
                raise FormatError("corrupt zstd stream: reserved bit set in a frame header")
            single = (fhd >> 5) & 1
            fcs = self._FCS[fhd >> 6] if (fhd >> 6) or not single else 1
            self.rest = (0 if single else 1) + self._DICT[fhd & 3] + fcs
            self.checksum = bool(fhd & 0x04)
            self.state = "fhrest"
        elif st == "fhrest":
            self.state = "block"
        elif st == "block":
            h = int.from_bytes(b, "little")
            last, btype, size = h & 1, (h >> 1) & 3, h >> 3
            if btype == 3:
                raise FormatError("corrupt zstd stream: reserved block type")
            self.skip = 1 if btype == 1 else size
            if last:
                self.state = "checksum" if self.checksum else "magic"
                self.frames += 0 if self.checksum else 1
        elif st == "checksum":
            self.state = "magic"
            self.frames += 1

    def complete(self) -> bool:
        return self.state == "magic" and not self.buf and not self.skip


class _Tee:
    def __init__(self, raw: BinaryIO, frames: _ZstdFrames) -> None:
        self.raw = raw
        self.frames = frames

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self.frames.feed(data)
        return data


class _ZstdReader:
    """Decompress a (possibly multi-frame) zstd stream with bounded output per read (a
    decompression bomb cannot blow up memory); truncation and garbage are FormatError."""

    def __init__(self, raw: BinaryIO) -> None:
        self._frames = _ZstdFrames()
        self._tee = _Tee(raw, self._frames)
        self._r = zstandard.ZstdDecompressor().stream_reader(self._tee, read_size=_READ, read_across_frames=True)
        self._eof = False

    def read(self, n: int = _READ) -> bytes:
        if self._eof:
            return b""
        try:
            out = self._r.read(n)
        except zstandard.ZstdError as e:
            raise FormatError(f"corrupt zstd stream: {e}") from e
        if out:
            return out
        self._eof = True
        while self._tee.read(_READ):  # whatever the decoder left must be nothing but whole frames
            pass
        if not self._frames.complete() or self._frames.frames == 0:
            raise FormatError("zstd stream is truncated (incomplete frame)")
        return b""


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

    def __init__(self, raw: BinaryIO, *, max_bytes: int | None = None) -> None:
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
        self._pulled = 0  # uncompressed bytes taken from the decompressor
        self._max = max_bytes

    def _pull(self) -> bytes:
        c = self._src.read(_READ)
        if c:
            c = bytes(c)
            self._pulled += len(c)
            if self._max is not None and self._pulled > self._max:
                raise FormatError(f"layer is more than {self._max} bytes uncompressed (limit max_tar_bytes)")
            self._sha.update(c)
        return c

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            c = self._pull()
            if not c:
                return
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
        while c := self._pull():
            self.pos += len(c)

    def diff_id(self) -> str:
        return "sha256:" + self._sha.hexdigest()

    def close(self) -> None:
        self._sha.close()
