"""Fetch-ahead: a miss in chunk i starts concurrent background fetches of the chunks after it,
bounded per device, single-flight with demand reads, and never failing a demand read."""

from __future__ import annotations

import threading

from bdserver.cache import ChunkCache
from bdserver.errors import FetchError
from bdserver.vdev import FetchPools, Prefetcher, open_lazy_image
from tests.vdev.conftest import BS, CS, WAIT, LazyImage, joined


def chunk_offset(lazy: LazyImage, layer: int, chunk: int) -> int:
    return lazy.layers[layer][2] * BS + chunk * CS


class Tracker:
    """Records which chunks of one blob are fetched, and how many fetches overlap."""

    def __init__(self, lazy: LazyImage, src) -> None:
        self.digest = src.digest
        self.chunk_of = {src.blob.chunk_span(j)[0]: j for j in range(len(src.blob.index))}
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.gated = 0  # fetches of gated chunks on the wire now
        self.max_gated = 0
        self.entered: list[int] = []
        self.changed = threading.Condition(self.lock)
        self.gate: set[int] = set()  # chunks whose fetch waits for `release`
        self.release = threading.Event()
        self.fail: set[int] = set()  # chunks whose fetch fails (once)

    def hook(self, digest: str, off: int, n: int) -> None:
        if digest != self.digest:
            return
        j = self.chunk_of[off]
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if j in self.gate:
                self.gated += 1
                self.max_gated = max(self.max_gated, self.gated)
            self.entered.append(j)
            self.changed.notify_all()
        try:
            if j in self.gate:
                self.release.wait(WAIT)
            with self.lock:
                if j in self.fail:
                    self.fail.discard(j)
                    raise FetchError(f"injected failure of chunk {j}")
        finally:
            with self.lock:
                self.active -= 1
                if j in self.gate:
                    self.gated -= 1
                self.changed.notify_all()

    def wait_entered(self, chunks: set[int]) -> bool:
        with self.lock:
            return self.changed.wait_for(lambda: chunks <= set(self.entered), timeout=WAIT)

    def wait_idle(self) -> bool:
        with self.lock:
            return self.changed.wait_for(lambda: self.active == 0, timeout=WAIT)


def drain(src) -> None:
    """Wait until no fetch (demand or ahead) of the source is on the wire."""
    assert src.inflight.wait_idle(WAIT)


def test_miss_fetches_the_next_chunks_concurrently(pools: FetchPools, lazy: LazyImage, cache: ChunkCache) -> None:
    k = 4
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools,
                          prefetch=Prefetcher(chunks=k, max_inflight=k))
    src = dev.segments[1].source
    tr = Tracker(lazy, src)
    tr.gate = {2, 3, 4, 5}
    lazy.registry.hook = tr.hook
    o = chunk_offset(lazy, 0, 1)
    assert dev.read(o, 100) == lazy.expected[o : o + 100]  # the demand read does not wait for them
    assert tr.wait_entered({2, 3, 4, 5})  # all four are on the wire at once
    with tr.lock:
        assert tr.max_gated == k  # (the demand fetch of chunk 1 may have overlapped them too)
    tr.release.set()
    drain(src)
    assert sorted(tr.entered) == [1, 2, 3, 4, 5]
    o2 = chunk_offset(lazy, 0, 2)
    assert dev.read(o2, 4 * CS) == lazy.expected[o2 : o2 + 4 * CS]
    drain(src)
    # reading 2..5 fetched none of them again (all hits), and it slid the window on: 6..9 came ahead
    assert sorted(tr.entered[5:]) == [6, 7, 8, 9]
    s = dev.stats()
    assert s["prefetches"] == 8 and s["prefetched_chunks"] == 8 and s["prefetch_errors"] == 0
    assert s["prefetch_used"] == 4 and s["chunk_misses"] == 1
    dev.close()


