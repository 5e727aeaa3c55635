"""Content digests (the one place they are parsed and checked) and a reader that verifies a blob
while it streams. A leaf module: blob/, oci/, vdev/ and the daemon all use it.

Every blob bdserver reads is content-addressed; verifying on the fly (instead of after a
download to disk) lets callers stream layers straight into the converter and still never
act on bytes that do not match their digest.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import BinaryIO

from bdserver.errors import FormatError, IntegrityError

_ALGOS = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")


def parse_digest(digest: str) -> tuple[str, str]:
    """Split and validate ``alg:hex``; raises FormatError (a digest is never guessed)."""
    m = _DIGEST_RE.match(digest or "")
    if not m or len(m.group(2)) != _ALGOS[m.group(1)]:
        raise FormatError(f"invalid digest {digest!r}")
    return m.group(1), m.group(2)


def is_digest(s: str) -> bool:
    try:
        parse_digest(s)
    except FormatError:
        return False
    return True


def hasher(digest: str) -> "hashlib._Hash":
    alg, _ = parse_digest(digest)
    return hashlib.new(alg)


def digest_of(h: "hashlib._Hash") -> str:
    """``alg:hex`` of a finished hasher (from `hasher`)."""
    return f"{h.name}:{h.hexdigest()}"


def sha256_digest(data: bytes) -> str:
    return digest_of(hashlib.sha256(data))


def verify_bytes(data: bytes, digest: str, size: int | None = None, *, what: str = "") -> bytes:
    """Return ``data`` if it has ``digest`` (and ``size``), else raise IntegrityError.

    ``what`` names the object in the error ("merged metadata ...", "chunk index of ...")."""
    what = what or digest
    if size is not None and len(data) != size:
        raise IntegrityError(f"{what}: got {len(data)} bytes, expected {size}")
    h = hasher(digest)
    h.update(data)
    got = digest_of(h)
    if got != digest:
        raise IntegrityError(f"{what}: content does not match {digest} (got {got})")
    return data


class VerifyingReader(io.RawIOBase):
    """Wrap a stream; hash what passes through; raise IntegrityError at EOF on a mismatch.

    The error is raised by the read that would return EOF (b""), so a consumer that reads to
    the end can never mistake altered or truncated content for the real blob. ``size`` (if known)
    is enforced too: more bytes than announced fail immediately.
    """

    def __init__(self, raw: BinaryIO, digest: str, size: int | None = None, *, close_raw: bool = True):
        super().__init__()
        self._raw = raw
        self.digest = digest
        self.size = size
        self._h = hasher(digest)
        self._n = 0
        self._checked = False
        self._close_raw = close_raw

    def readable(self) -> bool:
        return True

    @property
    def bytes_read(self) -> int:
        return self._n

    def _finish(self) -> None:
        if self._checked:
            return
        self._checked = True
        if self.size is not None and self._n != self.size:
            raise IntegrityError(f"{self.digest}: stream ended after {self._n} bytes, expected {self.size}")
        got = digest_of(self._h)
        if got != self.digest:
            raise IntegrityError(f"content digest mismatch: expected {self.digest}, got {got}")

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self._raw.read(len(b))
        if not data:
            self._finish()
            return 0
        n = len(data)
        self._n += n
        if self.size is not None and self._n > self.size:
            raise IntegrityError(f"{self.digest}: more than the expected {self.size} bytes")
        self._h.update(data)
        b[:n] = data
        return n

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if size is None or size < 0:
            return self.readall()
        buf = bytearray(size)
        n = self.readinto(memoryview(buf))
        return bytes(buf[:n])

    def readall(self) -> bytes:
        chunks = []
        while True:
            c = self.read(1 << 20)
            if not c:
                return b"".join(chunks)
            chunks.append(c)

    def close(self) -> None:
        if not self.closed and self._close_raw:
            try:
                self._raw.close()
            except Exception:  # noqa: BLE001 - closing a network stream may fail; nothing to do
                pass
        super().close()
