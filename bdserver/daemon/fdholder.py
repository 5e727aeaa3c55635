"""The fd holder: a tiny process that keeps copies of the daemon's FUSE connection fds alive.

Why: the kernel keeps a FUSE connection (and the mounts on it) only while some fd of it is open.
Without systemd's fd store, this process holds a copy, so the daemon can crash, be killed or be
upgraded without taking the connections down; the next daemon asks for them back. It must survive
the daemon: it runs in its own session, holds no fds but its socket and the ones it was given,
imports nothing but the standard library and does nothing else.

Protocol (SOCK_SEQPACKET on ``<run_dir>/fdholder.sock``, mode 0600, root only), one message each:
``PUT <name>`` + one fd (SCM_RIGHTS) -> ``OK``; ``DEL <name>`` -> ``OK``; ``GET`` -> ``FD <name>`` + the
fd, once per fd held, then ``END``. A held fd that reports POLLERR or POLLHUP (its connection was
aborted or unmounted) is closed and forgotten. The holder exits when it holds nothing: after its
last fd goes, or if none arrives within a minute of its start.

Run as ``python -m bdserver.daemon.fdholder SOCKET`` (the daemon does; see fdstore.HolderStore).
The first process forks the holder and exits once the socket listens, so the caller can wait for
it and nobody has to reap the holder later.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys

FIRST_FD_WAIT_S = 60.0
CLIENT_TIMEOUT_S = 10.0
MAX_MSG = 4096


def _listen(path: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o177)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


class Holder:
    def __init__(self, listener: socket.socket, path: str) -> None:
        self.listener = listener
        self.path = path
        self.fds: dict[str, int] = {}
        self.poll = select.poll()
        self.poll.register(listener, select.POLLIN)

    def run(self) -> None:
        timeout_ms: int | None = int(FIRST_FD_WAIT_S * 1000)
        while True:
            events = self.poll.poll(timeout_ms)
            if not events and not self.fds:
                return  # nobody ever gave us anything
            for fd, ev in events:
                if fd == self.listener.fileno():
                    self._accept()
                elif ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self._forget(next((n for n, f in self.fds.items() if f == fd), None))
            if self.fds:
                timeout_ms = None
            elif timeout_ms is None:
                return  # the last fd went

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(CLIENT_TIMEOUT_S)
            _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                  struct.calcsize("3i")))
            if uid != os.getuid():
                return
            try:
                msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_MSG, 1)
                self._handle(conn, msg, fds)
            except OSError:
                return

    def _handle(self, conn: socket.socket, msg: bytes, fds: list[int]) -> None:
        verb, _, name_b = msg.partition(b" ")
        name = name_b.decode(errors="replace")
        if verb == b"PUT" and name and len(fds) == 1:
            self._forget(name)
            self.fds[name] = fds[0]
            self.poll.register(fds[0], 0)  # wake only for POLLERR / POLLHUP
            conn.send(b"OK")
            return
        for fd in fds:
            os.close(fd)
        if verb == b"DEL" and name:
            self._forget(name)
            conn.send(b"OK")
        elif verb == b"GET":
            for n, fd in list(self.fds.items()):
                socket.send_fds(conn, [b"FD " + n.encode()], [fd])
            conn.send(b"END")
        else:
            conn.send(b"ERR")

    def _forget(self, name: str | None) -> None:
        fd = self.fds.pop(name, None) if name is not None else None
        if fd is not None:
            self.poll.unregister(fd)
            os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bdserver.daemon.fdholder SOCKET", file=sys.stderr)
        return 2
    path = argv[0]
    listener = _listen(path)
    if os.fork() > 0:
        os._exit(0)  # the caller reaps this one; the holder lives on in the same (new) session
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):  # nothing of the caller's stays open here (its pipes would never see EOF)
        os.dup2(null, std)
    os.close(null)
    try:
        Holder(listener, path).run()
    finally:
        try:
            os.unlink(path)  # while we listen nobody else binds it (clients only start a holder when
        except OSError:       # connecting fails); one that connects while we leave retries anew
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
