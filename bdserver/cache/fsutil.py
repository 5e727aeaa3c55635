"""Small filesystem helpers: hole punching, fsync of directories, ENOSPC mapping."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from contextlib import contextmanager
from typing import Iterator

from bdserver.errors import NoSpaceError
from bdserver.fsutil import fsync_dir  # noqa: F401  (re-exported for the cache modules)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_NOSPACE = (errno.ENOSPC, errno.EDQUOT)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the blocks of [offset, offset+length) keeping the file size; False if unsupported.

    Reads of a punched range return zeros, which is why presence is cleared (and flushed)
    before a hole is punched.
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


@contextmanager
def no_space_as_error(what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT into the typed NoSpaceError the CLI and daemon understand."""
    try:
        yield
    except OSError as e:
        if e.errno in _NOSPACE:
            raise NoSpaceError(f"{what}: no space left in the chunk cache") from e
        raise
