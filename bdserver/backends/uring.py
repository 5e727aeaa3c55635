"""A minimal io_uring binding over raw syscalls (ctypes), just enough for ublk.

Why not a library: PyPI ``liburing`` cannot fill a URING_CMD payload (no access to the SQE's
``cmd`` bytes) and needs Linux 6.14+; the distribution's liburing keeps the helpers we need
``static inline``. Raw syscalls need nothing: io_uring_setup, two mmaps (rings, SQE array) and
io_uring_enter. SQEs are packed with `struct` and copied into the shared SQE array; completions
are read from the CQ ring. 128-byte SQEs (IORING_SETUP_SQE128) are supported, which the ublk
control commands require.

One `IoUring` belongs to one thread: ublk insists that a queue's commits come from the thread that
fetched. Memory ordering: the ring indices are shared with the kernel and written with plain
stores, which is correct on x86-64 (TSO) only; `supported()` says so for other machines.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from typing import Iterator, NamedTuple

SYS_IO_URING_SETUP = 425  # the same on x86_64 and arm64
SYS_IO_URING_ENTER = 426

IORING_SETUP_COOP_TASKRUN = 1 << 8
IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_SINGLE_ISSUER = 1 << 12

IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_EXT_ARG = 1 << 8

IORING_ENTER_GETEVENTS = 1 << 0
IORING_ENTER_EXT_ARG = 1 << 3

IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

IORING_OP_NOP = 0
IORING_OP_POLL_ADD = 6
IORING_OP_READ = 22
IORING_OP_URING_CMD = 46

POLLIN = 0x1

PARAMS_SIZE = 120
CQE_SIZE = 16

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def supported() -> tuple[bool, str]:
    """Is this binding safe here? (x86-64 only: see the module docstring on memory ordering)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False, f"the pure-Python io_uring binding supports x86-64 only (this is {platform.machine()})"
    try:
        disabled = int(open("/proc/sys/kernel/io_uring_disabled").read().strip() or 0)
    except (OSError, ValueError):
        disabled = 0
    if disabled == 2:
        return False, "io_uring is disabled (sysctl kernel.io_uring_disabled=2)"
    return True, ""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class Cqe(NamedTuple):
    user_data: int
    res: int
    flags: int


# A whole 64-byte URING_CMD SQE whose payload is 16 bytes (u16, u16, s32, u64: ublksrv_io_cmd):
# packed straight into the ring slot on the hot path (`IoUring.queue_struct`).
SQE_CMD16 = struct.Struct("<BBHiQQIIQHHiHHiQ")


def sqe_bytes(opcode: int, fd: int, *, off: int = 0, addr: int = 0, length: int = 0, op_flags: int = 0,
              user_data: int = 0, cmd: bytes = b"", sqe_flags: int = 0, size: int = 64) -> bytes:
    """One SQE: the 48-byte common head, then ``cmd`` (URING_CMD payload / addr3) zero-padded."""
    head = struct.pack("<BBHiQQIIQHHi", opcode, sqe_flags, 0, fd, off, addr, length, op_flags,
                       user_data, 0, 0, 0)
    if len(cmd) > size - 48:
        raise ValueError(f"command payload of {len(cmd)} bytes does not fit a {size}-byte SQE")
    return head + cmd + bytes(size - 48 - len(cmd))


def uring_cmd_sqe(fd: int, cmd_op: int, payload: bytes, user_data: int, size: int = 64) -> bytes:
    """IORING_OP_URING_CMD: ``cmd_op`` sits where ``off`` is (low 32 bits), the payload at 48."""
    return sqe_bytes(IORING_OP_URING_CMD, fd, off=cmd_op & 0xFFFFFFFF, user_data=user_data, cmd=payload,
                     size=size)


def poll_add_sqe(fd: int, user_data: int, events: int = POLLIN, size: int = 64) -> bytes:
    """One-shot poll for ``events`` on ``fd`` (``poll32_events`` at byte 28)."""
    return sqe_bytes(IORING_OP_POLL_ADD, fd, op_flags=events, user_data=user_data, size=size)


