"""FUSE backend: every device is a read-only file ``<run_dir>/fuse/<id>/disk`` on its own FUSE mount.

EROFS mounts that file directly (file-backed mount, kernel 6.12+), so no loop device is used. Each
device has its own connection, served by `fuse_server.FuseServer` (the FUSE protocol spoken on the
/dev/fuse fd, no libfuse) with its own threads: a device whose reads wait for the registry can only
tie up its own pool, never the threads another device's cache hits need.

Surviving the daemon: right after mounting, the connection's fd is handed to an fd keeper (the
daemon's fd store: systemd's FDSTORE or a holder process, see daemon/fdstore.py) under
``bdserver-fuse-<id>``. While any copy of that fd is open the kernel keeps the connection and queues
requests, so when the daemon dies, is killed or upgraded, the mount and every EROFS and overlay
mount on top of it stay valid. The next daemon's `attach` of the same id takes the fd back, asks the
kernel to resend what the dead one held (see fuse_server) and serves on: readers only wait.

`detach` unmounts and, if something (an EROFS mount) still holds the file, aborts the connection
through fusectl; then the threads end, the fd is closed and the keeper drops its copy, so nothing of
the device is left. `discard` does the same to a connection a previous daemon left whose device
cannot be reopened: its readers get EIO at once. `close` (the daemon exiting) keeps every connection
that the keeper holds.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bdserver import mounts
from bdserver.backends.base import Attached, Backend, Device
from bdserver.backends.fuse_server import FuseServer
from bdserver.errors import BdError, KernelError

log = logging.getLogger(__name__)

READ_AHEAD_KB = 512  # default kernel readahead on each FUSE bdi (config fuse_read_ahead_kb; INIT only lowers)
MIN_THREADS = 2
MAX_THREADS = 32  # per device (as many as the kernel sends background READs, plus a few)
FSTYPE = "fuse.bdserver"
FD_PREFIX = "bdserver-fuse-"
FUSECTL = "/sys/fs/fuse/connections"
INIT_WAIT_S = 30.0
JOIN_WAIT_S = 10.0


class FdKeeper(Protocol):
    """Holds copies of fds across daemon restarts (implemented by bdserver.daemon.fdstore)."""

    def keep(self, name: str, fd: int) -> None: ...

    def take(self, name: str) -> int | None: ...

    def drop(self, name: str) -> None: ...

    def names(self) -> list[str]: ...


@dataclass
class _Conn:
    """One device's FUSE connection: its fd, mount point, kernel connection id and server."""

    dev_id: str
    fd: int
    mountpoint: str
    major_minor: str
    server: FuseServer
    kept: bool = False  # a copy of fd is in the keeper

    @property
    def minor(self) -> str:
        return self.major_minor.split(":")[1]


def _kernel_release() -> tuple[int, int]:
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return 0, 0


def _filesystems() -> str:
    try:
        return Path("/proc/filesystems").read_text()
    except OSError:
        return ""


