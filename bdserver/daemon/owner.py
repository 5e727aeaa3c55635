"""The process a device lives for: a pid plus its start time, so that a reused pid is never taken for it.

A runtime hook names the process whose death ends a device's use (podman while it creates the
container, then the container's init). Runtimes skip their poststop hooks when a create fails
(podman runs them only for a container it created), so the daemon itself detaches a device whose
owner is gone, or whose owner did not hand it over by a deadline. Read from /proc: survives a
daemon restart, unlike a pidfd.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of ``pid``, None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0].decode(), int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)


@dataclass
class Owner:
    pid: int
    start: int  # -1: the process was already gone when it was named
    until: float = 0.0  # wall-clock deadline by which the owner must hand the device over (0: none)

    @classmethod
    def of(cls, pid: int, lease_s: float = 0.0) -> Owner:
        st = _stat(pid)
        return cls(pid, st[1] if st else -1, time.time() + lease_s if lease_s > 0 else 0.0)

    @property
    def token(self) -> str:
        """``PID:START``: names this process and no later one that reuses its pid."""
        return f"{self.pid}:{self.start}"

    def gone(self, now: float) -> bool:
        if self.until and now > self.until:
            return True
        st = _stat(self.pid)
        return st is None or st[1] != self.start or st[0] in ("Z", "X")
