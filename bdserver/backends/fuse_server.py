"""The raw FUSE server of one device: one connection (a /dev/fuse fd), one read-only file.

Why raw and not libfuse/pyfuse3: a restarted daemon must take over a live connection whose INIT
an earlier process answered (libfuse can only serve sessions it mounted itself), and a warm read
should cost one thread wake-up, not a trio task plus a worker-thread hop.

The tree is fixed, so a new daemon rebuilds it from nothing: nodeid 1 is the mount's root
directory, nodeid 2 its only entry ``disk`` (the device, ``size`` bytes, mode 0400). Nothing the
kernel was told depends on state that a crash could lose; FORGETs need no bookkeeping.

Threads: a pool per connection reads the fd directly (a blocking read wakes exactly one waiting
reader per request) and the thread that read a request answers it. The pool starts small and
grows whenever every reader is busy, up to ``max_threads``, so a miss parked on the registry
never holds up a hit behind it, and one slow device can only exhaust its own pool.

Takeover (`start(resend=True)`): requests the previous daemon had read but not answered sit in
the connection's processing queue. ``FUSE_NOTIFY_RESEND`` (Linux 6.9+; this host's 6.18 and the
lab's 6.12 have it) moves them back to the pending queue with ``FUSE_UNIQUE_RESEND`` set in their
unique, and we answer them like new ones (reads are idempotent). On an older kernel the write is
refused (EINVAL): the requests the dead daemon held stay unanswered, so the processes that issued
them wait (killable) until the connection is aborted or the device detached; everything queued
after them is served. The resend is sent before our readers start, so it never re-queues a
request this process is already working on.

INIT comes once per mount; a daemon that takes a connection over does not see it again unless the
dead one held it unanswered (then it is resent like any request, and answered again). All readers
share the one fd rather than FUSE_DEV_IOC_CLONE copies: a clone is a device of its own whose
processing queue the kernel fails (ECONNABORTED, an error in the reader) when its fd closes, so every
clone would have to be kept in the fd store too; on two cores one queue is not the bottleneck.

`release()` (the daemon is exiting but the connection lives on in the fd store): from then on a
request read is left unanswered, and a device read failing because the device is being closed is
not turned into EIO: both are resent to the next daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from typing import Callable

from bdserver.backends import fuse_abi as abi
from bdserver.backends.base import Device, checked_read

log = logging.getLogger(__name__)

DISK_ID = 2
DISK_NAME = b"disk"
VALID_S = 365 * 24 * 3600  # names and attributes never change while the device exists
BUFFER_SIZE = 64 * 1024  # > max_write + headers; LOOKUP names and BATCH_FORGETs fit easily
MAX_PAGES = 256  # 1 MiB per READ (the kernel caps it at fs.fuse.max_pages_limit)
MAX_BACKGROUND = 24  # async (readahead) READs in flight per connection
_EXIT_ERRNOS = (errno.ENODEV, errno.ECONNABORTED, errno.EBADF, errno.EPERM)

_INIT_WANTED = abi.ASYNC_READ | abi.PARALLEL_DIROPS | abi.MAX_PAGES


class FuseServer:
    """Serves ``device`` as the file ``disk`` on the FUSE connection ``fd``."""

    def __init__(self, fd: int, device: Device, *, name: str, min_threads: int = 2, max_threads: int = 16,
                 on_init: Callable[[abi.InitIn], None] | None = None) -> None:
        self.fd = fd
        self.device = device
        self.name = name
        self.min_threads = max(1, min_threads)
        self.max_threads = max(self.min_threads, max_threads)
        self.on_init = on_init
        self.inited = threading.Event()
        self.resend_ok: bool | None = None  # None: not tried (a fresh connection)
        self._released = False
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._ops: dict[int, Callable[[int, memoryview], bytes]] = {
            abi.INIT: self._init,
            abi.LOOKUP: self._lookup,
            abi.GETATTR: self._getattr,
            abi.OPEN: self._open,
            abi.OPENDIR: self._opendir,
            abi.READDIR: self._readdir,
            abi.RELEASE: _empty,
            abi.RELEASEDIR: _empty,
            abi.STATFS: self._statfs,
            abi.DESTROY: _empty,
        }

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, *, resend: bool = False) -> None:
        if resend:
            self.resend_ok = self._resend()
        with self._lock:
            for _ in range(self.min_threads):
                self._spawn()

    def release(self) -> None:
        """Stop answering; the connection stays for the next daemon (see the module docstring)."""
        self._released = True

    @property
    def threads(self) -> int:
        with self._lock:
            return sum(t.is_alive() for t in self._threads)

    def join(self, timeout: float | None) -> bool:
        """Wait until every reader has exited (after an unmount or abort); True if they all did."""
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)
        return not any(t.is_alive() for t in threads)

    def _resend(self) -> bool:
        try:
            os.write(self.fd, abi.notify_resend())
        except OSError as exc:
            log.warning("fuse %s: the kernel cannot resend requests the previous daemon held (%s); "
                        "their readers wait until the device is detached", self.name, exc.strerror)
            return False
        log.info("fuse %s: asked the kernel to resend unanswered requests", self.name)
        return True

    def _spawn(self) -> None:  # under self._lock
        t = threading.Thread(target=self._serve, name=f"fuse-{self.name}-{len(self._threads)}", daemon=True)
        self._threads.append(t)
        self._idle += 1
        t.start()

    # -- the request loop ------------------------------------------------------------------------
    def _serve(self) -> None:
        buf = bytearray(BUFFER_SIZE)
        for page in range(0, BUFFER_SIZE, 4096):  # fault every page in now: a copy into an absent page
            buf[page] = 1                         # that fails as we are killed would end the request (EIO)
        view = memoryview(buf)
        fd = self.fd
        try:
            while True:
                try:
                    n = os.readv(fd, [buf])
                except OSError as exc:
                    if exc.errno in _EXIT_ERRNOS:
                        return  # unmounted, aborted or closed
                    if exc.errno not in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        log.error("fuse %s: reading the connection failed: %s", self.name, exc)
                        return
                    continue  # ENOENT: the request was interrupted before we got it
                if self._released:
                    return  # leave it: the next daemon gets it resent
                with self._lock:
                    self._idle -= 1
                    if self._idle == 0 and len(self._threads) < self.max_threads:
                        self._spawn()
                try:
                    self._handle(view, n)
                finally:
                    with self._lock:
                        self._idle += 1
        finally:
            with self._lock:
                self._idle -= 1

    def _handle(self, view: memoryview, n: int) -> None:
        _len, opcode, unique, nodeid = abi.IN_HEADER.unpack_from(view)[:4]
        if unique & abi.UNIQUE_RESEND:
            log.info("fuse %s: answering a request the previous daemon held (opcode %d)", self.name, opcode)
        if opcode == abi.READ:
            self._read(unique, nodeid, view)
            return
        if opcode in abi.NO_REPLY:
            return
        op = self._ops.get(opcode)
        if op is None:  # FLUSH, ACCESS, xattrs, INTERRUPT, writes, ...: the kernel stops asking
            self._send(abi.reply(unique, error=errno.ENOSYS))
            return
        try:
            payload = op(nodeid, view[abi.IN_HEADER.size:n])
        except OSError as exc:
            self._send(abi.reply(unique, error=exc.errno or errno.EIO))
            return
        self._send(abi.reply(unique, payload))
        if opcode == abi.INIT:
            self.inited.set()
            if self.on_init is not None:
                self.on_init(abi.InitIn.unpack(view[abi.IN_HEADER.size:n]))

    def _read(self, unique: int, nodeid: int, view: memoryview) -> None:
        _fh, offset, size = abi.READ_IN.unpack_from(view, abi.IN_HEADER.size)[:3]
        if nodeid != DISK_ID:
            self._send(abi.reply(unique, error=errno.EISDIR if nodeid == abi.ROOT_ID else errno.EBADF))
            return
        try:
            data = checked_read(self.device, offset, size)
        except OSError as exc:
            if self._released:
                return  # the device is closing under us: the next daemon answers it
            self._send(abi.reply(unique, error=exc.errno or errno.EIO))
            return
        try:
            os.writev(self.fd, [abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(data), 0, unique), data])
        except OSError as exc:
            self._write_failed(exc)

    def _send(self, msg: bytes) -> None:
        try:
            os.write(self.fd, msg)
        except OSError as exc:
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        # ENOENT: the request was interrupted or aborted meanwhile; ENODEV: the connection is gone.
        if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.ECONNABORTED):
            log.warning("fuse %s: reply refused: %s", self.name, exc)

    # -- operations (each returns the reply payload or raises OSError(errno)) ----------------------
    def _init(self, _nodeid: int, arg: memoryview) -> bytes:
        kin = abi.InitIn.unpack(arg)
        if kin.major != abi.MAJOR:
            log.error("fuse %s: kernel speaks FUSE %d.%d, we need %d.x", self.name, kin.major, kin.minor, abi.MAJOR)
            raise OSError(errno.EPROTO, "protocol")
        log.info("fuse %s: INIT from kernel protocol 7.%d (resend %s)", self.name, kin.minor,
                 "supported" if kin.flags & abi.HAS_RESEND else "NOT supported: a crash strands held requests")
        return abi.InitOut(minor=min(kin.minor, abi.MINOR), max_readahead=kin.max_readahead,
                           flags=kin.flags & _INIT_WANTED, max_background=MAX_BACKGROUND,
                           congestion_threshold=MAX_BACKGROUND * 3 // 4, max_pages=MAX_PAGES).pack()

    def _attr(self, nodeid: int) -> abi.Attr:
        if nodeid == abi.ROOT_ID:
            return abi.Attr(abi.ROOT_ID, 0, stat.S_IFDIR | 0o500, nlink=2)
        if nodeid == DISK_ID:
            return abi.Attr(DISK_ID, self.device.size, stat.S_IFREG | 0o400)
        raise OSError(errno.ENOENT, "no such node")

    def _lookup(self, nodeid: int, arg: memoryview) -> bytes:
        name = bytes(arg).split(b"\0", 1)[0]
        if nodeid != abi.ROOT_ID or name != DISK_NAME:
            raise OSError(errno.ENOENT, "no such entry")
        return abi.EntryOut(DISK_ID, self._attr(DISK_ID), VALID_S).pack()

    def _getattr(self, nodeid: int, _arg: memoryview) -> bytes:
        return abi.AttrOut(self._attr(nodeid), VALID_S).pack()

    def _open(self, nodeid: int, arg: memoryview) -> bytes:
        (flags,) = abi.OPEN_IN.unpack_from(arg)[:1]
        if nodeid == abi.ROOT_ID:
            raise OSError(errno.EISDIR, "a directory")
        self._attr(nodeid)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, "read-only")
        return abi.OpenOut(0, abi.FOPEN_KEEP_CACHE).pack()  # immutable: keep the page cache

    def _opendir(self, nodeid: int, _arg: memoryview) -> bytes:
        if nodeid != abi.ROOT_ID:
            raise OSError(errno.ENOTDIR if nodeid == DISK_ID else errno.ENOENT, "not a directory")
        return abi.OpenOut(0, abi.FOPEN_KEEP_CACHE | abi.FOPEN_CACHE_DIR).pack()

    def _readdir(self, nodeid: int, arg: memoryview) -> bytes:
        _fh, offset, size = abi.READ_IN.unpack_from(arg)[:3]
        if nodeid != abi.ROOT_ID:
            raise OSError(errno.ENOTDIR, "not a directory")
        entries = [(abi.ROOT_ID, b".", abi.DT_DIR), (abi.ROOT_ID, b"..", abi.DT_DIR), (DISK_ID, DISK_NAME, abi.DT_REG)]
        out = b""
        for i in range(offset, len(entries)):
            ino, name, kind = entries[i]
            rec = abi.dirent(ino, i + 1, name, kind)
            if len(out) + len(rec) > size:
                break
            out += rec
        return out

    def _statfs(self, _nodeid: int, _arg: memoryview) -> bytes:
        return abi.StatfsOut(blocks=-(-self.device.size // 4096), files=2).pack()


def _empty(_nodeid: int, _arg: memoryview) -> bytes:
    return b""
