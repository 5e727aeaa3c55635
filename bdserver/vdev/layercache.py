"""One layer's side of the node cache: hits, stores (durable first, or write-behind), registration.

By default verified chunks are stored (written, fdatasync'd, marked present) BEFORE any reader is
given them: a crash right after a read, or another device on the same entry, finds them on disk.
With `write_behind` they are kept in memory (`pending`, served as hits) and written on the
`writers` pool, so a miss never waits for the disk; the price is that a crash loses the last
moments of fetched chunks. Past MAX_PENDING_BYTES of unwritten chunks the write is done inline
(back-pressure). A cache that fails (full disk, I/O error, anything) never fails a read: the bytes
are verified, they are served uncached, and the failure is logged and counted.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor, Future
from typing import Mapping, Sequence

from bdserver.cache import CacheKey, ChunkCache
from bdserver.errors import BdError
from bdserver.vdev.stats import Counter

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 64 << 20


class LayerCache:
    def __init__(
        self,
        cache: ChunkCache | None,
        key: CacheKey,
        offsets: Sequence[int],
        writers: Executor,
        stats: Counter,
        *,
        write_behind: bool = False,
        name: str = "",
    ) -> None:
        self.cache = cache
        self.key = key
        self.offsets = offsets
        self.stats = stats
        self.name = name or str(key)
        self.write_behind = write_behind and cache is not None
        self._writers = writers
        self._lock = threading.Lock()
        self._pending: dict[int, bytes] = {}  # verified, not yet in the cache
        self._pending_bytes = 0
        self._writes: set[Future[None]] = set()
        self._registered = False
        if cache is not None:
            try:
                cache.register(key, offsets)
                self._registered = True
            except (BdError, OSError) as e:  # e.g. a full disk: serve uncached, retry on put
                log.warning("%s: cannot register in the cache: %s", self.name, e)

    def read(self, i: int, start: int, length: int | None = None) -> bytes | None:
        """Bytes of chunk i from the cache or the write-behind queue; None on a miss (a failing
        cache disk is a miss too)."""
        if self.cache is None:
            return None
        try:
            data = self.cache.read(self.key, i, start, length)
        except OSError as e:
            log.warning("%s: cache read of chunk %d failed: %s", self.name, i, e)
            data = None
        if data is None and self._pending:
            b = self._pending.get(i)
            if b is not None:
                return b[start:] if length is None else b[start : start + length]
        return data

    def has(self, i: int) -> bool:
        """Chunk i can be read without a fetch."""
        return self.cache is not None and (i in self._pending or self.cache.has(self.key, i))

    def store(self, data: Mapping[int, bytes]) -> None:
        """Keep verified chunks (see the module docstring); never raises."""
        if self.cache is None:
            return
        if not self.write_behind:
            self._put(data)
            return
        with self._lock:
            for i, b in data.items():
                self._pending[i] = b
                self._pending_bytes += len(b)
            inline = self._pending_bytes > MAX_PENDING_BYTES
        if not inline:
            try:
                fut = self._writers.submit(self._put_and_forget, dict(data))
            except RuntimeError:  # the pools are shutting down: write it ourselves
                inline = True
            else:
                with self._lock:
                    self._writes.add(fut)
                fut.add_done_callback(self._write_done)
        if inline:
            self._put_and_forget(data)

    def _write_done(self, fut: Future[None]) -> None:
        with self._lock:
            self._writes.discard(fut)

    def _put_and_forget(self, data: Mapping[int, bytes]) -> None:
        try:
            self._put(data)
        finally:
            with self._lock:
                for i, b in data.items():
                    if self._pending.get(i) is b:
                        del self._pending[i]
                        self._pending_bytes -= len(b)

    def _put(self, data: Mapping[int, bytes]) -> None:
        assert self.cache is not None
        try:
            self.cache.put_many(self.key, sorted(data.items()), offsets=self.offsets)
        except Exception as e:  # noqa: BLE001 - the bytes are verified: a cache failure never fails a read
            self.stats.add(cache_put_errors=1)
            log.warning("%s: could not cache %d chunk(s): %s", self.name, len(data), e)

    def flush(self) -> None:
        """Wait until every chunk stored so far has been offered to the cache."""
        for _ in range(1000):  # bounded: each round waits for the writes known at its start
            with self._lock:
                writes = list(self._writes)
            if not writes:
                return
            for f in writes:
                f.result()

    def close(self) -> None:
        self.flush()
        if self.cache is not None and self._registered:
            self._registered = False
            self.cache.release(self.key)
