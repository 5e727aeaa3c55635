"""Byte sources behind device segments: bytes in memory, a local file; the lazily fetched layer
blob (`lazyblob.LazyBlobSource`) is the third kind."""

from __future__ import annotations

import os
from typing import Protocol

from bdserver.errors import FetchError


class Source(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class BytesSource:
    """Bytes already in memory (the merged metadata image, verified when it was loaded)."""

    def __init__(self, data: bytes, name: str = "bytes") -> None:
        self._data = data
        self.size = len(data)
        self.name = name

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def close(self) -> None:
        pass


class FileSource:
    """A local file read with pread (thread-safe, no shared file position)."""

    def __init__(self, path: str) -> None:
        self.name = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        while length > 0:
            b = os.pread(self._fd, length, offset)
            if not b:
                raise FetchError(f"{self.name}: unexpected end of file at {offset}")
            parts.append(b)
            offset += len(b)
            length -= len(b)
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
