"""FUSE backend: every attached device is a read-only regular file ``<root>/<id>/disk``.

EROFS mounts that file directly (file-backed mount, kernel 6.12+), so no loop device is used.
pyfuse3 allows one session per process, so ONE FUSE mount (``<run_dir>/fuse``) serves every device
of this process; it is mounted with the first attach and unmounted with the last detach, leaving no
connection behind in /sys/fs/fuse/connections.

The FUSE loop runs trio in its own thread. Each READ is one trio task; the device read itself runs in
a worker thread (``trio.to_thread.run_sync`` behind a CapacityLimiter), so a read parked on a slow
registry fetch never blocks a cache hit on another range. Content is immutable: the kernel may keep
its page cache across opens (keep_cache) and attributes never time out while a device exists.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bdserver.backends.base import Attached, Backend, Device, checked_read
from bdserver.errors import KernelError
from bdserver import mounts

log = logging.getLogger(__name__)

try:  # pyfuse3 needs libfuse3; without it the backend reports itself unavailable.
    import pyfuse3
    import trio
except ImportError as _exc:  # pragma: no cover - depends on the host
    pyfuse3 = None  # type: ignore[assignment]
    _import_error = str(_exc)
else:
    _import_error = ""

READ_AHEAD_KB = 4096  # kernel readahead on the FUSE bdi (immutable content: generous is safe)
WORKER_THREADS = 64  # concurrent device reads in flight
MAX_TASKS = 256  # concurrent FUSE requests being handled
TTL = 365 * 24 * 3600.0
ROOT_INO = 1


@dataclass
class _Node:
    ino: int
    name: bytes
    parent: int
    is_dir: bool
    device: Device | None = None
    children: dict[bytes, int] = field(default_factory=dict)
    open_count: int = 0


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


class _Ops(pyfuse3.Operations if pyfuse3 else object):  # type: ignore[misc]
    """The pyfuse3 operations of the device directory tree (root / <id> / disk)."""

    def __init__(self, backend: FuseBackend) -> None:
        super().__init__()
        self.b = backend
        self.limiter = trio.CapacityLimiter(WORKER_THREADS)

    def _attr(self, node: _Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = TTL
        a.attr_timeout = TTL
        a.st_uid = 0
        a.st_gid = 0
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = self.b.start_ns
        a.st_blksize = 4096
        if node.is_dir:
            a.st_mode = stat.S_IFDIR | 0o500
            a.st_nlink = 2
            a.st_size = 0
        else:
            assert node.device is not None
            a.st_mode = stat.S_IFREG | 0o400
            a.st_nlink = 1
            a.st_size = node.device.size
            a.st_blocks = (node.device.size + 511) // 512
        return a

    def _node(self, ino: int) -> _Node:
        node = self.b.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def getattr(self, inode, ctx=None):  # noqa: ANN001 - pyfuse3 signature
        return self._attr(self._node(inode))

    async def lookup(self, parent_inode, name, ctx=None):  # noqa: ANN001
        parent = self._node(parent_inode)
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            return self._attr(self._node(parent.parent))
        ino = parent.children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self._node(ino))

    async def opendir(self, inode, ctx):  # noqa: ANN001
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):  # noqa: ANN001
        node = self._node(fh)
        with self.b.lock:  # attach/detach run in other threads
            entries = sorted(node.children.items(), key=lambda kv: kv[1])
        for name, ino in entries:
            if ino <= start_id or ino not in self.b.nodes:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(self.b.nodes[ino]), ino):
                break

    async def releasedir(self, fh):  # noqa: ANN001
        return None

    async def open(self, inode, flags, ctx):  # noqa: ANN001
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        with self.b.lock:
            node.open_count += 1
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    async def read(self, fh, off, size):  # noqa: ANN001
        node = self.b.nodes.get(fh)
        if node is None or node.device is None:
            raise pyfuse3.FUSEError(errno.EIO)
        try:
            return await trio.to_thread.run_sync(checked_read, node.device, off, size, limiter=self.limiter)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def write(self, fh, off, buf):  # noqa: ANN001
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setattr(self, inode, attr, fields, fh, ctx):  # noqa: ANN001
        raise pyfuse3.FUSEError(errno.EROFS)

    async def release(self, fh):  # noqa: ANN001
        node = self.b.nodes.get(fh)
        if node is not None:
            with self.b.lock:
                node.open_count = max(0, node.open_count - 1)

    async def statfs(self, ctx):  # noqa: ANN001
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        with self.b.lock:
            nodes = list(self.b.nodes.values())
        s.f_blocks = sum((n.device.size + 4095) // 4096 for n in nodes if n.device)
        s.f_files = len(nodes)
        s.f_namemax = 255
        return s


class FuseBackend(Backend):
    """Serves devices as files on one FUSE mount per process."""

    name = "fuse"
    _session_owner: FuseBackend | None = None  # pyfuse3 allows one session per process
    _session_lock = threading.Lock()

    def __init__(self, run_dir: str | None = None) -> None:
        self.run_dir = run_dir or os.environ.get("BDSERVER_RUN_DIR", "/run/bdserver")
        self.read_ahead_kb = READ_AHEAD_KB  # config fuse_read_ahead_kb (DeviceManager configures it)
        self.lock = threading.RLock()
        self.nodes: dict[int, _Node] = {}
        self.by_id: dict[str, int] = {}
        self._next_ino = ROOT_INO + 1
        self._thread: threading.Thread | None = None
        self._token = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.start_ns = time.time_ns()

    # -- configuration -------------------------------------------------------------------------
    def configure(self, *, run_dir: str | None = None, read_ahead_kb: int | None = None, **_: object) -> None:
        with self.lock:
            if read_ahead_kb is not None:
                self.read_ahead_kb = read_ahead_kb
            if run_dir and run_dir != self.run_dir:
                if self.by_id:
                    raise KernelError("cannot move the FUSE root while devices are attached")
                self.run_dir = run_dir

    @property
    def root(self) -> str:
        return os.path.join(self.run_dir, "fuse")

    def available(self) -> tuple[bool, str]:
        if pyfuse3 is None:
            return False, f"pyfuse3 is not importable ({_import_error}); install libfuse3 and pyfuse3"
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
        if not dev_id or "/" in dev_id or dev_id.startswith("."):
            raise KernelError(f"invalid device id {dev_id!r}")
        with self.lock:
            if dev_id in self.by_id:
                raise KernelError(f"device {dev_id} is already attached")
            self._ensure_started()
            d_ino, f_ino = self._next_ino, self._next_ino + 1
            self._next_ino += 2
            self.nodes[d_ino] = _Node(d_ino, dev_id.encode(), ROOT_INO, True, children={b"disk": f_ino})
            self.nodes[f_ino] = _Node(f_ino, b"disk", d_ino, False, device=device)
            self.nodes[ROOT_INO].children[dev_id.encode()] = d_ino
            self.by_id[dev_id] = d_ino
        path = os.path.join(self.root, dev_id, "disk")
        log.info("fuse: attached %s at %s (%d bytes)", dev_id, path, device.size)
        return Attached(path=path, backend=self.name, dev_id=dev_id, extra={"fuse_root": self.root})

    def detach(self, attached: Attached) -> None:
        with self.lock:
            d_ino = self.by_id.pop(attached.dev_id, None)
            if d_ino is None:
                return
            d = self.nodes.pop(d_ino, None)
            f_ino = d.children.get(b"disk") if d else None
            f = self.nodes.pop(f_ino, None) if f_ino else None
            self.nodes[ROOT_INO].children.pop(attached.dev_id.encode(), None)
            in_use = f is not None and f.open_count > 0
            last = not self.by_id
        if in_use:
            log.info("fuse: %s detached while a handle is open (an unmount releases asynchronously)", attached.dev_id)
        if last:
            self._stop()
        elif pyfuse3 is not None and d_ino is not None:
            try:
                pyfuse3.invalidate_entry_async(ROOT_INO, attached.dev_id.encode(), deleted=d_ino,
                                               ignore_enoent=True)
            except Exception as exc:  # noqa: BLE001 - best effort: the entry is gone from our table anyway
                log.debug("fuse: invalidate %s: %s", attached.dev_id, exc)
        log.info("fuse: detached %s", attached.dev_id)

    def close(self) -> None:
        with self.lock:
            self.by_id.clear()
        self._stop()

    # -- the FUSE session thread ---------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        ok, reason = self.available()
        if not ok:
            raise KernelError(f"FUSE backend unavailable: {reason}")
        with FuseBackend._session_lock:
            owner = FuseBackend._session_owner
            if owner is not None and owner is not self and owner._thread is not None:
                raise KernelError("another FUSE backend instance already serves this process")
            FuseBackend._session_owner = self
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        # A previous daemon that died leaves a dead mount (ENOTCONN): clear it first.
        if mounts.is_mountpoint(self.root):
            log.warning("fuse: stale mount at %s, detaching it", self.root)
            mounts.unmount(self.root, retries=1)
        self.nodes = {ROOT_INO: _Node(ROOT_INO, b"", ROOT_INO, True)}
        self._ready = threading.Event()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name="bdserver-fuse", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._start_error is not None or not self._ready.is_set():
            self._thread = None
            raise KernelError(f"cannot mount FUSE at {self.root}: {self._start_error or 'timed out'}")
        self._tune_bdi()

    def _run(self) -> None:
        ops = _Ops(self)
        options = set(pyfuse3.default_options) | {"fsname=bdserver", "subtype=bdserver", "ro", "allow_other"}
        try:
            pyfuse3.init(ops, self.root, options)
        except BaseException as exc:  # noqa: BLE001 - reported to the attaching thread
            self._start_error = exc
            self._ready.set()
            return
        try:
            trio.run(self._trio_main)
        except BaseException as exc:  # noqa: BLE001
            log.error("fuse: main loop failed: %s", exc)
        finally:
            try:
                pyfuse3.close(unmount=True)
            except Exception as exc:  # noqa: BLE001
                log.warning("fuse: close: %s", exc)

    async def _trio_main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._ready.set()
        await pyfuse3.main(min_tasks=8, max_tasks=MAX_TASKS)

    def _stop(self) -> None:
        thread, token = self._thread, self._token
        if thread is None:
            return
        if token is not None and thread.is_alive():
            try:
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=token)
            except (trio.RunFinishedError, RuntimeError) as exc:
                log.debug("fuse: terminate: %s", exc)
        thread.join(30)
        self._thread = None
        self._token = None
        # pyfuse3.close() detaches lazily; make sure nothing of ours is left mounted.
        if mounts.is_mountpoint(self.root):
            mounts.unmount(self.root, retries=5)
        log.info("fuse: unmounted %s", self.root)

    def _tune_bdi(self) -> None:
        """Raise readahead on the FUSE bdi (the kernel offers only 128 KiB at INIT)."""
        for m in mounts.find_mounts(target=self.root):
            p = Path(f"/sys/class/bdi/{m.major_minor}/read_ahead_kb")
            try:
                p.write_text(str(self.read_ahead_kb))
            except OSError as exc:
                log.debug("fuse: read_ahead_kb: %s", exc)

    def connection_id(self) -> str | None:
        """The /sys/fs/fuse/connections entry of the live mount (its device minor), if mounted."""
        for m in mounts.find_mounts(target=self.root):
            return m.major_minor.split(":")[1]
        return None