class FuseBackend(Backend):
    """Serves each device as a file on its own FUSE mount under ``<run_dir>/fuse``."""

    name = "fuse"

    def __init__(self, run_dir: str | None = None) -> None:
        self.run_dir = run_dir or os.environ.get("BDSERVER_RUN_DIR", "/run/bdserver")
        self.keeper: FdKeeper | None = None
        self.read_ahead_kb = READ_AHEAD_KB  # config fuse_read_ahead_kb (the DeviceManager configures it)
        self.lock = threading.RLock()
        self.conns: dict[str, _Conn] = {}

    # -- configuration -------------------------------------------------------------------------
    def configure(self, *, run_dir: str | None = None, fd_keeper: FdKeeper | None = None,
                  read_ahead_kb: int | None = None, **_: object) -> None:
        with self.lock:
            if read_ahead_kb is not None:
                self.read_ahead_kb = int(read_ahead_kb)
            if run_dir and run_dir != self.run_dir:
                if self.conns:
                    raise KernelError("cannot move the FUSE root while devices are attached")
                self.run_dir = run_dir
            if fd_keeper is not None:
                self.keeper = fd_keeper

    @property
    def root(self) -> str:
        return os.path.join(self.run_dir, "fuse")

    def mountpoint(self, dev_id: str) -> str:
        return os.path.join(os.path.realpath(self.root), dev_id)

    def available(self) -> tuple[bool, str]:
        if not os.path.exists("/dev/fuse"):
            return False, "/dev/fuse is missing (modprobe fuse)"
        fs = _filesystems()
        if "\tfuse\n" not in fs:
            return False, "the kernel has no FUSE filesystem (modprobe fuse)"
        if "erofs" not in fs:
            return False, "the kernel has no EROFS (modprobe erofs)"
        if _kernel_release() < (6, 12):
            return True, "EROFS file-backed mounts need 6.12+; a loop device will be used"
        return True, "FUSE file + EROFS file-backed mount"

    # -- lifecycle -----------------------------------------------------------------------------
    def attach(self, device: Device, dev_id: str) -> Attached:
        """Serve ``device`` as ``<root>/<dev_id>/disk``; take over the connection a previous daemon
        left for this id if there is one (``extra["adopted"]``), else mount a new one."""
        if not dev_id or "/" in dev_id or dev_id.startswith("."):
            raise KernelError(f"invalid device id {dev_id!r}")
        with self.lock:
            if dev_id in self.conns:
                raise KernelError(f"device {dev_id} is already attached")
            conn = self._adopt(dev_id, device) or self._mount(dev_id, device)
            self.conns[dev_id] = conn
        adopted = conn.server.resend_ok is not None
        path = os.path.join(conn.mountpoint, "disk")
        log.info("fuse: %s %s at %s (%d bytes)", "adopted" if adopted else "attached", dev_id, path, device.size)
        return Attached(path=path, backend=self.name, dev_id=dev_id,
                        extra={"fuse_root": self.root, "connection": conn.minor, "adopted": adopted})

    def adoptable(self, dev_id: str) -> bool:
        return self._leftover(dev_id) is not None

    def discard(self, dev_id: str) -> None:
        """A device the previous daemon served whose source cannot be reopened: unmount its FUSE mount,
        abort the connection (what was queued and what comes fails at once: readers of the EROFS
        mounts on it get EIO) and drop its fd from the keeper. Nothing of it is left."""
        with self.lock:
            conn = self.conns.pop(dev_id, None)
        if conn is not None:
            self._remove(conn.dev_id, conn.fd, conn.mountpoint, conn.major_minor, conn.server)
            return
        fd = self.keeper.take(FD_PREFIX + dev_id) if self.keeper is not None else None
        mnt = self.mountpoint(dev_id)
        found = _fuse_mount(mnt)
        if fd is not None or found is not None:
            log.warning("fuse: discarding %s: its readers get EIO", dev_id)
        self._remove(dev_id, fd, mnt, found.major_minor if found else "", None)

    def end_recovery(self, dev_ids: set[str]) -> None:
        """Remove connections the keeper still holds for devices nobody took back."""
        if self.keeper is None:
            return
        for name in self.keeper.names():
            dev_id = name[len(FD_PREFIX):]
            if not name.startswith(FD_PREFIX) or dev_id in dev_ids or dev_id in self.conns:
                continue
            log.warning("fuse: removing the leftover connection of unknown device %s", dev_id)
            self.discard(dev_id)

    def detach(self, attached: Attached) -> None:
        with self.lock:
            conn = self.conns.pop(attached.dev_id, None)
        if conn is None:
            return
        self._remove(conn.dev_id, conn.fd, conn.mountpoint, conn.major_minor, conn.server)
        log.info("fuse: detached %s", conn.dev_id)

    def close(self) -> None:
        """The daemon is exiting: connections in the keeper stay for the next daemon, the rest go."""
        with self.lock:
            conns = list(self.conns.values())
            self.conns.clear()
        for conn in conns:
            if conn.kept:
                conn.server.release()
                log.info("fuse: %s left to the next daemon", conn.dev_id)
            else:
                self._remove(conn.dev_id, conn.fd, conn.mountpoint, conn.major_minor, conn.server)

    def connection_id(self, dev_id: str) -> str | None:
        """The /sys/fs/fuse/connections entry of a device's live mount, if attached."""
        conn = self.conns.get(dev_id)
        return conn.minor if conn is not None else None

    # -- connections ---------------------------------------------------------------------------
    def _server(self, fd: int, dev_id: str, device: Device, major_minor: str) -> FuseServer:
        return FuseServer(fd, device, name=dev_id, min_threads=MIN_THREADS, max_threads=MAX_THREADS,
                          on_init=lambda _init: self._tune_bdi(major_minor))

    def _leftover(self, dev_id: str) -> str | None:
        """The major:minor of a live FUSE mount a previous daemon left for ``dev_id`` whose fd the
        keeper holds; None if there is nothing to take over."""
        if self.keeper is None or FD_PREFIX + dev_id not in self.keeper.names():
            return None
        found = _fuse_mount(self.mountpoint(dev_id))
        return found.major_minor if found else None

    def _adopt(self, dev_id: str, device: Device) -> _Conn | None:
        major_minor = self._leftover(dev_id)
        if major_minor is None or self.keeper is None:
            return None
        fd = self.keeper.take(FD_PREFIX + dev_id)
        if fd is None:
            return None
        server = self._server(fd, dev_id, device, major_minor)
        server.start(resend=True)
        self._tune_bdi(major_minor)
        return _Conn(dev_id, fd, self.mountpoint(dev_id), major_minor, server, kept=True)

    def _mount(self, dev_id: str, device: Device) -> _Conn:
        mnt = self.mountpoint(dev_id)
        while (stale := _fuse_mount(mnt)) is not None:  # died with an earlier daemon (ENOTCONN)
            log.warning("fuse: stale mount at %s, detaching it", mnt)
            _unmount(mnt)
            _abort(stale.major_minor.split(":")[1])
        os.makedirs(mnt, mode=0o700, exist_ok=True)
        if self.keeper is not None and (old := self.keeper.take(FD_PREFIX + dev_id)) is not None:
            os.close(old)  # its mount is gone: nothing to take over
            self.keeper.drop(FD_PREFIX + dev_id)
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
            mounts.sys_mount("bdserver", mnt, FSTYPE, mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV, opts)
        except OSError as exc:
            os.close(fd)
            raise KernelError(f"cannot mount FUSE at {mnt}: {exc.strerror}") from exc
        found = _fuse_mount(mnt)
        major_minor = found.major_minor if found else ""
        server = self._server(fd, dev_id, device, major_minor)
        conn = _Conn(dev_id, fd, mnt, major_minor, server)
        try:
            if self.keeper is not None:  # first, so that a crash from here on loses nothing
                try:
                    self.keeper.keep(FD_PREFIX + dev_id, fd)
                    conn.kept = True
                except (BdError, OSError) as exc:
                    log.warning("fuse: %s will not survive a daemon restart: %s", dev_id, exc)
            server.start()
            if not server.inited.wait(INIT_WAIT_S):
                raise KernelError(f"the kernel never sent INIT on {mnt}")
        except BaseException:
            self._remove(dev_id, fd, mnt, major_minor, server)
            raise
        return conn

    def _remove(self, dev_id: str, fd: int | None, mnt: str, major_minor: str, server: FuseServer | None) -> None:
        """Unmount, abort what is still connected, end the threads, close and forget the fd."""
        if server is not None:
            server.release()
        if _fuse_mount(mnt) is not None:
            _unmount(mnt)
        if major_minor:
            _abort(major_minor.split(":")[1])
        if fd is not None:
            if server is None or server.join(JOIN_WAIT_S):
                os.close(fd)
            else:  # a reader still waits for its device read: its late reply must not hit a reused fd
                log.warning("fuse: %s: %d readers still busy; the fd closes when they end", dev_id, server.threads)
                threading.Thread(target=_close_after, args=(server, fd), daemon=True).start()
        if self.keeper is not None:
            self.keeper.drop(FD_PREFIX + dev_id)
        try:
            os.rmdir(mnt)
        except OSError:
            pass

    def _tune_bdi(self, major_minor: str) -> None:
        """Raise readahead on the connection's bdi (INIT only lets us lower the kernel's 128 KiB)."""
        if not major_minor:
            return
        try:
            Path(f"/sys/class/bdi/{major_minor}/read_ahead_kb").write_text(str(self.read_ahead_kb))
        except OSError as exc:
            log.debug("fuse: read_ahead_kb of %s: %s", major_minor, exc)


