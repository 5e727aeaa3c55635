"""Start-trace replay: fetch what a recorded start read, in its order, before the kernel asks.

A cold start is round-trip bound: the kernel faults its misses one after another. A start trace
(blob/starttrace.py) says which chunks the start will read, so from attach on they are fetched
in trace order, merged into long range requests, several on the wire at once, while the mount
and the container start proceed.

Plan: the trace's chunks (those of this device's layers, not yet cached, within the byte
budget) are cut into windows of `window_bytes` in trace order; inside a window the chunks of
each layer are sorted and merged into runs (gaps of at most `gap_chunks` chunks are fetched too,
at most `run_bytes` on the wire each), and the requests go out in the order of their earliest
chunk in the trace. `inflight` workers on the `ahead` pool take requests in that order.

Demand reads first: a worker claims a request's chunks only when it takes the request, through
the layer's single-flight table, and starts it at once. A reader that misses a chunk whose
request is still queued claims and fetches it on its own (the replay skips it later); one that
misses a chunk already on the wire joins that request (never longer than one request of at most
`run_bytes`). Replay requests never use the reader's thread or the demand pool. A failed replay
request is logged and counted; the readers that joined it fetch the chunk themselves.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Mapping

from bdserver.blob.starttrace import StartTrace
from bdserver.vdev.inflight import ChunkFetch
from bdserver.vdev.lazyblob import LazyBlobSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayLimits:
    """How a device replays its start trace (config keys trace_*)."""

    inflight: int = 8  # replay requests on the wire per device
    run_bytes: int = 1 << 20  # on-blob bytes per request at most
    window_bytes: int = 4 << 20  # trace order is kept between windows of this many bytes
    gap_chunks: int = 2  # chunks not in the trace fetched to join two runs into one request
    max_bytes: int = 512 << 20  # on-blob bytes one replay may pull at most


@dataclass(frozen=True)
class ReplayRequest:
    source: LazyBlobSource
    first: int
    last: int  # inclusive
    order: int  # position of its earliest chunk in the trace


def plan_requests(trace: StartTrace, sources: Mapping[str, LazyBlobSource], limits: ReplayLimits
                  ) -> tuple[list[ReplayRequest], dict[str, int]]:
    """The requests that replay ``trace`` on a device whose lazy layers are ``sources`` (by blob
    digest), in the order they go out; and counts of what the plan left out."""
    skipped = {"unknown_blob": 0, "out_of_range": 0, "cached": 0, "over_budget": 0}
    wanted: list[tuple[LazyBlobSource, int, int]] = []  # (source, chunk, on-blob bytes) in trace order
    budget = limits.max_bytes
    for digest, i in trace.chunks():
        src = sources.get(digest)
        if src is None:
            skipped["unknown_blob"] += 1
            continue
        if i >= len(src.blob.index):
            skipped["out_of_range"] += 1
            continue
        if src.layer.has(i):
            skipped["cached"] += 1
            continue
        n = src.blob.chunk_span(i)[1]
        if n > budget:
            skipped["over_budget"] += 1
            continue
        budget -= n
        wanted.append((src, i, n))
    requests: list[ReplayRequest] = []
    k = 0
    while k < len(wanted):
        window: dict[int, tuple[LazyBlobSource, dict[int, int]]] = {}  # id(src) -> (src, {chunk: order})
        wbytes = 0
        while k < len(wanted) and (wbytes == 0 or wbytes + wanted[k][2] <= limits.window_bytes):
            src, i, n = wanted[k]
            window.setdefault(id(src), (src, {}))[1].setdefault(i, k)
            wbytes += n
            k += 1
        reqs: list[ReplayRequest] = []
        for src, chunks in window.values():
            reqs += _merge(src, chunks, limits)
        requests += sorted(reqs, key=lambda r: r.order)
    return requests, skipped


def _merge(src: LazyBlobSource, chunks: dict[int, int], limits: ReplayLimits) -> list[ReplayRequest]:
    """Sorted runs of one layer's wanted chunks, bridging small gaps, each within run_bytes."""
    out: list[ReplayRequest] = []
    first = last = order = -1
    nbytes = 0
    for i in sorted(chunks):
        n = src.blob.chunk_span(i)[1]
        gap = sum(src.blob.chunk_span(j)[1] for j in range(last + 1, i)) if first >= 0 else 0
        if first >= 0 and i - last - 1 <= limits.gap_chunks and nbytes + gap + n <= limits.run_bytes:
            last, nbytes, order = i, nbytes + gap + n, min(order, chunks[i])
            continue
        if first >= 0:
            out.append(ReplayRequest(src, first, last, order))
        first, last, nbytes, order = i, i, n, chunks[i]
    if first >= 0:
        out.append(ReplayRequest(src, first, last, order))
    return out