def test_in_flight_fetch_aheads_are_bounded_and_never_duplicated(pools: FetchPools, lazy: LazyImage,
                                                                 cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools,
                          prefetch=Prefetcher(chunks=6, max_inflight=2))
    src = dev.segments[1].source
    tr = Tracker(lazy, src)
    tr.gate = {1, 2, 3, 4, 5, 6}
    lazy.registry.hook = tr.hook
    o = chunk_offset(lazy, 0, 0)
    assert dev.read(o, 10) == lazy.expected[o : o + 10]
    assert tr.wait_entered({1, 2})
    assert src.ahead.policy.inflight == 2
    # a second miss while the bound is reached starts no more fetch-aheads
    o7 = chunk_offset(lazy, 0, 7)
    assert dev.read(o7, 10) == lazy.expected[o7 : o7 + 10]
    with tr.lock:
        assert tr.max_gated <= 2
        assert sorted(set(tr.entered)) == [0, 1, 2, 7]
    tr.release.set()
    drain(src)
    assert src.ahead.policy.inflight == 0
    assert dev.read(0, dev.size) == lazy.expected
    drain(src)
    assert len(tr.entered) == len(set(tr.entered))  # never a chunk twice
    dev.close()


def test_a_reader_joining_a_failed_fetch_ahead_fetches_the_chunk_itself(pools: FetchPools, lazy: LazyImage,
                                                                        cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools,
                          prefetch=Prefetcher(chunks=3, max_inflight=3))
    src = dev.segments[1].source
    tr = Tracker(lazy, src)
    tr.fail = {2, 3}
    tr.gate = {3}
    lazy.registry.hook = tr.hook
    o = chunk_offset(lazy, 0, 1)
    assert dev.read(o, 10) == lazy.expected[o : o + 10]
    assert tr.wait_entered({2, 3, 4})
    # a reader joins the parked fetch-ahead of chunk 3, which then fails: it fetches it itself
    got: list[bytes] = []
    errors: list[BaseException] = []
    o3 = chunk_offset(lazy, 0, 3)

    def reader() -> None:
        try:
            got.append(dev.read(o3, 100))
        except BaseException as e:  # surfaced by the asserts below
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    assert joined(src, 1), "the reader never joined the fetch-ahead in flight"
    tr.release.set()  # only now does the fetch-ahead fail
    t.join(WAIT)
    assert not errors and got == [lazy.expected[o3 : o3 + 100]]
    drain(src)
    assert tr.entered.count(3) == 2  # the failed fetch-ahead, then the reader's own
    o2 = chunk_offset(lazy, 0, 2)  # its fetch-ahead failed: the read fetches it
    assert dev.read(o2, 100) == lazy.expected[o2 : o2 + 100]
    s = dev.stats()
    assert s["prefetch_errors"] == 2 and s["read_errors"] == 0
    drain(src)
    dev.close()


def test_a_fetch_ahead_stuck_past_the_deadline_is_fetched_by_the_reader(pools: FetchPools, lazy: LazyImage,
                                                                         cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools, fetch_deadline=0.5,
                          prefetch=Prefetcher(chunks=1, max_inflight=1))
    src = dev.segments[1].source
    tr = Tracker(lazy, src)
    tr.gate = {2}
    lazy.registry.hook = tr.hook
    o = chunk_offset(lazy, 0, 1)
    assert dev.read(o, 10) == lazy.expected[o : o + 10]
    assert tr.wait_entered({2})  # the fetch-ahead of chunk 2 hangs
    tr.gate = set()  # (the reader's own fetch will not)
    o2 = chunk_offset(lazy, 0, 2)
    assert dev.read(o2, 10) == lazy.expected[o2 : o2 + 10]  # joined, gave up after 0.5 s, fetched it itself
    assert tr.entered.count(2) == 2 and tr.gated == 1  # while the fetch-ahead is still parked
    s = dev.stats()
    assert s["joined"] == 1 and s["read_errors"] == 0
    tr.release.set()
    drain(src)
    dev.close()


