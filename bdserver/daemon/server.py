"""`bdserver serve`: the control socket (root only, mode 0600) in front of the DeviceManager.

Each connection carries one JSON-line request; requests run in their own threads so a slow attach
(fetch or on-node conversion) does not hold up `ls` or `stats`. One daemon per state dir (flock).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import socketserver
import struct
import threading
from typing import Any, Callable, Sequence

from bdserver.config import Config
from bdserver.daemon.fdstore import open_store
from bdserver.daemon.manager import DeviceManager
from bdserver.daemon.metrics import count_requests
from bdserver.daemon.prometheus import start_metrics
from bdserver.daemon.protocol import encode, error_reply, read_line
from bdserver.errors import BdError, DaemonError, KernelError
from bdserver.images.services import NodeServices

log = logging.getLogger(__name__)
REAP_INTERVAL_S = 1.0  # how often devices whose owner process is gone are detached (daemon/owner.py)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        try:
            line = read_line(sock)
            if not line:
                return
            if uid != 0:
                raise DaemonError(f"uid {uid} may not control bdserver (root only)")
            req = json.loads(line)
            op = req.get("op", "")
            args = req.get("args") or {}
            fn = self.server.ops.get(op)
            if fn is None:
                raise DaemonError(f"unknown request {op!r}")
            log.info("request %s from pid %d", op, pid, extra={"fields": {"op": op, "peer_pid": pid}})
            reply: dict[str, Any] = {"ok": True, "result": fn(**args)}
        except (BdError, ValueError, TypeError, OSError) as exc:
            if isinstance(exc, OSError):
                where = f" ({exc.filename})" if exc.filename else ""
                exc = KernelError(f"{exc.strerror or exc}{where}")
            elif not isinstance(exc, BdError):
                exc = DaemonError(f"bad request: {exc}")
            log.info("request failed: %s", exc.user_message())
            reply = error_reply(exc)
        except Exception as exc:  # noqa: BLE001 - the daemon survives every request
            log.exception("request failed with an internal error")
            reply = error_reply(exc)
        try:
            sock.sendall(encode(reply))
        except OSError:
            pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    ops: dict[str, Callable[..., Any]]


def _bind(path: str) -> _Server:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
    try:
        srv = _Server(path, _Handler)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    os.chown(path, 0, 0)
    return srv


# Imported when the daemon starts rather than inside the first attach/mount (~0.25 s of a cold
# start's critical path otherwise).
_PRELOAD = (
    "bdserver.oci.reference",
    "bdserver.oci.model",
    "bdserver.oci.store",
    "bdserver.oci.registry",
    "bdserver.oci.trust",
    "bdserver.oci.referrers",
    "bdserver.cache",
    "bdserver.blob.reader",
    "bdserver.vdev",
    "bdserver.vdev.lazyimage",
    "bdserver.backends.fuse",
    "httpcore",  # httpx imports it lazily, in its first transport
)


def _preload() -> None:
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - imported again (and reported) where used
            log.debug("preloading %s failed: %s", name, exc)


# A service that runs beside the control socket (e.g. containerd's snapshotter): started with the
# DeviceManager after recovery, it returns the function that stops it.
Service = Callable[[Config, DeviceManager], Callable[[], None]]


def serve(cfg: Config, extra_services: Sequence[Service] = ()) -> int:
    """Run until SIGTERM/SIGINT or a `shutdown` request. Returns the exit status."""
    if os.geteuid() != 0:
        raise DaemonError("bdserver serve must run as root (it mounts and serves block devices)")
    for d in (cfg.state_dir, cfg.run_dir, cfg.cache_dir):
        os.makedirs(d, mode=0o700, exist_ok=True)
    lock = open(os.path.join(cfg.state_dir, "bdserver.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise DaemonError(f"another bdserver daemon already uses {cfg.state_dir}") from exc
    _preload()
    services = NodeServices.from_config(cfg)
    mgr = DeviceManager(cfg, services, fd_keeper=open_store(cfg.run_dir))
    mgr.recover()
    srv = _bind(cfg.socket)
    metrics = start_metrics(cfg, mgr, services)
    stop = threading.Event()

    def shutdown() -> dict[str, Any]:
        stop.set()
        threading.Thread(target=srv.shutdown, daemon=True).start()
        return {"stopping": True}

    srv.ops = count_requests(mgr.events, {
        "ping": lambda: {"pid": os.getpid(), "state_dir": cfg.state_dir},
        "attach": mgr.attach,
        "mount": mgr.mount,
        "umount": mgr.umount,
        "detach": mgr.detach,
        "own": mgr.own,
        "ls": mgr.ls,
        "stats": mgr.stats,
        "trace": mgr.trace,
        "shutdown": shutdown,
        "cache_prune": services.prune_cache,
    })

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        shutdown()

    def reap_owners() -> None:
        while not stop.wait(REAP_INTERVAL_S):
            try:
                mgr.reap()
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad pass
                log.exception("detaching devices of gone owners failed")

    threading.Thread(target=reap_owners, name="owner-reaper", daemon=True).start()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with open(cfg.pid_file, "w") as f:
        f.write(f"{os.getpid()}\n")
    log.info("serving on %s state=%s devices=%d", cfg.socket, cfg.state_dir, len(mgr.records),
             extra={"fields": {"socket": cfg.socket, "pid": os.getpid()}})
    stops = [start(cfg, mgr) for start in extra_services]
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        for stop_service in reversed(stops):
            stop_service()
        srv.server_close()
        if metrics is not None:
            metrics.close()
        try:
            os.unlink(cfg.socket)
        except OSError:
            pass
        mgr.shutdown()
        try:
            os.unlink(cfg.pid_file)
        except OSError:
            pass
        log.info("stopped")
    return 0