def read_sqe(fd: int, addr: int, length: int, user_data: int, off: int = 0, size: int = 64) -> bytes:
    """IORING_OP_READ of ``length`` bytes into the buffer at ``addr`` (e.g. an eventfd's counter)."""
    return sqe_bytes(IORING_OP_READ, fd, off=off, addr=addr, length=length, user_data=user_data, size=size)


class IoUring:
    """An io_uring instance: queue SQEs, submit, wait, reap CQEs. Not thread-safe by design."""

    def __init__(self, entries: int, flags: int = 0) -> None:
        params = (ctypes.c_ubyte * PARAMS_SIZE)()
        struct.pack_into("<I", params, 8, flags)
        fd = _syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_long(entries), ctypes.byref(params))
        self.fd = _check(fd, "io_uring_setup")
        raw = bytes(params)
        self.sq_entries, self.cq_entries, self.flags = struct.unpack_from("<III", raw, 0)
        self.features = struct.unpack_from("<I", raw, 20)[0]
        (self._sq_head, self._sq_tail, self._sq_mask_off, _sq_n, _sq_flags, _sq_dropped,
         self._sq_array) = struct.unpack_from("<7I", raw, 40)
        (self._cq_head, self._cq_tail, self._cq_mask_off, _cq_n, _cq_overflow,
         self._cqes) = struct.unpack_from("<6I", raw, 80)
        self.sqe_size = 128 if self.flags & IORING_SETUP_SQE128 else 64
        self._maps: list[mmap.mmap] = []
        try:
            sq_len = self._sq_array + 4 * self.sq_entries
            cq_len = self._cqes + CQE_SIZE * self.cq_entries
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            if self.features & IORING_FEAT_SINGLE_MMAP:
                self.sq_ring = self.cq_ring = mmap.mmap(self.fd, max(sq_len, cq_len), mmap.MAP_SHARED, prot,
                                                        offset=IORING_OFF_SQ_RING)
                self._maps.append(self.sq_ring)
            else:
                self.sq_ring = mmap.mmap(self.fd, sq_len, mmap.MAP_SHARED, prot, offset=IORING_OFF_SQ_RING)
                self._maps.append(self.sq_ring)
                self.cq_ring = mmap.mmap(self.fd, cq_len, mmap.MAP_SHARED, prot, offset=IORING_OFF_CQ_RING)
                self._maps.append(self.cq_ring)
            self.sqes = mmap.mmap(self.fd, self.sqe_size * self.sq_entries, mmap.MAP_SHARED, prot,
                                  offset=IORING_OFF_SQES)
            self._maps.append(self.sqes)
        except BaseException:
            self.close()
            raise
        self._sq_mask = struct.unpack_from("<I", self.sq_ring, self._sq_mask_off)[0]
        self._cq_mask = struct.unpack_from("<I", self.cq_ring, self._cq_mask_off)[0]
        for i in range(self.sq_entries):  # identity indirection: slot i holds SQE i
            struct.pack_into("<I", self.sq_ring, self._sq_array + 4 * i, i)
        self._tail = struct.unpack_from("<I", self.sq_ring, self._sq_tail)[0]
        self._unsubmitted = 0

    # -- submission ------------------------------------------------------------------------------

    def space(self) -> int:
        head = struct.unpack_from("<I", self.sq_ring, self._sq_head)[0]
        return self.sq_entries - ((self._tail - head) & 0xFFFFFFFF)

    def queue(self, sqe: bytes) -> None:
        """Copy one SQE into the next free slot (published to the kernel by `submit`)."""
        if len(sqe) != self.sqe_size:
            raise ValueError(f"SQE is {len(sqe)} bytes, the ring takes {self.sqe_size}")
        if self.space() <= 0:
            self.submit()
            if self.space() <= 0:
                raise OSError(errno.EBUSY, "io_uring submission queue full")
        idx = self._tail & self._sq_mask
        self.sqes[idx * self.sqe_size:(idx + 1) * self.sqe_size] = sqe
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        struct.pack_into("<I", self.sq_ring, self._sq_tail, self._tail)  # after the SQE (x86 TSO)
        self._unsubmitted += 1

    def queue_struct(self, st: struct.Struct, *values: int) -> None:
        """`queue` without building bytes first: pack ``values`` with ``st`` into the next slot."""
        if st.size != self.sqe_size:
            raise ValueError(f"SQE struct is {st.size} bytes, the ring takes {self.sqe_size}")
        if self.space() <= 0:
            self.submit()
            if self.space() <= 0:
                raise OSError(errno.EBUSY, "io_uring submission queue full")
        st.pack_into(self.sqes, (self._tail & self._sq_mask) * self.sqe_size, *values)
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        struct.pack_into("<I", self.sq_ring, self._sq_tail, self._tail)
        self._unsubmitted += 1

    @property
    def unsubmitted(self) -> int:
        return self._unsubmitted

    def submit(self, wait_nr: int = 0, timeout: float | None = None) -> int:
        """io_uring_enter: hand queued SQEs to the kernel; with ``wait_nr`` wait for that many
        completions (at most ``timeout`` seconds if given). EINTR and ETIME just return."""
        to_submit = self._unsubmitted
        flags = IORING_ENTER_GETEVENTS if wait_nr else 0
        arg = None
        argsz = 0
        if wait_nr and timeout is not None:
            if not self.features & IORING_FEAT_EXT_ARG:
                raise OSError(errno.EOPNOTSUPP, "kernel lacks IORING_FEAT_EXT_ARG (timeouts)")
            sec = int(timeout)
            ts = (ctypes.c_int64 * 2)(sec, int((timeout - sec) * 1e9))
            arg = (ctypes.c_ubyte * 24)()
            struct.pack_into("<QIIQ", arg, 0, 0, 0, 0, ctypes.addressof(ts))
            argsz = 24
            flags |= IORING_ENTER_EXT_ARG
        ret = _syscall(ctypes.c_long(SYS_IO_URING_ENTER), ctypes.c_long(self.fd), ctypes.c_long(to_submit),
                       ctypes.c_long(wait_nr), ctypes.c_long(flags),
                       ctypes.c_void_p(ctypes.addressof(arg) if arg is not None else 0), ctypes.c_long(argsz))
        if ret < 0:
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.ETIME, errno.EAGAIN, errno.EBUSY):
                return 0
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
        self._unsubmitted = max(0, self._unsubmitted - ret)
        return ret

    # -- completion ------------------------------------------------------------------------------

    def completions(self) -> Iterator[Cqe]:
        """Every CQE available now; each is consumed (head advanced) as it is yielded."""
        head = struct.unpack_from("<I", self.cq_ring, self._cq_head)[0]
        tail = struct.unpack_from("<I", self.cq_ring, self._cq_tail)[0]
        while head != tail:
            off = self._cqes + (head & self._cq_mask) * CQE_SIZE
            ud, res, fl = struct.unpack_from("<QiI", self.cq_ring, off)
            head = (head + 1) & 0xFFFFFFFF
            struct.pack_into("<I", self.cq_ring, self._cq_head, head)
            yield Cqe(ud, res, fl)
            if head == tail:
                tail = struct.unpack_from("<I", self.cq_ring, self._cq_tail)[0]

    def wait(self, user_data: int, timeout: float) -> Cqe | None:
        """Submit what is queued and wait (bounded) for the CQE of ``user_data``; others dropped."""
        import time

        deadline = time.monotonic() + timeout
        self.submit()
        for _ in range(1_000_000):
            for cqe in self.completions():
                if cqe.user_data == user_data:
                    return cqe
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.submit(1, min(left, 1.0))
        return None

    def close(self) -> None:
        for m in self._maps:
            try:
                m.close()
            except (BufferError, ValueError):
                pass
        self._maps = []
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