def test_a_reader_takes_over_a_fetch_ahead_still_queued(lazy: LazyImage, cache: ChunkCache) -> None:
    """Demand reads first: a reader never waits for a fetch-ahead that has not even started."""
    with FetchPools(ahead=1) as pools:  # one fetch-ahead request at a time: the next one queues
        dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools, fetch_deadline=WAIT,
                              prefetch=Prefetcher(chunks=2, max_inflight=2))
        src = dev.segments[1].source
        tr = Tracker(lazy, src)
        tr.gate = {2}
        lazy.registry.hook = tr.hook
        o = chunk_offset(lazy, 0, 1)
        assert dev.read(o, 10) == lazy.expected[o : o + 10]
        assert tr.wait_entered({2})  # the fetch-ahead of 2 holds the only thread; that of 3 is queued
        got: list[bytes] = []
        o3 = chunk_offset(lazy, 0, 3)
        t = threading.Thread(target=lambda: got.append(dev.read(o3, 10)), daemon=True)
        t.start()
        t.join(WAIT / 3)
        assert not t.is_alive(), "the reader waited for a fetch-ahead queued behind another"
        assert got == [lazy.expected[o3 : o3 + 10]] and tr.gated == 1
        tr.release.set()
        drain(src)
        assert sorted(tr.entered) == [1, 2, 3]  # the queued fetch-ahead skipped the chunk taken over
        dev.close()


def test_close_lets_fetches_on_the_wire_reach_the_cache(pools: FetchPools, lazy: LazyImage, tmp_path) -> None:
    """A daemon stopping while fetches are on the wire (its fetch-aheads, the kernel's readahead)
    finds those chunks after its restart: close() waits for them (at most the fetch deadline)."""
    root = str(tmp_path / "c")
    with ChunkCache(root) as cache:
        dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools,
                              prefetch=Prefetcher(chunks=2, max_inflight=2))
        src = dev.segments[1].source
        tr = Tracker(lazy, src)
        tr.gate = {2, 3}
        lazy.registry.hook = tr.hook
        o = chunk_offset(lazy, 0, 1)
        assert dev.read(o, 10) == lazy.expected[o : o + 10]
        assert tr.wait_entered({2, 3})  # both fetch-aheads are parked on the wire
        closer = threading.Thread(target=dev.close)
        closer.start()
        closer.join(1.0)
        assert closer.is_alive(), "close() returned while fetches were still on the wire"
        tr.release.set()
        closer.join(WAIT)
        assert not closer.is_alive()
        with ChunkCache(root) as restarted:  # the next daemon's view of the node cache
            assert restarted.has(src.key, 1) and restarted.has(src.key, 2) and restarted.has(src.key, 3)


def test_a_fetch_ahead_that_cannot_start_is_harmless(lazy: LazyImage, cache: ChunkCache) -> None:
    pools = FetchPools()
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools,
                          prefetch=Prefetcher(chunks=3, max_inflight=3))
    src = dev.segments[1].source
    pools.ahead.shutdown()  # refuses new work, like an interpreter shutting down
    o = chunk_offset(lazy, 0, 1)
    assert dev.read(o, 10) == lazy.expected[o : o + 10]
    assert src.ahead.policy.inflight == 0  # the budget was given back
    o2 = chunk_offset(lazy, 0, 2)  # the claims were given back too: a read of the next chunk fetches it
    assert dev.read(o2, 10) == lazy.expected[o2 : o2 + 10]
    assert dev.stats()["read_errors"] == 0
    dev.close()
    pools.close()


def test_off_without_a_prefetcher_or_a_cache(pools: FetchPools, lazy: LazyImage, cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, None, pools=pools, prefetch=Prefetcher(chunks=4))
    assert dev.segments[1].source.ahead is None  # nowhere to keep what it fetched
    dev.close()
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    before = len(lazy.registry.calls)
    o = chunk_offset(lazy, 0, 0)
    dev.read(o, 10)
    assert len(lazy.registry.calls) - before == 1
    dev.close()
