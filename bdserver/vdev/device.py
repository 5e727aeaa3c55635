"""The virtual block device: a map of segments `[merged meta | layer 1 | ... | layer N]`.

Each segment starts at a 4 KiB block address and spans a whole number of blocks; bytes past a
source's data up to the segment end, and gaps between segments, read as zeros. Reads are
thread-safe and may run concurrently: the device holds no lock on the read path.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

from bdserver.blob.starttrace import StartTrace
from bdserver.errors import BdError, FormatError
from bdserver.vdev.lazyblob import LazyBlobSource
from bdserver.vdev.sources import FileSource, Source
from bdserver.vdev.stats import FetchStats, LatencyWindow

BLOCK_SIZE = 4096


def blocks_for(nbytes: int) -> int:
    return -(-nbytes // BLOCK_SIZE)


@dataclass(frozen=True)
class Segment:
    """`source` data placed at block `start_block`, occupying `blocks` blocks of the device."""

    start_block: int
    blocks: int
    source: Source
    name: str = ""

    @property
    def start(self) -> int:
        return self.start_block * BLOCK_SIZE

    @property
    def end(self) -> int:
        return (self.start_block + self.blocks) * BLOCK_SIZE


class VirtualDevice:
    """A read-only block device assembled from segments. `size` is in bytes.

    `read(offset, length)` raises ValueError outside [0, size), and FetchError / IntegrityError
    when data cannot be fetched or verified (backends map those to EIO / MEDIUM ERROR).
    """

    def __init__(
        self,
        segments: Sequence[Segment],
        *,
        size: int | None = None,
        on_close: Iterable[Callable[[], None]] = (),
        info: dict[str, Any] | None = None,
        cache: Any = None,
    ) -> None:
        segs = sorted(segments, key=lambda s: s.start_block)
        prev_end = 0
        for s in segs:
            if s.start_block < 0 or s.blocks < 0:
                raise FormatError(f"segment {s.name!r}: negative block address or length")
            if s.start < prev_end:
                raise FormatError(f"segment {s.name!r} at block {s.start_block} overlaps the previous one")
            if s.source.size > s.blocks * BLOCK_SIZE:
                raise FormatError(
                    f"segment {s.name!r}: {s.source.size} bytes of data do not fit in {s.blocks} blocks"
                )
            prev_end = s.end
        if size is None:
            size = prev_end
        if size < prev_end or size % BLOCK_SIZE:
            raise FormatError(f"device size {size} must be block-aligned and hold every segment")
        self.segments: list[Segment] = segs
        self._starts = [s.start for s in segs]
        self._size = size
        self._on_close = list(on_close)
        self.info = dict(info or {})
        self.cache = cache  # only for stats(): the node-wide cache figures
        self._lat = LatencyWindow()
        self._lock = threading.Lock()
        self._reads = 0
        self._read_bytes = 0
        self._errors = 0
        self._closed = False
        self.replay: Any = None  # a vdev.replay.TraceReplay running on this device, if any

    @property
    def size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return BLOCK_SIZE

    # ---- construction helpers --------------------------------------------------------------

    @classmethod
    def from_files(cls, files: Sequence[str | tuple[str, int]]) -> "VirtualDevice":
        """A device from local files: each a path (placed at the next block boundary) or
        (path, start_block). The first file usually is the merged metadata image."""
        segs: list[Segment] = []
        sources: list[FileSource] = []
        next_block = 0
        try:
            for item in files:
                path, start = (item, next_block) if isinstance(item, (str, os.PathLike)) else item
                src = FileSource(os.fspath(path))
                sources.append(src)
                blocks = blocks_for(src.size)
                segs.append(Segment(start, blocks, src, os.fspath(path)))
                next_block = start + blocks
            return cls(segs, on_close=[s.close for s in sources])
        except BaseException:
            for s in sources:
                s.close()
            raise

    # ---- read path -------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"read [{offset}, {offset + length}) outside the device [0, {self._size})")
        t0 = time.perf_counter()
        try:
            data = self._read(offset, length)
        except BdError:
            with self._lock:
                self._errors += 1
            raise
        self._lat.add(time.perf_counter() - t0)
        with self._lock:
            self._reads += 1
            self._read_bytes += length
        return data

    def _read(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        pos, end = offset, offset + length
        segs, starts = self.segments, self._starts
        while pos < end:
            k = bisect.bisect_right(starts, pos) - 1
            if k >= 0 and pos < segs[k].end:
                seg = segs[k]
                stop = min(end, seg.end)
                rel = pos - seg.start
                if rel < seg.source.size:
                    n = min(stop - pos, seg.source.size - rel)
                    parts.append(seg.source.read(rel, n))
                    if stop - pos > n:
                        parts.append(bytes(stop - pos - n))
                else:
                    parts.append(bytes(stop - pos))
            else:
                nxt = starts[k + 1] if k + 1 < len(starts) else self._size
                stop = min(end, nxt)
                parts.append(bytes(stop - pos))
            pos = stop
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # ---- stats, lifecycle ------------------------------------------------------------------

    def chunks_of(self, offset: int, length: int) -> list[tuple[str, int]]:
        """(layer blob digest, chunk index) of every lazy layer chunk that a read of
        [offset, offset+length) touches, in device order (the device map, for start traces)."""
        out: list[tuple[str, int]] = []
        end = min(offset + length, self._size)
        k = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while k < len(self.segments) and self.segments[k].start < end:
            seg = self.segments[k]
            k += 1
            src = seg.source
            if not isinstance(src, LazyBlobSource):
                continue
            lo, hi = max(offset, seg.start) - seg.start, min(end, seg.start + src.size) - seg.start
            if lo >= hi:
                continue
            index = src.blob.index
            out += [(src.digest, i) for i in range(index.chunk_at(lo), index.chunk_at(hi - 1) + 1)]
        return out

    def start_trace(self, reads: Iterable[tuple[float, int, int]]) -> StartTrace:
        """The start trace of device reads (seconds since attach, offset, length): the lazy
        layer chunks they touched, first access first."""
        acc: list[tuple[str, int, int]] = []
        for t, off, n in sorted(reads):
            ms = max(0, int(t * 1000))
            acc += [(d, i, ms) for d, i in self.chunks_of(off, n)]
        return StartTrace.from_accesses(acc)

    def lazy_sources(self) -> dict[str, LazyBlobSource]:
        """The lazily fetched layers by blob digest."""
        return {s.digest: s for s in self._lazy()}

    def _lazy(self) -> list[LazyBlobSource]:
        return [s.source for s in self.segments if isinstance(s.source, LazyBlobSource)]

    def stats(self) -> dict[str, Any]:
        """Device-wide figures plus per-layer fetch figures (JSON-ready)."""
        layers = []
        totals = asdict(FetchStats())
        for src in self._lazy():
            snap = src.stats.snapshot()
            layers.append({"name": src.name, "digest": src.digest, **snap})
            for k, v in snap.items():
                totals[k] += v
        with self._lock:
            d: dict[str, Any] = {
                "size": self._size,
                "reads": self._reads,
                "read_bytes": self._read_bytes,
                "read_errors": self._errors,
            }
        d.update(totals)
        d["hits"] = totals["chunk_hits"]
        d["misses"] = totals["chunk_misses"]
        d["latency_ms"] = self._lat.summary()
        d["fetch_latency_ms"] = LatencyWindow.merged(src.fetch_latency for src in self._lazy()).summary()
        d["layers"] = layers
        if self.cache is not None:
            d["cache"] = self.cache.stats()
        if self.replay is not None:
            d["replay"] = self.replay.stats()
        return d

    def prefetch(self, offset: int = 0, length: int | None = None) -> None:
        """Bring a range into the cache (e.g. a warm list, or everything for offline use)."""
        if length is None:
            length = self._size - offset
        step = 4 << 20
        for o in range(offset, offset + length, step):
            self.read(o, min(step, offset + length - o))

    def flush(self) -> None:
        """Wait for write-behind cache writes of everything fetched so far."""
        for src in self._lazy():
            src.flush()

    def close(self) -> None:
        """Release sources and pins (after flushing cache writes); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.replay is not None:
            self.replay.close()
        try:
            self.flush()
        except Exception:  # a failed cache write was already logged and counted
            pass
        for fn in self._on_close:
            try:
                fn()
            except Exception:  # closing must not mask the caller's own error
                pass
        for s in self.segments:
            s.source.close()

    def __enter__(self) -> "VirtualDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
