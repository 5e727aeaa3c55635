"""Layer images laid out by a start trace: the files a start reads first, first and contiguous.

A start trace names chunks of the layer blobs a conversion made (blob/starttrace.py). Conversion is
deterministic, so converting the same source layer again gives the same blob: the chunks the trace
names for it say which files the start read, in which order (`read_order`). The layer is then
written again with those files' data first (erofs `data_first`), and the trace is carried over to
the new blob (`carry_over`): each file range a traced chunk held becomes the chunks that hold it
now, so the new trace replays as a few long ranges. Deterministic for the same source and trace.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Iterable

from bdserver.erofs.reader import ErofsImage


@dataclass(frozen=True)
class FileExtent:
    """Bytes [start, end) of a layer image hold a file's bytes from ``file_offset`` on."""

    start: int
    end: int
    path: bytes
    file_offset: int


class ExtentMap:
    """Where each regular file's data lies in one layer image."""

    def __init__(self, image: str | os.PathLike[str]) -> None:
        out: list[FileExtent] = []
        with ErofsImage.open(image) as img:
            bs = img.block_size
            for path, info in img.walk():
                if not info.is_reg:
                    continue
                for fo, n, blk in img.extents(info):
                    if blk is not None and n > 0:
                        out.append(FileExtent(blk * bs, blk * bs + n, path, fo))
        out.sort(key=lambda e: (e.start, e.path))
        self.extents = out
        self._starts = [e.start for e in out]
        self.by_path: dict[bytes, list[FileExtent]] = {}
        for e in out:
            self.by_path.setdefault(e.path, []).append(e)

    def overlapping(self, start: int, end: int) -> list[FileExtent]:
        k = max(0, bisect.bisect_right(self._starts, start) - 1)
        got = []
        while k < len(self.extents) and self.extents[k].start < end:
            e = self.extents[k]
            if e.end > start:
                got.append(e)
            k += 1
        return got


MIN_COVERED = 0.5  # a file counts as read when the traced chunks hold at least this share of it


def read_order(old: ExtentMap, chunk_size: int, chunks: Iterable[int]) -> list[bytes]:
    """The files the start read, in first-access order (then by position): those that the traced
    chunks hold at least MIN_COVERED of. A file that only shares a traced chunk with another one
    (a few KiB at a chunk's edge) was most likely not read: it keeps its place."""
    ordered = list(dict.fromkeys(chunks))
    traced = set(ordered)
    order: dict[bytes, None] = {}
    for c in ordered:
        for e in old.overlapping(c * chunk_size, (c + 1) * chunk_size):
            if e.path in order:
                continue
            size = covered = 0
            for x in old.by_path[e.path]:
                size += x.end - x.start
                for k in range(x.start // chunk_size, (x.end - 1) // chunk_size + 1):
                    if k in traced:
                        covered += min(x.end, (k + 1) * chunk_size) - max(x.start, k * chunk_size)
            if covered >= MIN_COVERED * size:
                order[e.path] = None
    return list(order)


def carry_over(old: ExtentMap, new: ExtentMap, chunk_size: int, chunk: int, read: set[bytes]) -> list[int]:
    """The chunks of the new layer image holding what ``chunk`` of the old one held of the files
    in ``read`` (file data only: the merged metadata holds the rest), in file order."""
    out: dict[int, None] = {}
    lo, hi = chunk * chunk_size, (chunk + 1) * chunk_size
    for e in old.overlapping(lo, hi):
        if e.path not in read:
            continue
        a = e.file_offset + max(lo, e.start) - e.start  # the file range this chunk held
        b = e.file_offset + min(hi, e.end) - e.start
        for ne in new.by_path.get(e.path, ()):
            x, y = max(a, ne.file_offset), min(b, ne.file_offset + ne.end - ne.start)
            if x < y:
                s = ne.start + x - ne.file_offset
                for k in range(s // chunk_size, (s + y - x - 1) // chunk_size + 1):
                    out.setdefault(k, None)
    return list(out)
