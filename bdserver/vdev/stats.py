"""Counters and a latency window for the read path (cheap enough for every kernel request)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass


@dataclass
class FetchStats:
    """Per lazy blob: what the network did for us."""

    chunk_hits: int = 0
    chunk_misses: int = 0
    fetches: int = 0  # range requests issued
    fetched_bytes: int = 0  # on-blob (compressed) bytes received
    fetched_chunks: int = 0
    joined: int = 0  # misses served by another thread's in-flight fetch (single-flight)
    fetch_errors: int = 0
    integrity_errors: int = 0
    cache_put_errors: int = 0
    prefetches: int = 0  # background fetch-ahead requests issued (also counted in `fetches`)
    prefetched_chunks: int = 0
    prefetch_errors: int = 0  # failed fetch-aheads: logged and counted, never raised to a reader
    prefetch_used: int = 0  # prefetched chunks a reader later asked for


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
    """The last `size` read latencies; percentiles are computed on demand."""

    def __init__(self, size: int = 8192) -> None:
        self._lock = threading.Lock()
        self._d: deque[float] = deque(maxlen=size)
        self.count = 0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._d.append(seconds)
            self.count += 1

    def samples(self) -> list[float]:
        with self._lock:
            return list(self._d)

    def percentiles(self, ps: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
        with self._lock:
            xs = sorted(self._d)
        out: dict[str, float] = {}
        for p in ps:
            key = f"p{p:g}_ms"
            if not xs:
                out[key] = 0.0
            else:
                k = min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))
                out[key] = xs[k] * 1000
        return out
