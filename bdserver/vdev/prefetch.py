"""Fetch-ahead: after a miss, the next chunks travel in the background before the kernel asks.

A cold start is round-trip bound: the kernel faults misses one after another. On a miss in chunk i
(and when a reader first uses a chunk that was fetched ahead, so the window slides on) the next
`chunks` chunks not yet present or claimed are claimed through the layer's single-flight table
and fetched on the `ahead` pool as separate requests of at most `run` chunks each, so they travel
concurrently and land in the cache before they are faulted. At most `max_inflight` fetch-ahead
requests per device are on the wire; beyond that the fetch-ahead is skipped (never queued).
Failures are logged and counted, never raised: a reader that joined a failed fetch-ahead fetches
the chunk itself.

A start-trace replay ("these chunks, in this order") would claim through the same table and run on
the same pool: demand reads keep the reader's thread and the `demand` pool to themselves.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor
from typing import Callable, Iterable

from bdserver.errors import FetchError
from bdserver.vdev.inflight import ChunkFetch, InFlight
from bdserver.vdev.layercache import LayerCache
from bdserver.vdev.stats import Counter

log = logging.getLogger(__name__)


class Prefetcher:
    """The fetch-ahead policy and request budget of ONE device, shared by its layers."""

    def __init__(self, chunks: int = 12, max_inflight: int = 12, run: int = 1) -> None:
        self.chunks = max(0, int(chunks))
        self.max_inflight = max(0, int(max_inflight))
        self.run = max(1, int(run))
        self._lock = threading.Lock()
        self._inflight = 0

    @property
    def enabled(self) -> bool:
        return self.chunks > 0 and self.max_inflight > 0

    def try_acquire(self, n: int) -> int:
        """Reserve up to `n` request slots; returns how many were granted."""
        with self._lock:
            k = max(0, min(n, self.max_inflight - self._inflight))
            self._inflight += k
            return k

    def release(self, n: int = 1) -> None:
        with self._lock:
            self._inflight -= n

    @property
    def inflight(self) -> int:
        with self._lock:
            return self._inflight


class FetchAhead:
    """Fetch-ahead for one layer: `after(i)` on a miss, `used(chunks)` on hits and joins."""

    def __init__(
        self,
        policy: Prefetcher,
        pool: Executor,
        inflight: InFlight,
        layer: LayerCache,
        fetch: Callable[[dict[int, ChunkFetch]], object],
        nchunks: int,
        stats: Counter,
        name: str,
    ) -> None:
        self.policy = policy
        self._pool = pool
        self._inflight = inflight
        self._layer = layer
        self._fetch = fetch  # fetches, stores and resolves claimed chunks (raises on failure)
        self._n = nchunks
        self.stats = stats
        self.name = name
        self._lock = threading.Lock()
        self._window: set[int] = set()  # fetched ahead, not yet asked for by a reader
        self._closed = False

    def close(self) -> None:
        """No new fetch-aheads (those on the wire hold claims: the source waits for them)."""
        self._closed = True

    def after(self, i: int) -> None:
        """Claim and fetch in the background the chunks after `i`. Never raises, never waits."""
        try:
            self._schedule(i)
        except Exception as e:  # noqa: BLE001 - an optimisation must never fail the read
            self.stats.add(prefetch_errors=1)
            log.warning("%s: fetch-ahead after chunk %d not scheduled: %s", self.name, i, e)

    def used(self, chunks: Iterable[int]) -> None:
        """A reader reached chunks: those fetched ahead are counted and slide the window on."""
        if not self._window:
            return
        with self._lock:
            used = [i for i in chunks if i in self._window]
            self._window.difference_update(used)
        if used:
            self.stats.add(prefetch_used=len(used), prefetch_used_bytes=self._bytes(used))
            self.after(max(used))

    def _bytes(self, chunks: Iterable[int]) -> int:
        offs = self._layer.offsets
        return sum(offs[i + 1] - offs[i] for i in chunks)

    def _schedule(self, i: int) -> None:
        pf = self.policy
        hi = min(self._n, i + 1 + pf.chunks)
        if i + 1 >= hi or self._closed:
            return
        cand = [j for j in range(i + 1, hi) if j not in self._inflight and not self._layer.has(j)]
        runs: list[list[int]] = []
        for j in cand:
            if runs and runs[-1][-1] == j - 1 and len(runs[-1]) < pf.run:
                runs[-1].append(j)
            else:
                runs.append([j])
        granted = pf.try_acquire(len(runs))
        started = 0
        try:
            for r in runs[:granted]:
                if self._closed:
                    break
                mine = self._inflight.claim_ahead(r, self._layer.has)
                if not mine:
                    continue
                with self._lock:
                    self._window.update(mine)
                try:
                    self._pool.submit(self._run, mine)
                except RuntimeError as e:  # the pools are shutting down: give back what no reader took over
                    self._forget(mine)
                    own = self._inflight.start(mine)
                    self._inflight.fail(own, FetchError(f"{self.name}: fetch-ahead not started: {e}"))
                    continue
                started += 1
        finally:
            if granted > started:
                pf.release(granted - started)

    def _forget(self, mine: Iterable[int]) -> None:
        with self._lock:
            self._window.difference_update(mine)

    def _run(self, mine: dict[int, ChunkFetch]) -> None:
        try:
            own = self._inflight.start(mine)  # readers may have taken some over while it was queued
            self._forget(i for i in mine if i not in own)
            runs: list[list[int]] = []
            for i in sorted(own):
                if runs and runs[-1][-1] == i - 1:
                    runs[-1].append(i)
                else:
                    runs.append([i])
            for r in runs:
                try:
                    self._fetch({i: own[i] for i in r})
                    self.stats.add(prefetches=1, prefetched_chunks=len(r), prefetched_bytes=self._bytes(r))
                except BaseException as e:  # noqa: BLE001 - the claims carry the error; readers retry
                    self._forget(r)
                    self.stats.add(prefetch_errors=1)
                    log.warning("%s: fetch-ahead of chunks %d..%d failed: %s", self.name, r[0], r[-1], e)
        finally:
            self.policy.release()
