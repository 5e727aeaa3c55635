"""Per-device read metrics measured where the backend calls the device (what the kernel waits for)."""

from __future__ import annotations

import threading
import time
from typing import Any

from bdserver.backends.base import Device
from bdserver.vdev.stats import LatencyWindow

SAMPLES = 8192


class MeteredDevice:
    """Wraps a device: counts reads, bytes, errors and keeps recent latencies for percentiles."""

    def __init__(self, inner: Device) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._lat = LatencyWindow(SAMPLES)
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
            raise
        dt = time.perf_counter() - t0
        with self._lock:
            self.reads += 1
            self.bytes_read += len(data)
        self._lat.add(dt)
        return data

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "reads": self.reads,
                "bytes_read": self.bytes_read,
                "read_errors": self.errors,
            }
        out["latency_ms"] = self._lat.summary()
        inner_stats = getattr(self.inner, "stats", None)
        if callable(inner_stats):
            try:
                out["device"] = inner_stats()
            except Exception as exc:  # noqa: BLE001 - stats must never break the daemon
                out["device"] = {"error": str(exc)}
        return out
