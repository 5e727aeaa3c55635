"""Single flight: a chunk of a layer is fetched by at most one thread at a time.

A reader that misses a chunk claims it (a `ChunkFetch`: a Future resolved exactly once, with the
verified bytes or the error) or, when another thread holds the claim, joins it. Demand reads come
first: a fetch-ahead claim whose request has not started yet (queued behind others) is taken over
by the reader instead of joined. A join waits at most the fetch deadline; a claim that outlives it
is abandoned, so the next read claims the chunk afresh, and the reader gets FetchError (EIO). The
table's lock never covers I/O: a slow miss never blocks a hit. Whoever claims must resolve or fail
every claim on every path.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from bdserver.errors import BdError, FetchError


class ChunkFetch(Future):  # type: ignore[type-arg]
    """The claim on one chunk. `ahead`: taken by fetch-ahead (its failure is never a reader's);
    `started`: its request is under way (until then a reader may take the claim over)."""

    def __init__(self, ahead: bool = False) -> None:
        super().__init__()
        self.ahead = ahead
        self.started = not ahead
        self.set_running_or_notify_cancel()


@dataclass
class Claim:
    mine: dict[int, ChunkFetch] = field(default_factory=dict)  # the caller fetches these
    joins: dict[int, ChunkFetch] = field(default_factory=dict)  # another thread is fetching these
    ready: list[int] = field(default_factory=list)  # became available since the caller missed them


class InFlight:
    """The claims of one layer, by chunk index."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._table: dict[int, ChunkFetch] = {}

    def __contains__(self, i: int) -> bool:
        return i in self._table

    def claim(self, chunks: Iterable[int], ready: Callable[[int], bool]) -> Claim:
        """Claim or join each chunk. `ready(i)`, asked under the lock, says whether another
        thread finished chunk i after the caller missed it (then it is neither claimed nor joined).
        A fetch-ahead claim not yet started becomes the caller's (who joined it wait for it)."""
        c = Claim()
        with self._lock:
            for i in chunks:
                f = self._table.get(i)
                if f is not None and not f.started:
                    f.ahead, f.started = False, True
                    c.mine[i] = f
                elif f is not None:
                    c.joins[i] = f
                elif ready(i):
                    c.ready.append(i)
                else:
                    c.mine[i] = self._table[i] = ChunkFetch()
        return c

    def claim_ahead(self, run: Iterable[int], ready: Callable[[int], bool]) -> dict[int, ChunkFetch]:
        """For fetch-ahead: the leading chunks of `run` that nobody holds and nobody needs to
        fetch (adjacent, so one request); stops at the first that is held or ready."""
        mine: dict[int, ChunkFetch] = {}
        with self._lock:
            for i in run:
                if i in self._table or ready(i):
                    break
                mine[i] = self._table[i] = ChunkFetch(ahead=True)
        return mine

    def start(self, mine: Mapping[int, ChunkFetch]) -> dict[int, ChunkFetch]:
        """For a fetch-ahead request that begins: its claims that no reader took over, now started."""
        with self._lock:
            own = {i: f for i, f in mine.items() if not f.started}
            for f in own.values():
                f.started = True
        return own

    def abandon(self, claims: Mapping[int, ChunkFetch]) -> None:
        """Forget claims whose fetch outlived the deadline: the next read claims those chunks
        afresh (the late fetch still resolves its own futures, harmlessly)."""
        self._release(claims)

    def _release(self, mine: Mapping[int, ChunkFetch]) -> None:
        with self._lock:
            for i, f in mine.items():
                if self._table.get(i) is f:  # an abandoned claim may have been taken again since
                    del self._table[i]
            if not self._table:
                self._idle.notify_all()

    def resolve(self, mine: Mapping[int, ChunkFetch], data: Mapping[int, bytes]) -> None:
        """Hand the verified chunks to everyone waiting (they must be readable elsewhere already:
        from the cache, or pending write-behind)."""
        self._release(mine)
        for i, f in mine.items():
            f.set_result(data[i])

    def fail(self, mine: Mapping[int, ChunkFetch], err: BaseException) -> None:
        self._release(mine)
        for f in mine.values():
            f.set_exception(err)

    def wait(self, joins: Mapping[int, ChunkFetch], deadline: float) -> tuple[dict[int, bytes], list[int]]:
        """The joined chunks, waiting `deadline` seconds at most in all. A claim unresolved at the
        deadline is abandoned. A fetch-ahead that failed or was abandoned is returned in the retry
        list (the reader fetches the chunk itself); a demand fetch that failed raises its error for
        this reader too, one abandoned raises FetchError."""
        got: dict[int, bytes] = {}
        retry: list[int] = []
        end = time.monotonic() + deadline
        for i, f in joins.items():
            try:
                got[i] = f.result(timeout=max(0.0, end - time.monotonic()))
            except TimeoutError:
                self.abandon({i: f})
                if f.ahead:
                    retry.append(i)
                    continue
                raise FetchError(
                    f"{self.name}: chunk {i}: the fetch under way did not finish within {deadline:g} s; "
                    "the next read tries again"
                ) from None
            except BdError:
                if not f.ahead:
                    raise
                retry.append(i)
        return got, retry

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no claim is outstanding (every fetch on the wire has been resolved)."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._table, timeout=timeout)
