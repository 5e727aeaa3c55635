"""Filesystem helpers for every package that keeps state on disk (the one module for them).

Crash-safe small-file writes: a reader (or a daemon restarted after a crash) must see the old file
or the new one, never a mix: write a temp file in the same directory, fsync it, rename it over,
fsync the directory. And what the chunk cache needs: hole punching, allocated size, ENOSPC turned
into the typed NoSpaceError.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from bdserver.errors import NoSpaceError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_NOSPACE = (errno.ENOSPC, errno.EDQUOT)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the blocks of [offset, offset+length) keeping the file size; False if unsupported.

    Reads of a punched range return zeros, which is why the cache clears presence (and flushes
    it) before it punches a hole.
    """
    if length <= 0:
        return True
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def allocated_bytes(path: str) -> int:
    """Bytes the file really occupies (sparse files count only their data blocks)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def no_space_as_error(what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT into the typed NoSpaceError the CLI and daemon understand."""
    try:
        yield
    except OSError as e:
        if e.errno in _NOSPACE:
            raise NoSpaceError(f"{what}: no space left on the device") from e
        raise
