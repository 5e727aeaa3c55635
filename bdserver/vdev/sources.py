"""Byte sources behind device segments: in memory, a local file, or a lazily fetched chunked blob.

`LazyBlobSource` is the heart of the read path: cache hit -> pread; miss -> claim the chunk
(single-flight: a chunk being fetched by another thread is waited for, never fetched twice),
fetch each run of adjacent claimed chunks with ONE range request, verify, cache, hand out.
The lock only guards the in-flight table, never I/O, so a slow miss never blocks a hit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from bdserver.blob.reader import ChunkedBlob
from bdserver.cache import CacheKey, ChunkCache
from bdserver.errors import BdError, FetchError, FormatError, IntegrityError
from bdserver.vdev.stats import Counter, LatencyWindow

log = logging.getLogger(__name__)

# How long a reader waits for another thread's fetch of the same chunk. The registry client's own
# timeouts and retries end a fetch long before this; it only bounds a wedged fetcher.
JOIN_TIMEOUT = 600.0
MAX_RUN_BYTES = 8 << 20  # split very long runs so one request never carries more than this
# Extra runs of one read are fetched here. Pool threads never wait on other fetches: no deadlock.
_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="bdserver-fetch")
# Cache writes (write + fdatasync + mark present) happen here, off the read path.
_WRITER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bdserver-cache-write")
MAX_PENDING_BYTES = 64 << 20
# Fetch-ahead requests run here, apart from _POOL: a demand miss never queues behind them.
_PREFETCH_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="bdserver-prefetch")
PREFETCH_CLOSE_WAIT = 30.0  # close() waits this long at most for fetch-aheads still on the wire


class Prefetcher:
    """Fetch-ahead shared by the sources of one device.

    A cold start is round-trip bound: the kernel faults misses one after another. On a miss in
    chunk i (and when a reader first uses a chunk that was fetched ahead, so the window slides
    on) the next `chunks` chunks not yet present or in flight are claimed through the sources'
    single-flight table and fetched in the background as separate requests of at most `run`
    chunks each, so they travel concurrently and land in the cache before they are faulted.
    At most `max_inflight` fetch-ahead requests per device are on the wire; beyond that the
    fetch-ahead is skipped (never queued). Failures are logged and counted, never raised: a
    reader that joined a failed fetch-ahead fetches the chunk itself.
    """

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

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1

    @property
    def inflight(self) -> int:
        with self._lock:
            return self._inflight


class Source(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class BytesSource:
    """Bytes already in memory (the merged metadata image, verified when it was loaded)."""

    def __init__(self, data: bytes, name: str = "bytes") -> None:
        self._data = data
        self.size = len(data)
        self.name = name

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def close(self) -> None:
        pass


class FileSource:
    """A local file read with pread (thread-safe, no shared file position)."""

    def __init__(self, path: str) -> None:
        self.name = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        while length > 0:
            b = os.pread(self._fd, length, offset)
            if not b:
                raise FetchError(f"{self.name}: unexpected end of file at {offset}")
            parts.append(b)
            offset += len(b)
            length -= len(b)
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LazyBlobSource:
    """The uncompressed image data of one layer blob, fetched chunk by chunk on demand.

    `key` names the blob AND the chunk index that `blob` verifies with: the cache entry it reads
    and fills holds only what that index accepted."""

    def __init__(
        self,
        blob: ChunkedBlob,
        key: CacheKey,
        cache: ChunkCache | None,
        *,
        name: str | None = None,
        write_behind: bool = False,
        prefetcher: Prefetcher | None = None,
    ) -> None:
        self.blob = blob
        self.prefetcher = prefetcher if prefetcher is not None and prefetcher.enabled and cache is not None else None
        self._prefetched: set[int] = set()  # fetched ahead, not yet asked for by a reader
        self._prefetch_tasks: set[Future[None]] = set()
        self._closed = False
        self.write_behind = write_behind
        self.key = key
        self.digest = key.blob
        self.cache = cache
        self.name = name or key.blob
        self.size = blob.size
        self._offsets = blob.index.uncompressed_offsets()
        self._lock = threading.Lock()
        self._active = 0  # _fetch_and_resolve calls under way (demand and fetch-ahead)
        self._idle = threading.Condition(self._lock)
        self._inflight: dict[int, Future[bytes]] = {}
        self.stats = Counter()
        self.fetch_latency = LatencyWindow(2048)
        self._registered = False
        self._pending: dict[int, bytes] = {}  # verified chunks not yet in the cache
        self._pending_bytes = 0
        self._writes: set[Future[None]] = set()
        if cache is not None:
            try:
                cache.register(key, self._offsets)
                self._registered = True
            except (BdError, OSError) as e:  # e.g. a full disk: serve uncached, retry on put
                log.warning("%s: cannot register in the cache: %s", self.name, e)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            # Reads still on the wire (the kernel's readahead often is, when a daemon stops) hand
            # their chunks to the cache before it is flushed and released: a graceful restart
            # must find every chunk that was fetched.
            self._idle.wait_for(lambda: self._active == 0, timeout=PREFETCH_CLOSE_WAIT)
            tasks = list(self._prefetch_tasks)
        for f in tasks:  # a fetch-ahead still on the wire must not write after the release
            try:
                f.result(timeout=PREFETCH_CLOSE_WAIT)
            except BaseException:  # logged and counted where it happened, or a slow link
                pass
        self.flush()
        if self.cache is not None and self._registered:
            self._registered = False
            self.cache.release(self.key)

    # ---- read path ------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        index = self.blob.index
        first = index.chunk_at(offset)
        end = offset + length
        if end <= self._offsets[first + 1]:  # fast path: one chunk, usually a hit
            rel = offset - self._offsets[first]
            data = self._cached(first, rel, length)
            if data is not None:
                self.stats.hit()
                if self._prefetched and first in self._prefetched:
                    self._used_prefetched([first])
                return data
            self.stats.add(chunk_misses=1)
            self._prefetch_after(first)
            return self._chunks([first])[first][rel : rel + length]
        last = index.chunk_at(end - 1)
        pieces: dict[int, bytes] = {}
        missing: list[tuple[int, int, int]] = []
        for i in range(first, last + 1):
            cstart, cend = self._offsets[i], self._offsets[i + 1]
            a, b = max(offset, cstart) - cstart, min(end, cend) - cstart
            data = self._cached(i, a, b - a)
            if data is None:
                missing.append((i, a, b))
            else:
                pieces[i] = data
        if pieces:
            self.stats.add(chunk_hits=len(pieces))
            if self._prefetched:
                used = [i for i in pieces if i in self._prefetched]
                if used:
                    self._used_prefetched(used)
        if missing:
            self.stats.add(chunk_misses=len(missing))
            self._prefetch_after(missing[-1][0])
            full = self._chunks([i for i, _, _ in missing])
            for i, a, b in missing:
                pieces[i] = full[i][a:b]
        return b"".join(pieces[i] for i in range(first, last + 1))

    def _cached(self, i: int, start: int, length: int | None = None) -> bytes | None:
        """A cache read; a failing cache disk degrades to a miss, it never fails the read."""
        if self.cache is None:
            return None
        try:
            data = self.cache.read(self.key, i, start, length)
        except OSError as e:
            log.warning("%s: cache read of chunk %d failed: %s", self.name, i, e)
            data = None
        if data is None:
            b = self._pending.get(i)  # fetched, verified, still on its way to the disk
            if b is not None:
                return b[start:] if length is None else b[start : start + length]
        return data

    def _chunks(self, wanted: list[int]) -> dict[int, bytes]:
        """Whole verified chunks for `wanted`: claim, fetch (coalesced) what we own, join the rest."""
        got: dict[int, bytes] = {}
        pending = list(wanted)
        for _ in range(3):  # a chunk may be evicted between "present" and our read; retry then
            mine: list[int] = []
            joins: dict[int, Future[bytes]] = {}
            recheck: list[int] = []
            with self._lock:
                for i in pending:
                    f = self._inflight.get(i)
                    if f is not None:
                        joins[i] = f
                    elif i in self._pending:
                        got[i] = self._pending[i]
                    elif self.cache is not None and self.cache.has(self.key, i):
                        recheck.append(i)  # finished by another thread since our miss
                    else:
                        f = Future()
                        f.set_running_or_notify_cancel()
                        self._inflight[i] = f
                        mine.append(i)
            if mine:
                got.update(self._fetch_claimed(mine))
            if joins:
                self.stats.add(joined=len(joins))
            retry: list[int] = []
            for i, f in joins.items():
                try:
                    got[i] = f.result(timeout=JOIN_TIMEOUT)
                except TimeoutError as e:
                    raise FetchError(f"{self.name}: chunk {i}: gave up waiting for its fetch") from e
                except BdError:
                    if not getattr(f, "bd_prefetch", False):
                        raise
                    retry.append(i)  # a failed fetch-ahead never fails a reader: fetch it ourselves
            if self._prefetched:
                used = [i for i in joins if i in self._prefetched]
                if used:
                    self._used_prefetched(used)
            pending = retry
            for i in recheck:
                data = self._cached(i, 0)
                if data is None:
                    pending.append(i)
                else:
                    got[i] = data
            if not pending:
                return got
        raise FetchError(f"{self.name}: chunks {pending} keep disappearing from the cache")

    # ---- fetch-ahead ----------------------------------------------------------------------

    def _used_prefetched(self, idx: list[int]) -> None:
        """A reader reached chunks fetched ahead: count them and slide the window on."""
        with self._lock:
            used = [i for i in idx if i in self._prefetched]
            self._prefetched.difference_update(used)
        if used:
            self.stats.add(prefetch_used=len(used))
            self._prefetch_after(max(used))

    def _prefetch_after(self, i: int) -> None:
        """Claim and fetch in the background the next chunks after `i` that are neither
        present nor in flight. Never raises, never blocks on the network."""
        pf = self.prefetcher
        if pf is None:
            return
        try:
            self._schedule_prefetch(pf, i)
        except Exception as e:  # fetch-ahead is an optimisation: never fail the read for it
            self.stats.add(prefetch_errors=1)
            log.warning("%s: fetch-ahead after chunk %d not scheduled: %s", self.name, i, e)

    def _schedule_prefetch(self, pf: Prefetcher, i: int) -> None:
        n = len(self._offsets) - 1
        hi = min(n, i + 1 + pf.chunks)
        if i + 1 >= hi or self._closed:
            return
        cand = []
        for j in range(i + 1, hi):
            if j in self._inflight or j in self._pending:
                continue
            if self.cache is not None and self.cache.has(self.key, j):
                continue
            cand.append(j)
        if not cand:
            return
        runs: list[list[int]] = []
        for j in cand:
            if runs and runs[-1][-1] == j - 1 and len(runs[-1]) < pf.run:
                runs[-1].append(j)
            else:
                runs.append([j])
        granted = pf.try_acquire(len(runs))
        if not granted:
            return
        claimed: list[list[int]] = []
        with self._lock:
            if not self._closed:
                for r in runs[:granted]:
                    mine: list[int] = []
                    for j in r:  # the adjacent prefix still unclaimed: one run, one request
                        if j in self._inflight or j in self._pending:
                            break
                        f: Future[bytes] = Future()
                        f.set_running_or_notify_cancel()
                        f.bd_prefetch = True  # type: ignore[attr-defined]
                        self._inflight[j] = f
                        self._prefetched.add(j)  # a reader joining it slides the window on too
                        mine.append(j)
                    if mine:
                        claimed.append(mine)
        for _ in range(granted - len(claimed)):
            pf.release()
        for r in claimed:
            try:
                task = _PREFETCH_POOL.submit(self._prefetch_run, r)
            except RuntimeError as e:  # interpreter shutdown: give the claims back
                with self._lock:
                    self._prefetched.difference_update(r)
                self._abandon(r, FetchError(f"{self.name}: fetch-ahead not started: {e}"))
                pf.release()
                continue
            with self._lock:
                self._prefetch_tasks.add(task)
            task.add_done_callback(self._prefetch_task_done)

    def _prefetch_task_done(self, fut: Future[None]) -> None:
        with self._lock:
            self._prefetch_tasks.discard(fut)

    def _abandon(self, run: list[int], err: BaseException) -> None:
        with self._lock:
            for j in run:
                f = self._inflight.pop(j, None)
                if f is not None:
                    f.set_exception(err)

    def _prefetch_run(self, run: list[int]) -> None:
        pf = self.prefetcher
        try:
            self._fetch_and_resolve(run)
            self.stats.add(prefetches=1, prefetched_chunks=len(run))
        except BaseException as e:  # resolved the claims with the error; readers retry
            with self._lock:
                self._prefetched.difference_update(run)
            self.stats.add(prefetch_errors=1)
            log.warning("%s: fetch-ahead of chunks %d..%d failed: %s", self.name, run[0], run[-1], e)
        finally:
            if pf is not None:
                pf.release()

    def _fetch_claimed(self, mine: list[int]) -> dict[int, bytes]:
        """Fetch the chunks this thread claimed, one request per run of adjacent chunks; runs
        beyond the first go to a small shared pool so they travel concurrently (spec §3.4.4)."""
        runs = self._runs(sorted(mine))
        if len(runs) == 1:
            return self._fetch_and_resolve(runs[0])
        futs = [_POOL.submit(self._fetch_and_resolve, r) for r in runs[1:]]
        out: dict[int, bytes] = {}
        errors: list[BaseException] = []
        try:
            out.update(self._fetch_and_resolve(runs[0]))
        except BaseException as e:
            errors.append(e)
        for f in futs:
            try:
                out.update(f.result())
            except BaseException as e:
                errors.append(e)
        if errors:
            raise errors[0]
        return out

    def _fetch_and_resolve(self, run: list[int]) -> dict[int, bytes]:
        """Fetch one run; resolve its in-flight futures exactly once, with the data or the error.

        By default verified chunks are cached (written, fdatasync'd, marked) before the futures
        resolve. With `write_behind` they go to the cache in the background instead: readers get
        them at once (from `_pending` until the cache has them), so a miss never waits for the
        disk's fdatasync; the price is that a crash loses the last moments of fetched chunks and
        other devices on the blob may fetch them again meanwhile. Past MAX_PENDING_BYTES of
        unwritten chunks the write is done inline (back-pressure).
        """
        with self._lock:
            self._active += 1
        try:
            return self._fetch_and_resolve_run(run)
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._idle.notify_all()

    def _fetch_and_resolve_run(self, run: list[int]) -> dict[int, bytes]:
        data: dict[int, bytes] = {}
        try:
            t0 = time.perf_counter()
            chunks = self._fetch_run(run[0], run[-1])
            self.fetch_latency.add(time.perf_counter() - t0)
            data = dict(zip(run, chunks))
        except BaseException as e:
            err = e if isinstance(e, BdError) else FetchError(f"{self.name}: {e}")
            with self._lock:
                for i in run:
                    f = self._inflight.pop(i, None)
                    if f is not None:
                        f.set_exception(err)
            if err is e:
                raise
            raise err from e
        if not self.write_behind:
            # Durable in the cache before anyone is told: a crash right after this read, or
            # another device sharing the blob, finds the chunk on disk. Whatever the store does,
            # the claims are resolved: an unresolved one would park every later reader.
            try:
                self._store(data)
            finally:
                with self._lock:
                    for i in run:
                        self._inflight.pop(i).set_result(data[i])
            return data
        inline = False
        with self._lock:
            if self.cache is not None:
                for i in run:
                    self._pending[i] = data[i]
                    self._pending_bytes += len(data[i])
                inline = self._pending_bytes > MAX_PENDING_BYTES
            for i in run:
                self._inflight.pop(i).set_result(data[i])
        if self.cache is not None:
            if inline:
                self._store_and_forget(data)
            else:
                fut = _WRITER.submit(self._store_and_forget, data)
                with self._lock:
                    self._writes.add(fut)
                fut.add_done_callback(self._write_done)
        return data

    def _write_done(self, fut: Future[None]) -> None:
        with self._lock:
            self._writes.discard(fut)

    def _store_and_forget(self, data: dict[int, bytes]) -> None:
        try:
            self._store(data)
        finally:
            with self._lock:
                for i, b in data.items():
                    if self._pending.get(i) is b:
                        del self._pending[i]
                        self._pending_bytes -= len(b)

    def flush(self) -> None:
        """Wait until every chunk fetched so far has been offered to the cache."""
        for _ in range(1000):  # bounded: each round waits for the writes known at its start
            with self._lock:
                writes = list(self._writes)
            if not writes:
                return
            for f in writes:
                f.result()

    def _runs(self, idx: list[int]) -> list[list[int]]:
        runs: list[list[int]] = []
        run_bytes = 0
        for i in idx:
            n = self.blob.chunk_span(i)[1]
            if runs and runs[-1][-1] == i - 1 and run_bytes + n <= MAX_RUN_BYTES:
                runs[-1].append(i)
                run_bytes += n
            else:
                runs.append([i])
                run_bytes = n
        return runs

    def _fetch_run(self, first: int, last: int) -> list[bytes]:
        start = self.blob.chunk_span(first)[0]
        o, n = self.blob.chunk_span(last)
        try:
            chunks = self.blob.read_chunks(first, last)
        except IntegrityError:
            self.stats.add(fetches=1, integrity_errors=1)
            log.warning("%s: chunks %d..%d failed verification; not cached, not served", self.name, first, last)
            raise
        except FormatError as e:
            self.stats.add(fetches=1, integrity_errors=1)
            log.warning("%s: chunks %d..%d do not decode: %s", self.name, first, last, e)
            raise IntegrityError(f"{self.name}: chunks {first}..{last}: {e}") from e
        except BdError:
            self.stats.add(fetches=1, fetch_errors=1)
            raise
        self.stats.add(fetches=1, fetched_bytes=o + n - start, fetched_chunks=last - first + 1)
        return chunks

    def _store(self, data: dict[int, bytes]) -> None:
        """Cache verified chunks; failing to cache never fails the read (the bytes are good)."""
        if self.cache is None:
            return
        try:
            self.cache.put_many(self.key, sorted(data.items()), offsets=self._offsets)
        except Exception as e:  # noqa: BLE001 - the bytes are verified: a cache failure never fails a read
            self.stats.add(cache_put_errors=1)
            log.warning("%s: could not cache %d chunk(s): %s", self.name, len(data), e)
