"""Run coalescing: adjacent missing chunks of a layer travel in ONE range request, verified.

`coalesce` groups sorted chunk indexes into runs of adjacent chunks (at most MAX_RUN_BYTES on the
wire each); `RunFetcher.fetch` gets one run through the layer's `ChunkedBlob` (which verifies every
chunk against the index before decompressing it) and counts what the network did.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from bdserver.blob.reader import ChunkedBlob
from bdserver.errors import BdError, FetchError, FormatError, IntegrityError
from bdserver.vdev.stats import Counter, LatencyWindow

log = logging.getLogger(__name__)

MAX_RUN_BYTES = 8 << 20  # split very long runs so one request never carries more than this


def coalesce(chunks: Sequence[int], on_blob_size: Callable[[int], int],
             max_bytes: int = MAX_RUN_BYTES) -> list[list[int]]:
    """Sorted chunk indexes -> runs of adjacent ones, each at most `max_bytes` on the blob."""
    runs: list[list[int]] = []
    run_bytes = 0
    for i in chunks:
        n = on_blob_size(i)
        if runs and runs[-1][-1] == i - 1 and run_bytes + n <= max_bytes:
            runs[-1].append(i)
            run_bytes += n
        else:
            runs.append([i])
            run_bytes = n
    return runs


class RunFetcher:
    """Fetches and verifies runs of one layer blob; counts fetches, bytes, errors, latency."""

    def __init__(self, blob: ChunkedBlob, stats: Counter, latency: LatencyWindow, name: str) -> None:
        self.blob = blob
        self.stats = stats
        self.latency = latency
        self.name = name

    def runs(self, chunks: Sequence[int]) -> list[list[int]]:
        return coalesce(sorted(chunks), lambda i: self.blob.chunk_span(i)[1])

    def fetch(self, run: Sequence[int]) -> dict[int, bytes]:
        """Chunks run[0]..run[-1] (adjacent), verified and decompressed. Raises IntegrityError for
        bytes that do not verify or decode, FetchError (or another BdError) for the rest."""
        first, last = run[0], run[-1]
        start = self.blob.chunk_span(first)[0]
        o, n = self.blob.chunk_span(last)
        t0 = time.perf_counter()
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
        except Exception as e:  # noqa: BLE001 - whatever the transport raised: EIO, and retried next read
            self.stats.add(fetches=1, fetch_errors=1)
            raise FetchError(f"{self.name}: chunks {first}..{last}: {e}") from e
        self.latency.add(time.perf_counter() - t0)
        self.stats.add(fetches=1, fetched_bytes=o + n - start, fetched_chunks=last - first + 1)
        return dict(zip(range(first, last + 1), chunks))
