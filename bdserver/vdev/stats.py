"""Counters and the latency window of the read path (cheap enough for every kernel request).

`LatencyWindow` is the ONE way bdserver reports latencies (the device, its layers' fetches, the
daemon's per-device metrics): the last N samples, nearest-rank percentiles, milliseconds, always
the keys of `LatencyWindow.summary`; and, since a window forgets, cumulative counts in the fixed
`LATENCY_BUCKETS` (`histogram()`) for whoever exports distributions (the Prometheus endpoint).
"""

from __future__ import annotations

import bisect
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
    prefetched_bytes: int = 0  # uncompressed bytes of the prefetched chunks
    prefetch_used_bytes: int = 0  # uncompressed bytes of the prefetched chunks a reader asked for
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


# Upper bounds in seconds, from a cache hit (tens of microseconds) to the default fetch deadline.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class LatencyHistogram:
    """Every latency ever added: `counts[k]` fell in (bounds[k-1], bounds[k]]; the last is +Inf."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    def __add__(self, other: "LatencyHistogram") -> "LatencyHistogram":
        return LatencyHistogram(self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts)),
                                self.sum + other.sum)

    @classmethod
    def empty(cls) -> "LatencyHistogram":
        return cls(LATENCY_BUCKETS, (0,) * (len(LATENCY_BUCKETS) + 1), 0.0)


class LatencyWindow:
    """The last `size` latencies (seconds in, milliseconds out), and a histogram of all of them."""

    def __init__(self, size: int = 8192) -> None:
        self._lock = threading.Lock()
        self._d: deque[float] = deque(maxlen=size)
        self._counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._sum = 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._d.append(seconds)
            self._counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._sum += seconds

    def histogram(self) -> LatencyHistogram:
        with self._lock:
            return LatencyHistogram(LATENCY_BUCKETS, tuple(self._counts), self._sum)

    def samples(self) -> list[float]:
        with self._lock:
            return list(self._d)

    @classmethod
    def merged(cls, windows: Iterable["LatencyWindow"]) -> "LatencyWindow":
        """One window over the samples (and histograms) of several (e.g. a device's layers)."""
        windows = list(windows)
        samples = [x for w in windows for x in w.samples()]
        out = cls(max(1, len(samples)))
        out._d.extend(samples)
        hist = sum((w.histogram() for w in windows), LatencyHistogram.empty())
        out._counts, out._sum = list(hist.counts), hist.sum
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
