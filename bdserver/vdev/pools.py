"""The threads lazy devices fetch and store with, owned by whoever opens devices.

The daemon makes ONE `FetchPools` for all its devices (sized by its config) and passes it to
`open_lazy_image`; tests and tools make their own. Nothing in vdev/ starts threads of its own, so
the owner decides how much concurrency a node spends and when it stops.

Three pools, because a request must never queue behind a less urgent one:

* `demand`: the second and later runs of ONE read (the first runs on the reader's thread), and the
  chunk indexes of a device being opened. Their tasks never wait on other fetches: no deadlock.
* `ahead`: fetch-ahead requests (and, later, start-trace replay): a demand miss never waits for a
  free thread behind them.
* `writers`: write-behind cache writes (write + fdatasync + mark present), off the read path.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


class FetchPools:
    def __init__(self, demand: int = 8, ahead: int = 16, writers: int = 2) -> None:
        if min(demand, ahead, writers) < 1:
            raise ValueError("every fetch pool needs at least one thread")
        self.demand = ThreadPoolExecutor(max_workers=demand, thread_name_prefix="bdserver-fetch")
        self.ahead = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="bdserver-ahead")
        self.writers = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="bdserver-cache-write")

    def close(self) -> None:
        """Stop taking work and wait for what runs (devices using the pools are closed first)."""
        for pool in (self.demand, self.ahead, self.writers):
            pool.shutdown(wait=True)

    def __enter__(self) -> "FetchPools":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
