"""Positional output for the writer: pwrite and copy_file_range when the output and the
spool are real files (no data passes through Python), buffered copies otherwise."""

from __future__ import annotations

import io
import os
from typing import BinaryIO

from bdserver.errors import FormatError

_COPY_BUF = 1 << 20


class Sink:
    """Positional writes to the output, through the fd when there is one."""

    def __init__(self, out: BinaryIO, base: int) -> None:
        self.out = out
        self.base = base
        self.fd: int | None = None
        self.use_cfr = True
        try:
            out.flush()
            self.fd = out.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            self.fd = None

    def pwrite(self, data: bytes | bytearray | memoryview, off: int) -> None:
        off += self.base
        if self.fd is not None:
            mv = memoryview(data)
            while mv:
                n = os.pwrite(self.fd, mv, off)
                mv = mv[n:]
                off += n
        else:
            self.out.seek(off)
            self.out.write(data)

    def copy(self, src: BinaryIO, src_off: int, off: int, n: int) -> None:
        src_fd = _real_fd(src)
        if src_fd is not None and self.fd is not None and self.use_cfr:
            try:
                self._copy_fd(src_fd, src_off, off + self.base, n)
                return
            except OSError:
                # EXDEV (different filesystems, 5.19+), EINVAL, ENOSYS: copy through a buffer,
                # and stop trying for this image.
                self.use_cfr = False
        while n > 0:
            want = min(n, _COPY_BUF)
            if src_fd is not None:
                buf = os.pread(src_fd, want, src_off)
            else:
                src.seek(src_off)
                buf = src.read(want)
            if len(buf) != want:
                raise FormatError("spool file is shorter than its segments say")
            self.pwrite(buf, off)
            src_off += want
            off += want
            n -= want

    def _copy_fd(self, src_fd: int, src_off: int, off: int, n: int) -> None:
        assert self.fd is not None
        while n > 0:
            done = os.copy_file_range(src_fd, self.fd, min(n, 1 << 30), src_off, off)
            if done <= 0:
                raise FormatError("spool file is shorter than its segments say")
            src_off += done
            off += done
            n -= done


def _real_fd(f: BinaryIO) -> int | None:
    if getattr(f, "_rolled", True) is False:  # SpooledTemporaryFile still in memory
        return None
    try:
        f.flush()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    try:
        return f.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
