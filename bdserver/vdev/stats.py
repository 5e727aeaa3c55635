"""Counters and the latency window of the read path (cheap enough for every kernel request).

`LatencyWindow` is the ONE way bdserver reports latencies (the device, its layers' fetches, the
daemon's per-device metrics): the last N samples, nearest-rank percentiles, milliseconds, always
the keys of `LatencyWindow.summary`.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterable


@dataclass
class FetchStats:
    """Per lazy blob: what the network did for us."""

    chunk_hits: int = 0
    chunk_misses: int = 0
    fetches: int = 0  # range requests issued
    fetched_bytes: int = 0  # on-blob (compressed) bytes received
    fetched_chunks: int = 0
    joined: int = 0  # misses served by another thread's in-flight fetch (single-flight)
    join_timeouts: int = 0  # joins that gave up after the fetch deadline
    fetch_errors: int = 0
    integrity_errors: int = 0
    cache_put_errors: int = 0
    prefetches: int = 0  # background fetch-ahead requests issued (also counted in `fetches`)
    prefetched_chunks: int = 0
    prefetch_errors: int = 0  # failed fetch-aheads: logged and counted, never raised to a reader
    prefetch_used: int = 0  # prefetched chunks a reader later asked for
    replay_fetches: int = 0  # start-trace replay requests issued (also counted in `fetches`)
    replayed_chunks: int = 0
    replay_errors: int = 0  # failed replay requests: logged and counted, never raised to a reader
    replay_used: int = 0  # replayed chunks a reader later asked for


class Counter:
    """A FetchStats behind a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = FetchStats()

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.value, k, getattr(self.value, k) + v)

    def hit(self) -> None:
        with self._lock:
            self.value.chunk_hits += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return asdict(self.value)


class LatencyWindow:
    """The last `size` latencies (seconds in, milliseconds out)."""

    def __init__(self, size: int = 8192) -> None:
        self._lock = threading.Lock()
        self._d: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        with self._lock:
            self._d.append(seconds)

    def samples(self) -> list[float]:
        with self._lock:
            return list(self._d)

    @classmethod
    def merged(cls, windows: Iterable["LatencyWindow"]) -> "LatencyWindow":
        """One window over the samples of several (e.g. a device's layers)."""
        samples = [x for w in windows for x in w.samples()]
        out = cls(max(1, len(samples)))
        out._d.extend(samples)
        return out

    def summary(self) -> dict[str, float]:
        """{"p50", "p90", "p99", "max"} in ms (nearest rank) and "samples"."""
        with self._lock:
            xs = sorted(self._d)
        out: dict[str, float] = {}
        for p in (50, 90, 99):
            out[f"p{p}"] = round(xs[max(0, math.ceil(p / 100 * len(xs)) - 1)] * 1e3, 3) if xs else 0.0
        out["max"] = round(xs[-1] * 1e3, 3) if xs else 0.0
        out["samples"] = len(xs)
        return out
