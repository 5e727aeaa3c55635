"""The ublk backend: each attached device becomes a read-only /dev/ublkbN served from userspace.

Per device (see shared/reference/tcmu-ublk.md, Part B):

1. ADD_DEV on /dev/ublk-control (io_uring URING_CMD, 128-byte SQEs) creates /dev/ublkcN; the
   bdserver dev_id is remembered in the kernel's opaque ``ublksrv_flags`` (a 64-bit hash) so that
   a restarted daemon can find its devices again.
2. SET_PARAMS: 4 KiB logical and physical blocks, the size, read-only.
3. One queue of depth `QUEUE_DEPTH`: a ring thread opens /dev/ublkcN, maps the descriptor array,
   and submits one FETCH_REQ per tag from its own io_uring. ublk binds the queue to that thread:
   every COMMIT_AND_FETCH must come from it.
4. START_DEV (it waits for all the FETCHes, then adds the disk and scans it through our queue).

/dev/ublkcN and /dev/ublkbN are waited for through udev (`udev.DeviceWatch`, started before
ADD_DEV): attach returns once udev has processed the new disk.

A READ goes to a pool of worker threads: the worker copies the bytes into the tag's buffer,
queues (tag, result) and bumps an eventfd that the ring has a READ outstanding on, so a miss
waiting for the network never holds a cache hit behind it. A device that offers
``read_cached(offset, length) -> bytes | None`` (local data only, never the network) gets its
hits served by the ring thread itself, without the two thread hand-offs (they dominate latency).
Writes, discards and write zeroes are refused with -EROFS (the disk is read-only anyway), a flush
succeeds, a failed read is -EIO (base.checked_read is the one errno mapping). Detach is STOP_DEV
(the kernel drains I/O through the still-running queue, then aborts the fetches), join, unmap,
close, DEL_DEV.

Restarts: devices are created with UBLK_F_USER_RECOVERY when the kernel has it. `close()` (daemon
exit) stops serving but leaves the disk: its I/O waits. A later `attach` of the same dev_id and
size adopts it (START_USER_RECOVERY, fresh FETCHes, END_USER_RECOVERY), so /dev/ublkbN and its
mounts stay valid. A leftover that cannot be adopted is deleted and created anew.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import hashlib
import logging
import mmap
import os
import queue
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bdserver.backends import udev
from bdserver.backends import ublk_abi as abi
from bdserver.backends.base import Attached, Backend, Device, checked_read
from bdserver.backends.uring import (
    IORING_OP_URING_CMD, IORING_SETUP_COOP_TASKRUN, IORING_SETUP_SQE128, SQE_CMD16, IoUring, read_sqe,
    supported, uring_cmd_sqe,
)
from bdserver.errors import KernelError

log = logging.getLogger(__name__)

CONTROL = "/dev/ublk-control"
BLOCK_SIZE = 4096
QUEUE_DEPTH = 64
IO_BUF_BYTES = 512 * 1024  # per tag; the largest request the kernel sends us
READ_WORKERS = 16
CTRL_TIMEOUT_S = 120.0  # START_DEV scans the disk through our queue: slow under qemu TCG
NODE_WAIT_S = 60.0
CONTROL_WAIT_S = 5.0
_DESC = struct.Struct(abi.IoDesc.FMT)
WAKE = 1 << 62  # user_data of the eventfd read (tags are < QUEUE_DEPTH)


def _dev_key(dev_id: str) -> int:
    """The 64-bit tag stored in ``ublksrv_flags``: which bdserver device a ublk device serves."""
    return int.from_bytes(hashlib.sha256(b"bdserver:" + dev_id.encode()).digest()[:8], "little") | 1


class Control:
    """/dev/ublk-control and its SQE128 ring; one command at a time (they may block a while)."""

    def __init__(self) -> None:
        self.fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.ring = IoUring(4, IORING_SETUP_SQE128)
        except BaseException:
            os.close(self.fd)
            raise
        self.encoded = True
        self._lock = threading.Lock()
        self._seq = 0
        self._abandoned: list[Any] = []  # buffers of timed-out commands: the kernel may still write

    def command(self, op: int, dev_id: int, buf: bytearray | None = None, data0: int = 0,
                timeout: float = CTRL_TIMEOUT_S) -> int:
        """Send one control command; returns cqe.res (0 or -errno). ``buf`` is read and written."""
        with self._lock:
            cbuf = (ctypes.c_char * len(buf)).from_buffer(buf) if buf else None
            try:
                hdr = abi.CtrlCmd(dev_id=dev_id, len=len(buf) if buf else 0,
                                  addr=ctypes.addressof(cbuf) if cbuf is not None else 0, data0=data0)
                cmd_op = op if self.encoded else abi.LEGACY_CTRL[op]
                self._seq += 1
                self.ring.queue(uring_cmd_sqe(self.fd, cmd_op, hdr.pack(), self._seq, size=128))
                cqe = self.ring.wait(self._seq, timeout)
                if cqe is None:
                    self._abandoned.append((buf, cbuf))
            finally:
                del cbuf
        if cqe is None:
            raise KernelError(f"ublk control command {op:#x} for device {dev_id} did not finish "
                              f"within {timeout:.0f} s")
        return cqe.res

    def check(self, what: str, op: int, dev_id: int, buf: bytearray | None = None, data0: int = 0) -> None:
        res = self.command(op, dev_id, buf, data0)
        if res < 0:
            raise KernelError(f"ublk {what} of device {dev_id} failed: {os.strerror(-res)}")

    def dev_info(self, dev_id: int) -> abi.DevInfo | None:
        buf = bytearray(abi.DevInfo.SIZE)
        if self.command(abi.U_CMD_GET_DEV_INFO, dev_id, buf) < 0:
            return None
        return abi.DevInfo.unpack(bytes(buf))

    def params(self, dev_id: int) -> abi.Params | None:
        buf = bytearray(256)
        buf[0:4] = (256).to_bytes(4, "little")
        if self.command(abi.U_CMD_GET_PARAMS, dev_id, buf) < 0:
            return None
        return abi.Params.unpack(bytes(buf))

    def close(self) -> None:
        self.ring.close()
        os.close(self.fd)


class QueueServer:
    """Serves queue 0 of one ublk device: a ring thread plus a pool of read workers."""

    def __init__(self, ublk_id: int, info: abi.DevInfo, device: Device, name: str,
                 workers: int | None = None) -> None:
        self.ublk_id = ublk_id
        self.device = device
        self.depth = info.queue_depth
        self.buf_size = info.max_io_buf_bytes
        self.encoded = bool(info.flags & abi.F_CMD_IOCTL_ENCODE)
        self.commands = 0
        self.read_errors = 0
        self.inline_reads = 0
        # Optional device hook: ``read_cached(offset, length) -> bytes | None`` answers from local
        # data only and never waits for the network (None: not all local). Hits are then served by
        # the ring thread itself, with no hand-off; everything else goes to the pool.
        self._read_cached = getattr(device, "read_cached", None)
        self.error: str | None = None
        self._fetch_op = abi.U_IO_FETCH_REQ if self.encoded else abi.IO_FETCH_REQ
        self._commit_op = abi.U_IO_COMMIT_AND_FETCH_REQ if self.encoded else abi.IO_COMMIT_AND_FETCH_REQ
        self.fd = os.open(f"/dev/ublkc{ublk_id}", os.O_RDWR | os.O_CLOEXEC)
        self.desc: mmap.mmap | None = None
        self.bufs: mmap.mmap | None = None
        self._buf_ref = None
        self.efd = -1
        try:
            self.desc = mmap.mmap(self.fd, abi.desc_map_length(self.depth), mmap.MAP_SHARED, mmap.PROT_READ,
                                  offset=abi.desc_map_offset(0))
            # page-aligned per-tag buffers at fixed addresses for the device's life (copy mode)
            self.bufs = mmap.mmap(-1, self.depth * self.buf_size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            self._buf_ref = ctypes.c_char.from_buffer(self.bufs)
            self._buf_base = ctypes.addressof(self._buf_ref)
            # blocking: io_uring's READ of it then waits (poll-armed) instead of failing EAGAIN
            self.efd = os.eventfd(0, os.EFD_CLOEXEC)
            self._efd_val = ctypes.c_uint64(0)
        except BaseException:
            self._release()
            raise
        self._done: collections.deque[tuple[int, int]] = collections.deque()
        self._stop = False
        self._ready = threading.Event()
        workers = READ_WORKERS if workers is None else workers
        self._work: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._worker, name=f"{name}-read{i}", daemon=True)
                         for i in range(workers)]
        for t in self._workers:
            t.start()
        self._thread = threading.Thread(target=self._run, name=f"{name}-ring", daemon=True)
        self._thread.start()
        if not self._ready.wait(CTRL_TIMEOUT_S) or self.error:
            why = self.error or "the queue thread did not start"
            self.stop()
            raise KernelError(f"ublk queue of device {ublk_id} failed: {why}")

    def _io_cmd(self, ring: IoUring, op: int, tag: int, result: int = 0) -> None:
        """Queue FETCH or COMMIT_AND_FETCH for ``tag`` (an `abi.IoCmd` payload, packed in place)."""
        ring.queue_struct(SQE_CMD16, IORING_OP_URING_CMD, 0, 0, self.fd, op, 0, 0, 0, tag, 0, 0, 0,
                          0, tag, result, self._buf_base + tag * self.buf_size)

    # -- the ring thread -----------------------------------------------------------------------

    def _run(self) -> None:
        ring = None
        try:
            entries = 1 << (self.depth * 2 - 1).bit_length()
            try:
                ring = IoUring(entries, IORING_SETUP_COOP_TASKRUN)
            except OSError:
                ring = IoUring(entries, 0)
            for tag in range(self.depth):
                self._io_cmd(ring, self._fetch_op, tag)
            ring.queue(self._wake_sqe())
            ring.submit()
            for cqe in ring.completions():  # FETCH errors complete at once; success completes later
                if cqe.user_data != WAKE and cqe.res < 0:
                    self.error = f"FETCH_REQ of tag {cqe.user_data}: {os.strerror(-cqe.res)}"
                    return
            self._ready.set()
            self._serve(ring)
        except Exception as exc:  # noqa: BLE001 - the attach or detach waiting on us must know
            log.exception("ublk queue thread of device %d failed", self.ublk_id)
            self.error = self.error or str(exc)
        finally:
            self._ready.set()
            if ring is not None:
                ring.close()  # cancels whatever fetches are left (the kernel aborts their requests)

    def _serve(self, ring: IoUring) -> None:
        live = set(range(self.depth))
        while live and not self._stop:
            ring.submit(1)
            for cqe in ring.completions():
                if cqe.user_data == WAKE:  # the read consumed the counter: just re-arm it
                    ring.queue(self._wake_sqe())
                    continue
                tag = cqe.user_data
                if cqe.res == abi.IO_RES_OK:
                    self._dispatch(ring, tag)
                elif cqe.res == abi.IO_RES_ABORT:
                    live.discard(tag)  # STOP_DEV: this tag will get nothing more
                else:
                    log.error("ublk device %d tag %d: fetch/commit failed: %s", self.ublk_id, tag,
                              os.strerror(-cqe.res) if cqe.res < 0 else cqe.res)
                    live.discard(tag)
            while self._done:
                tag, result = self._done.popleft()
                self._io_cmd(ring, self._commit_op, tag, result)

    def _dispatch(self, ring: IoUring, tag: int) -> None:
        self.commands += 1
        op_flags, nr_sectors, start_sector, _addr = _DESC.unpack_from(self.desc, tag * abi.IO_DESC_SIZE)
        op = op_flags & 0xFF
        if op == abi.OP_READ:
            offset, length = start_sector << 9, nr_sectors << 9
            if length > self.buf_size:
                self._io_cmd(ring, self._commit_op, tag, -errno.EINVAL)
                return
            if self._read_cached is not None and self._try_inline(ring, tag, offset, length):
                return
            if self._workers:
                self._work.put((tag, offset, length))
            else:  # no pool: serve in the ring thread (lowest latency, but a miss blocks the queue)
                self._done.append((tag, self._read(tag, offset, length)))
        elif op == abi.OP_FLUSH:
            self._io_cmd(ring, self._commit_op, tag, 0)
        elif op in (abi.OP_WRITE, abi.OP_DISCARD, abi.OP_WRITE_ZEROES, abi.OP_WRITE_SAME):
            self._io_cmd(ring, self._commit_op, tag, -errno.EROFS)
        else:
            self._io_cmd(ring, self._commit_op, tag, -errno.EOPNOTSUPP)

    # -- read workers --------------------------------------------------------------------------

    def _try_inline(self, ring: IoUring, tag: int, offset: int, length: int) -> bool:
        size = self.device.size
        if offset >= size:
            return False  # let the pool path answer it the one way
        try:
            data = self._read_cached(offset, min(length, size - offset))
        except Exception:  # noqa: BLE001 - the pool path retries and maps the error
            return False
        if data is None or len(data) != min(length, size - offset):
            return False
        self._fill(tag, data, length)
        self.inline_reads += 1
        self._io_cmd(ring, self._commit_op, tag, length)
        return True

    def _fill(self, tag: int, data: bytes, length: int) -> None:
        start = tag * self.buf_size
        self.bufs[start:start + len(data)] = data
        if len(data) < length:  # the last block past the device's bytes reads as zeros
            self.bufs[start + len(data):start + length] = bytes(length - len(data))

    def _wake_sqe(self) -> bytes:
        return read_sqe(self.efd, ctypes.addressof(self._efd_val), 8, WAKE)

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            self._done.append((item[0], self._read(*item)))
            try:
                os.eventfd_write(self.efd, 1)
            except OSError:
                pass

    def _read(self, tag: int, offset: int, length: int) -> int:
        """Copy the device's bytes into the tag's buffer; the COMMIT result (bytes or -errno)."""
        try:
            self._fill(tag, checked_read(self.device, offset, length), length)
            result = length
        except OSError as exc:
            self.read_errors += 1
            result = -(exc.errno or errno.EIO)
        except Exception:  # noqa: BLE001 - a reader bug must not leave the request hanging
            self.read_errors += 1
            log.exception("ublk device %d: read at %d failed unexpectedly", self.ublk_id, offset)
            result = -errno.EIO
        return result

    # -- lifecycle -----------------------------------------------------------------------------

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Make the ring thread exit (if STOP_DEV has not already), then release everything."""
        if not self.join(0 if self._stop else 0.001):
            self._stop = True
            try:
                os.eventfd_write(self.efd, 1)
            except OSError:
                pass
            self.join(timeout)
        for _ in self._workers:
            self._work.put(None)
        for t in self._workers:
            t.join()
        self._release()

    def _release(self) -> None:
        self._buf_ref = None
        for m in (self.desc, self.bufs):
            if m is not None:
                try:
                    m.close()
                except (BufferError, ValueError):
                    pass
        self.desc = self.bufs = None
        for fd in (self.efd, self.fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.efd = self.fd = -1


@dataclass
class _Live:
    ublk_id: int
    server: QueueServer
    path: str
    extra: dict[str, Any] = field(default_factory=dict)


class UblkBackend(Backend):
    """ublk_drv: each attached device becomes a read-only /dev/ublkbN."""

    name = "ublk"

    def __init__(self, *, recovery: bool = True, kernel_read_only: bool = True) -> None:
        """``kernel_read_only=False`` leaves the disk writable in the block layer so that tests can
        see the server itself refuse writes; bdserver always uses the default."""
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()
        self._control: Control | None = None
        self._recovery = recovery
        self._kernel_ro = kernel_read_only

    # -- availability --------------------------------------------------------------------------

    def available(self) -> tuple[bool, str]:
        ok, why = supported()
        if not ok:
            return False, why
        if os.geteuid() != 0:
            return False, "needs root (/dev/ublk-control)"
        if not os.path.exists(CONTROL) and not _load_driver():
            return False, ("this kernel has no ublk (module ublk_drv, CONFIG_BLK_DEV_UBLK, Linux 6.0+); "
                           "try --backend tcmu or fuse")
        try:
            self._ctrl()
        except OSError as exc:
            return False, f"cannot use {CONTROL} through io_uring: {exc}"
        return True, "ublk_drv loaded"

    def _ctrl(self) -> Control:
        with self._lock:
            if self._control is None:
                self._control = Control()
            return self._control

    # -- attach --------------------------------------------------------------------------------

    def attach(self, device: Device, dev_id: str) -> Attached:
        ok, reason = self.available()
        if not ok:
            raise KernelError(f"ublk backend unavailable: {reason}")
        with self._lock:
            if dev_id in self._live:
                raise KernelError(f"device {dev_id} is already attached over ublk")
        ctrl = self._ctrl()
        key = _dev_key(dev_id)
        for n, info in self._ublk_devices(ctrl):
            if info.ublksrv_flags != key:
                continue
            try:
                return self._adopt(ctrl, n, info, device, dev_id)
            except Exception as exc:  # noqa: BLE001 - fall back to a clean re-creation
                log.warning("ublk: cannot adopt ublk%d for %s (%s); recreating it", n, dev_id, exc)
                self._delete(ctrl, n)
        return self._create(ctrl, device, dev_id, key)

    def _create(self, ctrl: Control, device: Device, dev_id: str, key: int) -> Attached:
        size = -(-device.size // BLOCK_SIZE) * BLOCK_SIZE
        flags = abi.F_USER_RECOVERY if self._recovery else 0
        req = abi.DevInfo(nr_hw_queues=1, queue_depth=QUEUE_DEPTH, max_io_buf_bytes=IO_BUF_BYTES,
                          dev_id=abi.DEV_ID_ANY, flags=flags, ublksrv_flags=key)
        with udev.DeviceWatch("ublk-char", "block") as watch:  # before ADD_DEV and START_DEV make them
            info = self._add_dev(ctrl, req, dev_id)
            n = info.dev_id
            server = None
            started = False
            try:
                basic = abi.ParamBasic(attrs=abi.ATTR_READ_ONLY if self._kernel_ro else 0,
                                       max_sectors=info.max_io_buf_bytes >> 9, dev_sectors=size >> 9)
                ctrl.check("SET_PARAMS", abi.U_CMD_SET_PARAMS, n, bytearray(abi.Params(basic).pack()))
                watch.wait(f"/dev/ublkc{n}", udev.named(f"ublkc{n}"), NODE_WAIT_S)
                server = QueueServer(n, info, device, name=f"ublk{n}")
                ctrl.check("START_DEV", abi.U_CMD_START_DEV, n, data0=os.getpid())
                started = True
                path = watch.wait(f"/dev/ublkb{n}", udev.named(f"ublkb{n}"), NODE_WAIT_S).device_node
            except BaseException:
                self._teardown(ctrl, n, server, started)
                raise
        extra = {"ublk_id": n, "char": f"/dev/ublkc{n}", "queue_depth": info.queue_depth,
                 "max_io_bytes": info.max_io_buf_bytes, "flags": info.flags, "block_size": BLOCK_SIZE,
                 "recovery": bool(info.flags & abi.F_USER_RECOVERY)}
        with self._lock:
            self._live[dev_id] = _Live(n, server, path, extra)
        log.info("ublk: %s attached as %s (flags %#x)", dev_id, path, info.flags)
        return Attached(path=path, backend=self.name, dev_id=dev_id, extra=extra)

    @staticmethod
    def _add_dev(ctrl: Control, req: abi.DevInfo, dev_id: str) -> abi.DevInfo:
        """ADD_DEV (it creates /dev/ublkcN); the kernel's answer holds the device number N."""
        buf = bytearray(req.pack())
        res = ctrl.command(abi.U_CMD_ADD_DEV, abi.DEV_ID_ANY, buf)
        if res in (-errno.EOPNOTSUPP, -errno.EINVAL) and ctrl.encoded:
            ctrl.encoded = False  # a 6.0-6.3 kernel: only the legacy command numbers
            buf = bytearray(req.pack())
            res = ctrl.command(abi.U_CMD_ADD_DEV, abi.DEV_ID_ANY, buf)
            if res < 0:
                ctrl.encoded = True
        if res < 0:
            raise KernelError(f"ublk ADD_DEV for {dev_id} failed: {os.strerror(-res)}")
        info = abi.DevInfo.unpack(bytes(buf))
        if info.flags & abi.F_CMD_IOCTL_ENCODE:
            ctrl.encoded = True
        return info

    def _adopt(self, ctrl: Control, n: int, info: abi.DevInfo, device: Device, dev_id: str) -> Attached:
        """Serve a device a dead daemon left behind (UBLK_F_USER_RECOVERY): same /dev/ublkbN."""
        if not info.flags & abi.F_USER_RECOVERY:
            raise KernelError("it was created without user recovery")
        params = ctrl.params(n)
        size = -(-device.size // BLOCK_SIZE) * BLOCK_SIZE
        if params is None or params.basic.dev_sectors != size >> 9:
            raise KernelError("its size differs")
        if info.state == abi.S_DEV_LIVE:
            # the old server is gone but the kernel has not noticed yet (its queue is quiesced once
            # the dying process's ring is torn down); give it a moment
            _deadline_wait(lambda: (ctrl.dev_info(n) or info).state != abi.S_DEV_LIVE, 30.0)
            info = ctrl.dev_info(n) or info
        if info.state not in (abi.S_DEV_QUIESCED, abi.S_DEV_FAIL_IO):
            raise KernelError(f"state {info.state} is not recoverable")
        ctrl.check("START_USER_RECOVERY", abi.U_CMD_START_USER_RECOVERY, n)
        server = QueueServer(n, info, device, name=f"ublk{n}")
        try:
            ctrl.check("END_USER_RECOVERY", abi.U_CMD_END_USER_RECOVERY, n, data0=os.getpid())
        except BaseException:
            server.stop()
            raise
        path = f"/dev/ublkb{n}"
        extra = {"ublk_id": n, "char": f"/dev/ublkc{n}", "queue_depth": info.queue_depth,
                 "max_io_bytes": info.max_io_buf_bytes, "flags": info.flags, "block_size": BLOCK_SIZE,
                 "recovery": True, "adopted": True}
        with self._lock:
            self._live[dev_id] = _Live(n, server, path, extra)
        log.info("ublk: %s adopted as %s", dev_id, path)
        return Attached(path=path, backend=self.name, dev_id=dev_id, extra=extra)

    @staticmethod
    def _ublk_devices(ctrl: Control) -> list[tuple[int, abi.DevInfo]]:
        """The ublk devices that exist (udev's ublk-char class), with what the kernel says of each."""
        out = []
        for char in sorted(udev.devices("ublk-char"), key=lambda dev: dev.sys_name):
            try:
                n = int(char.sys_name.removeprefix("ublkc"))
            except ValueError:
                continue
            info = ctrl.dev_info(n)
            if info is not None:
                out.append((n, info))
        return out

    # -- detach --------------------------------------------------------------------------------

    def detach(self, attached: Attached) -> None:
        with self._lock:
            live = self._live.pop(attached.dev_id, None)
        ctrl = self._ctrl()
        if live is None:
            n = (attached.extra or {}).get("ublk_id")
            if n is None:
                return
            info = ctrl.dev_info(int(n))
            if info is None or info.ublksrv_flags != _dev_key(attached.dev_id):
                return  # already gone (idempotent), or the number now belongs to someone else
            self._delete(ctrl, int(n))
            return
        self._teardown(ctrl, live.ublk_id, live.server, True)
        log.info("ublk: %s detached (%s)", attached.dev_id, live.path)

    def discard(self, dev_id: str) -> None:
        """A quiesced device (its server died) that no daemon will serve again: STOP_DEV fails its
        queued I/O (the kernel unquiesces and aborts with EIO) and DEL_DEV removes it."""
        with self._lock:
            if dev_id in self._live:
                raise KernelError(f"{dev_id} is served by this process: detach it instead")
        if not self.available()[0]:
            return
        ctrl = self._ctrl()
        for n, info in self._ublk_devices(ctrl):
            if info.ublksrv_flags == _dev_key(dev_id):
                self._delete(ctrl, n)
                log.info("ublk: discarded ublk%d of %s (its I/O fails with EIO)", n, dev_id)

    def _teardown(self, ctrl: Control, n: int, server: QueueServer | None, started: bool) -> None:
        """STOP_DEV while the queue still serves (the kernel drains I/O through it), then the queue
        exits on the aborted fetches; unmap and close everything of ours; DEL_DEV (which waits
        for every reference to /dev/ublkcN, so it must come last)."""
        errors = []
        if started:
            res = ctrl.command(abi.U_CMD_STOP_DEV, n)
            if res < 0:
                errors.append(f"STOP_DEV: {os.strerror(-res)}")
        if server is not None:
            if not server.join(30.0):
                log.warning("ublk%d: queue still running after STOP_DEV; closing it", n)
            server.stop()
        res = ctrl.command(abi.U_CMD_DEL_DEV, n)
        if res < 0 and res != -errno.ENODEV:
            errors.append(f"DEL_DEV: {os.strerror(-res)}")
        if errors:
            raise KernelError(f"ublk teardown of ublk{n} incomplete: " + "; ".join(errors))

    def _delete(self, ctrl: Control, n: int) -> None:
        """Remove a device nobody in this process serves (STOP_DEV fails its queued I/O)."""
        ctrl.command(abi.U_CMD_STOP_DEV, n)
        res = ctrl.command(abi.U_CMD_DEL_DEV, n)
        if res < 0 and res != -errno.ENODEV:
            raise KernelError(f"ublk DEL_DEV of ublk{n} failed: {os.strerror(-res)}")

    def stats(self, dev_id: str) -> dict[str, int]:
        live = self._live.get(dev_id)
        if live is None:
            return {}
        s = live.server
        return {"commands": s.commands, "read_errors": s.read_errors, "inline_reads": s.inline_reads}

    def close(self) -> None:
        """Stop serving every device. With user recovery the disks stay (their I/O waits) for the
        next daemon to adopt; without it the kernel removes them when the queue goes away."""
        with self._lock:
            lives = list(self._live.values())
            self._live.clear()
        for live in lives:
            try:
                live.server.stop(timeout=5.0)
            except Exception as exc:  # noqa: BLE001
                log.warning("ublk: stopping %s: %s", live.path, exc)


def _load_driver() -> bool:
    """modprobe ublk_drv; True once its control device has appeared (bounded wait)."""
    with udev.DeviceWatch("misc") as watch:
        if subprocess.run(["modprobe", "ublk_drv"], capture_output=True, check=False).returncode != 0:
            return False
        try:
            watch.wait(CONTROL, udev.named("ublk-control"), CONTROL_WAIT_S)
        except KernelError:
            return False
    return True


def _deadline_wait(probe, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 2):
        if probe():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return False
