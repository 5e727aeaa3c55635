"""The read path of one layer: cache hit -> pread; miss -> claim -> one request per run -> verify.

`LazyBlobSource` puts the parts together: `LayerCache` (hits, stores), `InFlight` (single flight,
bounded joins), `RunFetcher` (coalesced, verified range requests), `FetchAhead` (background
fetches after misses), on the `FetchPools` its owner passes in. A read splits at chunk
boundaries; hits are served at once; the missing chunks are claimed (never fetched twice at once),
each run of adjacent claimed chunks is ONE range request (the first on the reader's thread, the
others concurrently on the demand pool), and chunks claimed by other threads are joined for at
most the fetch deadline.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Iterable

from bdserver.blob.reader import ChunkedBlob
from bdserver.cache import CacheKey, ChunkCache
from bdserver.errors import BdError, FetchError
from bdserver.vdev.inflight import ChunkFetch, InFlight
from bdserver.vdev.layercache import LayerCache
from bdserver.vdev.pools import FetchPools
from bdserver.vdev.prefetch import FetchAhead, Prefetcher
from bdserver.vdev.runs import RunFetcher
from bdserver.vdev.stats import Counter, LatencyWindow

DEFAULT_FETCH_DEADLINE = 30.0  # seconds a read waits for a fetch it joined (the daemon passes its config)


class LazyBlobSource:
    """The uncompressed image data of one layer blob, fetched chunk by chunk on demand.

    `key` names the blob AND the chunk index that `blob` verifies with: the cache entry it reads
    and fills holds only what that index accepted."""

    def __init__(
        self,
        blob: ChunkedBlob,
        key: CacheKey,
        cache: ChunkCache | None,
        pools: FetchPools,
        *,
        name: str | None = None,
        write_behind: bool = False,
        prefetcher: Prefetcher | None = None,
        fetch_deadline: float = DEFAULT_FETCH_DEADLINE,
    ) -> None:
        self.blob = blob
        self.key = key
        self.digest = key.blob
        self.name = name or key.blob
        self.size = blob.size
        self.fetch_deadline = fetch_deadline
        self._offsets = blob.index.uncompressed_offsets()
        self._pools = pools
        self.stats = Counter()
        self.fetch_latency = LatencyWindow(2048)
        self.layer = LayerCache(cache, key, self._offsets, pools.writers, self.stats, write_behind=write_behind,
                                name=self.name)
        self.inflight = InFlight(self.name)
        self.fetcher = RunFetcher(blob, self.stats, self.fetch_latency, self.name)
        self.ahead: FetchAhead | None = None
        self._replayed: set[int] = set()  # fetched by a start-trace replay, not yet read
        self._replayed_lock = threading.Lock()
        if prefetcher is not None and prefetcher.enabled and cache is not None:  # it needs somewhere to keep them
            self.ahead = FetchAhead(prefetcher, pools.ahead, self.inflight, self.layer, self._fetch_and_resolve,
                                    len(blob.index), self.stats, self.name)

    def close(self) -> None:
        """Stop fetching ahead, let fetches still on the wire (the kernel's readahead often is
        when a daemon stops) reach the cache, flush, release: a graceful restart finds every
        chunk that was fetched."""
        if self.ahead is not None:
            self.ahead.close()
        self.inflight.wait_idle(self.fetch_deadline)
        self.layer.close()

    def flush(self) -> None:
        self.layer.flush()

    def stop_fetch_ahead(self) -> None:
        """No more fetch-ahead after misses (a start-trace replay says what to fetch instead)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            ahead.close()

    # ---- start-trace replay (vdev/replay.py) ----------------------------------------------

    def fetch_claimed(self, mine: dict[int, ChunkFetch]) -> dict[int, bytes]:
        """Fetch one run of chunks claimed through `inflight`, store them, resolve the claims."""
        return self._fetch_and_resolve(mine)

    def note_replayed(self, chunks: Iterable[int]) -> None:
        with self._replayed_lock:
            self._replayed.update(chunks)

    def forget_replayed(self, chunks: Iterable[int]) -> None:
        with self._replayed_lock:
            self._replayed.difference_update(chunks)

    def _replay_used(self, chunks: Iterable[int]) -> None:
        with self._replayed_lock:
            used = [i for i in chunks if i in self._replayed]
            self._replayed.difference_update(used)
        if used:
            self.stats.add(replay_used=len(used))

    # ---- read path ------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        index = self.blob.index
        first = index.chunk_at(offset)
        end = offset + length
        if end <= self._offsets[first + 1]:  # fast path: one chunk, usually a hit
            rel = offset - self._offsets[first]
            data = self.layer.read(first, rel, length)
            if data is not None:
                self.stats.hit()
                if self.ahead is not None:
                    self.ahead.used((first,))
                if self._replayed:
                    self._replay_used((first,))
                return data
            self.stats.add(chunk_misses=1)
            if self.ahead is not None:
                self.ahead.after(first)
            return self._chunks([first])[first][rel : rel + length]
        last = index.chunk_at(end - 1)
        pieces: dict[int, bytes] = {}
        missing: list[tuple[int, int, int]] = []
        for i in range(first, last + 1):
            cstart, cend = self._offsets[i], self._offsets[i + 1]
            a, b = max(offset, cstart) - cstart, min(end, cend) - cstart
            data = self.layer.read(i, a, b - a)
            if data is None:
                missing.append((i, a, b))
            else:
                pieces[i] = data
        if pieces:
            self.stats.add(chunk_hits=len(pieces))
            if self.ahead is not None:
                self.ahead.used(pieces)
            if self._replayed:
                self._replay_used(pieces)
        if missing:
            self.stats.add(chunk_misses=len(missing))
            if self.ahead is not None:
                self.ahead.after(missing[-1][0])
            full = self._chunks([i for i, _, _ in missing])
            for i, a, b in missing:
                pieces[i] = full[i][a:b]
        return b"".join(pieces[i] for i in range(first, last + 1))

    def _chunks(self, wanted: list[int]) -> dict[int, bytes]:
        """Whole verified chunks for `wanted`: claim, fetch (coalesced) what we own, join the rest."""
        got: dict[int, bytes] = {}
        pending = list(wanted)
        for _ in range(3):  # a chunk may be evicted between "present" and our read; retry then
            claim = self.inflight.claim(pending, self.layer.has)
            pending = []
            for i in claim.ready:  # finished by another thread since our miss
                data = self.layer.read(i, 0)
                if data is None:
                    pending.append(i)
                else:
                    got[i] = data
            if claim.mine:
                got.update(self._fetch_claimed(claim.mine))
            if claim.joins:
                self.stats.add(joined=len(claim.joins))
                try:
                    data, retry = self.inflight.wait(claim.joins, self.fetch_deadline)
                except FetchError:
                    self.stats.add(join_timeouts=1)
                    raise
                got.update(data)
                pending += retry  # a failed fetch-ahead never fails a reader: fetch it ourselves
                if self.ahead is not None:
                    self.ahead.used(data)
                if self._replayed:
                    self._replay_used(data)
            if not pending:
                return got
        raise FetchError(f"{self.name}: chunks {pending} keep disappearing from the cache")

    def _fetch_claimed(self, mine: dict[int, ChunkFetch]) -> dict[int, bytes]:
        """One request per run of adjacent claimed chunks; runs beyond the first go to the demand
        pool so they travel concurrently (spec §3.4.4). Every claim is resolved or failed."""
        runs = [{i: mine[i] for i in r} for r in self.fetcher.runs(list(mine))]
        errors: list[BaseException] = []
        futs: list[tuple[Future[dict[int, bytes]], dict[int, ChunkFetch]]] = []
        for k, r in enumerate(runs[1:], 1):
            try:
                futs.append((self._pools.demand.submit(self._fetch_and_resolve, r), r))
            except RuntimeError as e:  # the pools are shutting down: give the other claims back
                errors.append(FetchError(f"{self.name}: fetch not started: {e}"))
                for rest in runs[k:]:
                    self.inflight.fail(rest, errors[-1])
                break
        out: dict[int, bytes] = {}
        try:
            out.update(self._fetch_and_resolve(runs[0]))
        except BaseException as e:
            errors.insert(0, e)
        end = time.monotonic() + self.fetch_deadline
        for f, r in futs:
            try:
                out.update(f.result(timeout=max(0.0, end - time.monotonic())))
            except TimeoutError:
                self.inflight.abandon(r)
                errors.append(FetchError(f"{self.name}: a run of this read did not finish within "
                                         f"{self.fetch_deadline:g} s; the next read tries again"))
            except BaseException as e:
                errors.append(e)
        if errors:
            raise errors[0]
        return out

    def _fetch_and_resolve(self, mine: dict[int, ChunkFetch]) -> dict[int, bytes]:
        """Fetch one run of claimed chunks, store them, resolve the claims: on every path each
        claim is resolved exactly once, with the bytes or the error."""
        try:
            data = self.fetcher.fetch(sorted(mine))
        except BaseException as e:
            err = e if isinstance(e, BdError) else FetchError(f"{self.name}: {e}")
            self.inflight.fail(mine, err)
            if err is e:
                raise
            raise err from e
        try:
            self.layer.store(data)
        finally:
            self.inflight.resolve(mine, data)
        return data
