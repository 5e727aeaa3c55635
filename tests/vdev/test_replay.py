"""Start-trace replay on a lazy image made by convert/ (blobs in an OCI layout): the plan keeps the
trace's order and merges runs; every chunk is fetched once; a reader never waits behind a queued
replay request and never fails because of a failed one; the byte budget holds."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from bdserver.blob.starttrace import StartTrace
from bdserver.cache import ChunkCache
from bdserver.errors import FetchError
from bdserver.vdev import FetchPools, open_lazy_image
from bdserver.vdev.replay import ReplayLimits, TraceReplay, plan_requests
from tests.vdev.conftest import WAIT, ConvertedImage, convert_tar_image, wait_until

CS = 16384


@pytest.fixture
def image(tmp_path: Path) -> ConvertedImage:
    rnd = random.Random(3)
    return convert_tar_image(tmp_path, [{"big.bin": rnd.randbytes(40 * CS)}, {"small.bin": rnd.randbytes(8 * CS)}],
                             chunk_size=CS)


class Wire:
    """The layout's ranged reads, recorded; requests for gated chunk offsets wait for `release`,
    those in `fail` raise once (the fault a real registry cannot be told to make on cue)."""

    def __init__(self, image: ConvertedImage) -> None:
        self.layout = image.layout
        self.calls: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()
        self.gate: set[tuple[str, int]] = set()
        self.fail: set[tuple[str, int]] = set()
        self.release = threading.Event()
        self.waiting = 0

    def fetch(self, digest: str, off: int, n: int) -> bytes:
        with self.lock:
            self.calls.append((digest, off, n))
            gated = (digest, off) in self.gate
            self.waiting += gated
        if gated:
            self.release.wait(WAIT)
        with self.lock:
            self.waiting -= gated
            if (digest, off) in self.fail:
                self.fail.discard((digest, off))  # once: a retry goes through
                raise FetchError(f"injected failure at {off}")
        return self.layout.read_range(digest, off, n)


def _open(image: ConvertedImage, wire: Wire, pools: FetchPools, cache: ChunkCache):
    dev = open_lazy_image(image.manifest, wire.fetch, cache, pools=pools)
    wire.calls.clear()  # the chunk indexes
    layers = [s.source for s in dev.segments[1:]]
    return dev, layers


def test_plan_keeps_trace_order_merges_runs_and_skips_what_it_cannot_use(image, pools, cache) -> None:
    wire = Wire(image)
    dev, (big, small) = _open(image, wire, pools, cache)
    trace = StartTrace.from_accesses(
        [(small.digest, 2, 0), (small.digest, 3, 0), (big.digest, 10, 1), (big.digest, 12, 2),  # gap of 1
         (big.digest, 30, 3), ("sha256:" + "e" * 64, 0, 4), (big.digest, 10_000, 5), (big.digest, 0, 6)])
    size = lambda src, i: src.blob.chunk_span(i)[1]  # noqa: E731
    first_three = size(small, 2) + size(small, 3) + size(big, 10)
    lim = ReplayLimits(window_bytes=first_three, gap_chunks=1, run_bytes=1 << 20)
    reqs, skipped = plan_requests(trace, dev.lazy_sources(), lim)
    got = [(r.source.digest, r.first, r.last) for r in reqs]
    # window 1: small 2..3 and big 10; window 2: big 12 and 30 (12 could not join 10 across windows); then big 0
    assert got == [(small.digest, 2, 3), (big.digest, 10, 10), (big.digest, 12, 12), (big.digest, 30, 30),
                   (big.digest, 0, 0)]
    assert skipped == {"unknown_blob": 1, "out_of_range": 1, "cached": 0, "over_budget": 0}
    reqs, _ = plan_requests(trace, dev.lazy_sources(), ReplayLimits(window_bytes=1 << 20, gap_chunks=1))
    assert [(r.first, r.last) for r in reqs if r.source is big] == [(10, 12), (30, 30), (0, 0)]  # by trace order
    assert reqs[0].source is small  # windows are ordered by their first chunk in the trace
    dev.close()


def test_replay_fetches_every_chunk_once_and_readers_then_hit(image, pools, cache) -> None:
    wire = Wire(image)
    dev, (big, small) = _open(image, wire, pools, cache)
    chunks = [(big.digest, i, i) for i in (5, 6, 7, 20, 21, 3)] + [(small.digest, i, 9) for i in range(8)]
    replay = TraceReplay(StartTrace.from_accesses(chunks), dev.lazy_sources(), pools.ahead,
                         ReplayLimits(inflight=3, gap_chunks=0))
    dev.replay = replay
    replay.start()
    assert replay.wait(WAIT)
    st = replay.stats()
    assert st["fetched_chunks"] == 14 and st["errors"] == 0 and st["requests"] == st["planned_requests"] == 4
    assert len(wire.calls) == 4  # big 3, 5..7, 20..21; small 0..7: one range request each
    off = dev.segments[1].start
    for i in (3, 5, 6, 7, 20, 21):
        dev.read(off + i * CS, CS)
    assert len(wire.calls) == 4  # all hits
    s = dev.stats()
    assert s["replayed_chunks"] == 14 and s["replay_used"] == 6 and s["replay_fetches"] == 4
    assert s["prefetches"] == 0  # fetch-ahead is off while a trace says what to fetch
    dev.close()


def _expected(image: ConvertedImage, pools: FetchPools, off: int, n: int) -> bytes:
    ref = open_lazy_image(image.manifest, image.layout.read_range, None, pools=pools)
    try:
        return ref.read(off, n)
    finally:
        ref.close()


def test_a_reader_takes_a_queued_chunk_and_the_replay_skips_it(image, pools, cache) -> None:
    wire = Wire(image)
    dev, (big, _) = _open(image, wire, pools, cache)
    wire.gate = {(big.digest, big.blob.chunk_span(0)[0])}  # the first request (chunk 0) hangs on the wire
    trace = StartTrace.from_accesses([(big.digest, i, i) for i in (0, 10, 20, 30)])
    replay = TraceReplay(trace, dev.lazy_sources(), pools.ahead, ReplayLimits(inflight=1, gap_chunks=0))
    dev.replay = replay
    replay.start()
    assert wait_until(lambda: wire.waiting == 1)
    off = dev.segments[1].start + 20 * CS
    assert dev.read(off, 100) == _expected(image, pools, off, 100)  # queued behind chunk 0: fetched on its own
    assert replay.stats()["fetched_chunks"] == 0 and wire.waiting == 1  # ...while the replay still waits
    wire.release.set()
    assert replay.wait(WAIT)
    starts = sorted(o for d, o, _ in wire.calls if d == big.digest)
    assert starts == sorted(big.blob.chunk_span(i)[0] for i in (0, 10, 20, 30))  # chunk 20 once, by the reader
    assert replay.stats()["fetched_chunks"] == 3
    dev.close()


def test_a_failed_replay_request_never_fails_a_reader(image, pools, cache) -> None:
    wire = Wire(image)
    dev, (big, _) = _open(image, wire, pools, cache)
    at = (big.digest, big.blob.chunk_span(4)[0])
    wire.gate, wire.fail = {at}, {at}
    replay = TraceReplay(StartTrace.from_accesses([(big.digest, 4, 0)]), dev.lazy_sources(), pools.ahead)
    dev.replay = replay
    replay.start()
    assert wait_until(lambda: wire.waiting == 1)
    off = dev.segments[1].start + 4 * CS
    got: list[bytes] = []
    th = threading.Thread(target=lambda: got.append(dev.read(off, CS)))
    th.start()  # joins the replay's request on the wire
    assert wait_until(lambda: big.stats.snapshot()["joined"] == 1)
    wire.release.set()
    th.join(WAIT)
    assert got == [_expected(image, pools, off, CS)]
    assert replay.wait(WAIT) and replay.stats()["errors"] == 1
    assert dev.stats()["replay_errors"] == 1 and dev.stats()["read_errors"] == 0
    dev.close()


def test_the_byte_budget_and_close_bound_what_a_replay_pulls(image, pools, cache) -> None:
    wire = Wire(image)
    dev, (big, _) = _open(image, wire, pools, cache)
    trace = StartTrace.from_accesses([(big.digest, i, i) for i in range(40)])
    budget = sum(big.blob.chunk_span(i)[1] for i in range(10))
    reqs, skipped = plan_requests(trace, dev.lazy_sources(), ReplayLimits(max_bytes=budget))
    assert sum(r.last - r.first + 1 for r in reqs) == 10 and skipped["over_budget"] == 30
    wire.gate = {(big.digest, big.blob.chunk_span(0)[0])}
    replay = TraceReplay(trace, dev.lazy_sources(), pools.ahead,
                         ReplayLimits(inflight=1, gap_chunks=0, run_bytes=CS + 1024, window_bytes=CS))
    dev.replay = replay
    replay.start()
    assert wait_until(lambda: wire.waiting == 1)
    replay.close()  # (what dev.close() does first): what is queued is dropped, what is on the wire completes
    wire.release.set()
    assert replay.wait(WAIT)
    assert replay.stats()["requests"] == 1 and len(wire.calls) == 1
    dev.close()
