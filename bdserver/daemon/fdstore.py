"""Copies of fds that must outlive the daemon: systemd's fd store, else the fd holder process.

Why: a FUSE connection, and every mount on it, lives while any fd of it is open. The FUSE backend
hands each connection's fd here (``keep``) right after mounting; when the daemon dies or is
upgraded the copy keeps the connection, and the next daemon gets it back (``names``, ``take``).
``drop`` forgets it for good (detach). Names are ``bdserver-fuse-<device id>``.

* Under systemd (``NOTIFY_SOCKET`` set; the unit has ``FileDescriptorStoreMax=``): ``FDSTORE=1`` +
  ``FDNAME=`` with the fd as SCM_RIGHTS, ``FDSTOREREMOVE=1`` to drop; the next start receives them in
  ``LISTEN_FDS``/``LISTEN_FDNAMES``. systemd itself drops an fd that reports POLLHUP/POLLERR.
* Elsewhere: `fdholder` (a process of its own session, started on the first ``keep``), reached
  over ``<run_dir>/fdholder.sock``; it exits when it holds nothing.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import subprocess
import sys
import threading
from abc import ABC, abstractmethod

from bdserver.errors import DaemonError

log = logging.getLogger(__name__)

HOLDER_SOCKET = "fdholder.sock"
SD_LISTEN_FDS_START = 3
_TIMEOUT_S = 10.0
_MAX_MSG = 4096


class FdStore(ABC):
    """Fds handed back by the previous daemon (until taken) and the copies this daemon keeps."""

    def __init__(self, handed_back: dict[str, int]) -> None:
        self._handed = handed_back
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Names of fds the previous daemon kept that nobody has taken yet."""
        with self._lock:
            return sorted(self._handed)

    def take(self, name: str) -> int | None:
        """Our own copy of a handed-back fd (the store keeps its copy until ``drop``)."""
        with self._lock:
            return self._handed.pop(name, None)

    @abstractmethod
    def keep(self, name: str, fd: int) -> None:
        """Store a copy of ``fd`` under ``name``. Raises DaemonError if it cannot."""

    @abstractmethod
    def drop(self, name: str) -> None:
        """Forget the copy stored under ``name`` (no-op if there is none)."""

    def close_unused(self) -> None:
        """Close our copies of handed-back fds nobody took (the store still has its own)."""
        with self._lock:
            fds, self._handed = list(self._handed.values()), {}
        for fd in fds:
            os.close(fd)


class SystemdStore(FdStore):
    """systemd's per-service fd store (the notify protocol, no libsystemd)."""

    def __init__(self, notify_socket: str, handed_back: dict[str, int]) -> None:
        super().__init__(handed_back)
        self.addr = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket

    @classmethod
    def from_environment(cls) -> SystemdStore:
        """Takes LISTEN_FDS/LISTEN_FDNAMES meant for this process and removes them from the environment
        (children must not believe they are theirs)."""
        handed: dict[str, int] = {}
        if os.environ.get("LISTEN_PID") == str(os.getpid()):
            count = int(os.environ.get("LISTEN_FDS", "0") or 0)
            names = os.environ.get("LISTEN_FDNAMES", "").split(":")
            for i in range(count):
                fd = SD_LISTEN_FDS_START + i
                os.set_inheritable(fd, False)
                name = names[i] if i < len(names) and names[i] else f"unknown-{i}"
                if name in handed:  # stored twice: one copy is enough
                    os.close(fd)
                    continue
                handed[name] = fd
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
        return cls(os.environ["NOTIFY_SOCKET"], handed)

    def _notify(self, text: str, fd: int | None = None) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.sendmsg([text.encode()], anc, 0, self.addr)
            except OSError as exc:
                raise DaemonError(f"cannot reach systemd's notify socket ({exc.strerror})") from exc

    def keep(self, name: str, fd: int) -> None:
        self._notify(f"FDSTORE=1\nFDNAME={name}", fd)

    def drop(self, name: str) -> None:
        try:
            self._notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        except DaemonError as exc:
            log.warning("fd store: drop %s: %s", name, exc)


class HolderStore(FdStore):
    """The `fdholder` process of this run dir."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._spawn_lock = threading.Lock()
        super().__init__(self._fetch())

    def _connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(_TIMEOUT_S)
        try:
            s.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            return None
        return s

    def _fetch(self) -> dict[str, int]:
        s = self._connect()
        if s is None:
            return {}
        handed: dict[str, int] = {}
        with s:
            s.send(b"GET")
            while True:
                msg, fds, _flags, _addr = socket.recv_fds(s, _MAX_MSG, 1)
                if msg.startswith(b"FD ") and len(fds) == 1:
                    handed[msg[3:].decode(errors="replace")] = fds[0]
                    continue
                for fd in fds:
                    os.close(fd)
                break
        if handed:
            log.info("fd store: the holder handed back %d fds", len(handed))
        return handed

    def _spawn(self) -> None:
        """Start the holder (it forks itself away once its socket listens, so we wait for that)."""
        if os.path.exists(self.path):
            os.unlink(self.path)  # a holder that died without cleaning up
        proc = subprocess.run([sys.executable, "-m", "bdserver.daemon.fdholder", self.path],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True, close_fds=True, cwd="/", timeout=60, check=False)
        if proc.returncode != 0:
            raise DaemonError(f"cannot start the fd holder: {proc.stderr.decode(errors='replace').strip()[-300:]}")
        log.info("fd store: started the fd holder on %s", self.path)

    def _call(self, msg: bytes, fd: int | None = None, *, start: bool) -> None:
        for attempt in range(2):
            s = self._connect()
            if s is None:
                if not start:
                    return
                with self._spawn_lock:
                    s = self._connect()
                    if s is None:
                        self._spawn()
                        s = self._connect()
                if s is None:
                    raise DaemonError(f"the fd holder does not answer on {self.path}")
            try:
                with s:
                    socket.send_fds(s, [msg], [fd]) if fd is not None else s.send(msg)
                    if s.recv(16) == b"OK":
                        return
            except OSError:
                pass  # it was leaving (empty) as we came: try once more, with a fresh holder
        raise DaemonError(f"the fd holder on {self.path} refused {msg.split(b' ')[0].decode()}")

    def keep(self, name: str, fd: int) -> None:
        self._call(b"PUT " + name.encode(), fd, start=True)

    def drop(self, name: str) -> None:
        try:
            self._call(b"DEL " + name.encode(), start=False)
        except DaemonError as exc:
            log.warning("fd store: drop %s: %s", name, exc)


def open_store(run_dir: str) -> FdStore:
    """The store for this daemon: systemd's when it runs us with a notify socket, else the holder's."""
    if os.environ.get("NOTIFY_SOCKET"):
        return SystemdStore.from_environment()
    return HolderStore(os.path.join(run_dir, HOLDER_SOCKET))