class TraceReplay:
    """Replays one start trace on one device; `close()` stops it (requests on the wire finish)."""

    def __init__(self, trace: StartTrace, sources: Mapping[str, LazyBlobSource], pool: Executor,
                 limits: ReplayLimits = ReplayLimits(), *, name: str = "") -> None:
        self.limits = limits
        self.name = name
        self._pool = pool
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        plan, self.skipped = plan_requests(trace, sources, limits)
        self._queue: deque[ReplayRequest] = deque(plan)
        self.planned_requests = len(plan)
        self.planned_chunks = sum(r.last - r.first + 1 for r in plan)
        self.trace_chunks = len(trace)
        self._workers = 0
        self._closed = False
        self.requests = 0  # issued (a request whose chunks readers took first may issue none)
        self.fetched_chunks = 0
        self.fetched_bytes = 0
        self.errors = 0
        for src in {id(s): s for s in sources.values()}.values():
            src.stop_fetch_ahead()  # the trace says what to fetch; no guessing after misses

    def start(self) -> None:
        n = min(self.limits.inflight, len(self._queue))
        for _ in range(max(0, n)):
            with self._lock:
                self._workers += 1
            try:
                self._pool.submit(self._work)
            except RuntimeError:  # the pools are shutting down: nothing to replay into
                with self._lock:
                    self._workers -= 1
                    self._done.notify_all()
                break

    def close(self) -> None:
        """No new requests; those on the wire complete (their claims are resolved)."""
        with self._lock:
            self._closed = True
            self._queue.clear()

    def wait(self, timeout: float) -> bool:
        """Until every request has been made (for tests and benchmarks)."""
        with self._lock:
            return self._done.wait_for(lambda: self._workers == 0, timeout=timeout)

    @property
    def active(self) -> bool:
        with self._lock:
            return self._workers > 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"trace_chunks": self.trace_chunks, "planned_requests": self.planned_requests,
                    "planned_chunks": self.planned_chunks, "requests": self.requests,
                    "fetched_chunks": self.fetched_chunks, "fetched_bytes": self.fetched_bytes,
                    "errors": self.errors, "queued": len(self._queue), "workers": self._workers,
                    **{f"skipped_{k}": v for k, v in self.skipped.items()}}

    def _work(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed or not self._queue:
                        return
                    req = self._queue.popleft()
                self._one(req)
        finally:
            with self._lock:
                self._workers -= 1
                self._done.notify_all()

    def _one(self, req: ReplayRequest) -> None:
        src = req.source
        for run in _claim(src, range(req.first, req.last + 1)):
            src.note_replayed(run)
            with self._lock:
                self.requests += 1
            try:
                data = src.fetch_claimed(run)
            except BaseException as e:  # noqa: BLE001 - the claims carry the error; readers retry
                src.forget_replayed(run)
                src.stats.add(replay_fetches=1, replay_errors=1)
                with self._lock:
                    self.errors += 1
                log.warning("%s: replay of chunks %d..%d of %s failed: %s", self.name, min(run), max(run),
                            src.name, e)
                continue
            n = sum(src.blob.chunk_span(i)[1] for i in data)
            src.stats.add(replay_fetches=1, replayed_chunks=len(data))
            with self._lock:
                self.fetched_chunks += len(data)
                self.fetched_bytes += n


def _claim(src: LazyBlobSource, chunks: range) -> list[dict[int, ChunkFetch]]:
    """Claim, and start at once, the chunks nobody holds or has; one dict per adjacent run."""
    runs: list[dict[int, ChunkFetch]] = []
    rest = list(chunks)
    while rest:
        mine = src.inflight.claim_ahead(rest, src.layer.has)
        if mine:
            own = src.inflight.start(mine)  # started: a reader joins it rather than taking it over
            for i in sorted(own):  # a reader may have taken some over in between: split there
                if runs and i - 1 in runs[-1]:
                    runs[-1][i] = own[i]
                else:
                    runs.append({i: own[i]})
            rest = rest[len(mine):]
        else:
            rest = rest[1:]  # held by a reader (or another request) or already here
    return runs


__all__ = ["ReplayLimits", "ReplayRequest", "TraceReplay", "plan_requests"]
