"""What the daemon counts itself: per-device reads where the backend calls the device (what the
kernel waits for), the log of a device's first reads (from which `bdserver optimize` takes a start
trace), and node events (requests, recoveries). The Prometheus endpoint and `bdserver stats` both
read these, and the read path's own counters, at the time they are asked."""

from __future__ import annotations

import threading
import time
from array import array
from collections import Counter
from typing import Any, Callable

from bdserver.backends.base import Device
from bdserver.vdev.stats import LatencyWindow

SAMPLES = 8192
READ_LOG = 1 << 16  # reads logged per device: a start makes hundreds to a few thousand


class ReadLog:
    """The first `cap` reads of a device: (seconds since attach, offset, length), compactly.

    Kept for every device (24 bytes a read, 1.5 MiB at most), so that the trace of a device that
    already ran a real workload can be taken without running it again."""

    def __init__(self, cap: int = READ_LOG) -> None:
        self.cap = cap
        self.t0 = time.perf_counter()
        self._t = array("d")
        self._off = array("q")
        self._len = array("q")

    def add(self, t: float, offset: int, length: int) -> None:
        """One read that began at ``t`` (time.perf_counter) (the caller serialises calls)."""
        if len(self._t) < self.cap:
            self._t.append(t - self.t0)
            self._off.append(offset)
            self._len.append(length)

    @property
    def full(self) -> bool:
        return len(self._t) >= self.cap

    def reads(self) -> list[tuple[float, int, int]]:
        return list(zip(self._t, self._off, self._len))


class MeteredDevice:
    """Wraps a device: counts reads, bytes, errors; keeps recent latencies and their histogram, and
    logs the first reads (`read_log`)."""

    def __init__(self, inner: Device) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self.latency = LatencyWindow(SAMPLES)
        self.read_log = ReadLog()
        self.reads = 0
        self.bytes_read = 0
        self.errors = 0

    @property
    def size(self) -> int:
        return self.inner.size

    def read(self, offset: int, length: int) -> bytes:
        t0 = time.perf_counter()
        try:
            data = self.inner.read(offset, length)
        except BaseException:
            with self._lock:
                self.errors += 1
                self.read_log.add(t0, offset, length)
            raise
        dt = time.perf_counter() - t0
        with self._lock:
            self.reads += 1
            self.bytes_read += len(data)
            self.read_log.add(t0, offset, length)
        self.latency.add(dt)
        return data

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "reads": self.reads,
                "bytes_read": self.bytes_read,
                "read_errors": self.errors,
            }
        out["latency_ms"] = self.latency.summary()
        inner_stats = getattr(self.inner, "stats", None)
        if callable(inner_stats):
            try:
                out["device"] = inner_stats()
            except Exception as exc:  # noqa: BLE001 - stats must never break the daemon
                out["device"] = {"error": str(exc)}
        return out


class Events:
    """Counts of node events by name and label values, e.g. ("recovery", ("failed",)): a fixed,
    small set of values, because each becomes a label value of the metrics endpoint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, tuple[str, ...]]] = Counter()

    def add(self, name: str, *labels: str) -> None:
        with self._lock:
            self._counts[(name, labels)] += 1

    def declare(self, name: str, *labels: str) -> None:
        """Make the series exist at 0 (Prometheus sees a counter start rather than appear)."""
        with self._lock:
            self._counts[(name, labels)] += 0

    def snapshot(self, name: str) -> dict[tuple[str, ...], int]:
        with self._lock:
            return {labels: n for (k, labels), n in self._counts.items() if k == name}


def count_requests(events: Events, ops: dict[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """The control socket's operations, each counting ("request", op, "ok" | "error")."""

    def counted(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(**kw: Any) -> Any:
            try:
                result = fn(**kw)
            except BaseException:
                events.add("request", op, "error")
                raise
            events.add("request", op, "ok")
            return result

        return call

    for op in ops:
        events.declare("request", op, "ok")
        events.declare("request", op, "error")
    return {op: counted(op, fn) for op, fn in ops.items()}