def _close_after(server: FuseServer, fd: int) -> None:
    server.join(None)
    os.close(fd)


def _fuse_mount(mnt: str) -> mounts.MountInfo | None:
    """Our FUSE mount at ``mnt`` (an absolute real path), from mountinfo alone: stat()ing a mount
    point whose server is not running would wait for an answer that never comes."""
    return next((m for m in mounts.list_mounts() if m.target == mnt and m.fstype == FSTYPE), None)


def _unmount(mnt: str) -> None:
    try:
        mounts.sys_umount(mnt, mounts.MNT_DETACH)
    except OSError as exc:
        log.warning("fuse: unmount %s: %s", mnt, exc)


def _abort(minor: str) -> None:
    """Abort a connection that outlived its unmount (a file on it is still open): its waiters get an
    error at once and our readers wake up. No-op when the connection is already gone."""
    if not os.path.isdir(FUSECTL) or not os.listdir(FUSECTL):
        _mount_fusectl()
    path = os.path.join(FUSECTL, minor, "abort")
    try:
        with open(path, "w") as f:
            f.write("1")
        log.info("fuse: aborted connection %s", minor)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("fuse: abort connection %s: %s", minor, exc)


def _mount_fusectl() -> None:
    """Mount fusectl at its standard place (systemd does it at boot) so that connections can be aborted."""
    if any(m.target == FUSECTL for m in mounts.list_mounts()):
        return
    try:
        mounts.sys_mount("fusectl", FUSECTL, "fusectl")
    except OSError as exc:
        log.debug("fuse: mount fusectl: %s", exc)

