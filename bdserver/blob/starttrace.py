"""A start trace: which chunks of which layer blobs a container start read, first access first.

It names chunks only by (blob digest, chunk index), so it fits every device built from the same
layer blobs and can make a node fetch nothing but chunks that the blob's chunk index verifies.
Whoever records it (the daemon, from the reads the kernel made) or replays it (vdev/replay.py)
maps chunks to device offsets through the device map; nothing here knows EROFS or OCI.

Encoding: canonical JSON (sorted keys, no spaces), so the same trace always has the same digest::

    {"blobs": ["sha256:...", ...], "runs": [[blob, first, count, ms], ...], "version": 1}

A run is ``count`` adjacent chunks of ``blobs[blob]`` first read, in that order, ``ms``
milliseconds after the device was attached. Parsing is bounded (MAX_TRACE_BYTES of JSON,
MAX_BLOBS blobs, MAX_CHUNKS chunks in all) because a trace comes from a registry; a chunk named
twice counts once, at its first place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Iterator

from bdserver.digest import parse_digest
from bdserver.errors import FormatError

VERSION = 1
MAX_TRACE_BYTES = 4 << 20  # of JSON: a trace of a real start is a few KiB to a few hundred
MAX_BLOBS = 1024
MAX_CHUNKS = 1 << 20  # 128 GiB of 128 KiB chunks: more than any start reads
MAX_CHUNK_INDEX = (1 << 31) - 1


@dataclass(frozen=True)
class TraceRun:
    """``count`` adjacent chunks of one blob, first read ``ms`` after attach."""

    blob: str
    first: int
    count: int
    ms: int


class StartTrace:
    """Chunks in first-access order, held as runs of adjacent chunks of one blob."""

    def __init__(self, runs: Iterable[TraceRun] = ()) -> None:
        self.runs: list[TraceRun] = []
        seen: set[tuple[str, int]] = set()
        for r in runs:
            for i in range(r.first, r.first + r.count):
                if (r.blob, i) not in seen:
                    seen.add((r.blob, i))
                    self._append(r.blob, i, r.ms)
        self._count = len(seen)

    def _append(self, blob: str, i: int, ms: int) -> None:
        last = self.runs[-1] if self.runs else None
        if last is not None and last.blob == blob and last.first + last.count == i:
            self.runs[-1] = TraceRun(blob, last.first, last.count + 1, last.ms)
        else:
            self.runs.append(TraceRun(blob, i, 1, ms))

    @classmethod
    def from_accesses(cls, accesses: Iterable[tuple[str, int, int]]) -> "StartTrace":
        """(blob digest, chunk index, ms since attach) in access order -> the trace."""
        return cls(TraceRun(b, i, 1, ms) for b, i, ms in accesses)

    def __len__(self) -> int:
        """Distinct chunks."""
        return self._count

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StartTrace) and self.runs == other.runs

    def chunks(self) -> Iterator[tuple[str, int]]:
        """(blob digest, chunk index) in first-access order."""
        for r in self.runs:
            for i in range(r.first, r.first + r.count):
                yield r.blob, i

    def blobs(self) -> list[str]:
        """Blob digests in order of their first chunk."""
        return list(dict.fromkeys(r.blob for r in self.runs))

    def per_blob(self) -> dict[str, list[int]]:
        """Blob digest -> its chunk indexes in first-access order."""
        out: dict[str, list[int]] = {}
        for b, i in self.chunks():
            out.setdefault(b, []).append(i)
        return out

    # ---- encoding ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        blobs = self.blobs()
        pos = {b: k for k, b in enumerate(blobs)}
        doc = {"blobs": blobs, "runs": [[pos[r.blob], r.first, r.count, r.ms] for r in self.runs],
               "version": VERSION}
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        if len(data) > MAX_TRACE_BYTES:
            raise FormatError(f"start trace of {len(self)} chunks encodes to {len(data)} bytes, "
                              f"more than {MAX_TRACE_BYTES}")
        return data

    @classmethod
    def parse(cls, data: bytes, *, name: str = "start trace") -> "StartTrace":
        """The trace encoded in ``data``; FormatError naming what is wrong (nothing is guessed)."""
        if len(data) > MAX_TRACE_BYTES:
            raise FormatError(f"{name} is {len(data)} bytes; at most {MAX_TRACE_BYTES} are accepted")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"{name} is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise FormatError(f"{name}: not a version {VERSION} start trace")
        blobs, runs = doc.get("blobs"), doc.get("runs")
        if not isinstance(blobs, list) or not isinstance(runs, list):
            raise FormatError(f"{name}: 'blobs' and 'runs' must be lists")
        if len(blobs) > MAX_BLOBS:
            raise FormatError(f"{name} names {len(blobs)} blobs; at most {MAX_BLOBS} are accepted")
        for b in blobs:
            if not isinstance(b, str):
                raise FormatError(f"{name}: blob {b!r} is not a digest")
            parse_digest(b)
        out: list[TraceRun] = []
        total = 0
        for r in runs:
            if not (isinstance(r, list) and len(r) == 4 and all(type(x) is int for x in r)):
                raise FormatError(f"{name}: run {str(r)[:80]} is not [blob, first, count, ms]")
            b, first, count, ms = r
            if not 0 <= b < len(blobs) or not 0 <= first <= MAX_CHUNK_INDEX or count < 1 \
                    or first + count - 1 > MAX_CHUNK_INDEX or ms < 0:
                raise FormatError(f"{name}: run {r} is out of range")
            total += count
            if total > MAX_CHUNKS:
                raise FormatError(f"{name} names more than {MAX_CHUNKS} chunks")
            out.append(TraceRun(blobs[b], first, count, ms))
        return cls(out)


__all__ = ["MAX_CHUNKS", "MAX_TRACE_BYTES", "StartTrace", "TraceRun", "VERSION"]
