"""Chunk cache: persistence, crash safety, cross-process sharing, LRU eviction with pins, ENOSPC."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import random
import signal
import time

import pytest

from bdserver.cache import CacheKey, ChunkCache
from bdserver.cache import blobentry
from bdserver.cache.blobentry import BlobEntry
from bdserver.errors import FormatError, IntegrityError, NoSpaceError

CH = 64 * 1024
N = 16
OFFSETS = [i * CH for i in range(N)] + [N * CH - 1000]  # last chunk is short
D1 = CacheKey("sha256:" + "1" * 64, "sha256:" + "a" * 64)  # a blob as verified by one index
D2 = CacheKey("sha256:" + "2" * 64, "sha256:" + "b" * 64)
CTX = mp.get_context("fork")


def chunk_bytes(digest: CacheKey, i: int) -> bytes:
    n = OFFSETS[i + 1] - OFFSETS[i]
    seed = hashlib.sha256(f"{digest}/{i}".encode()).digest()
    return (seed * (n // 32 + 1))[:n]


def counter_clock():
    c = itertools.count(1)
    return lambda: next(c)


@pytest.fixture
def root(tmp_path) -> str:
    return str(tmp_path / "cache")


def test_put_get_read_and_misses(root: str) -> None:
    with ChunkCache(root) as c:
        assert c.get(D1, 0) is None  # unknown blob: a miss, not an error
        c.register(D1, OFFSETS)
        assert c.get(D1, 3) is None and not c.has(D1, 3)
        c.put(D1, 3, chunk_bytes(D1, 3))
        assert c.get(D1, 3) == chunk_bytes(D1, 3)
        assert c.read(D1, 3, 100, 50) == chunk_bytes(D1, 3)[100:150]
        c.put(D1, N - 1, chunk_bytes(D1, N - 1))
        assert c.get(D1, N - 1) == chunk_bytes(D1, N - 1)
        with pytest.raises(ValueError):
            c.put(D1, 4, b"short")
        with pytest.raises(KeyError):
            c.put(D2, 0, b"x")
        with pytest.raises(ValueError):
            CacheKey("sha256:../../etc", D1.index)
        s = c.stats()
        assert s["hits"] == 3 and s["misses"] == 2 and s["put_chunks"] == 2


def test_persists_across_reopen_and_processes(root: str) -> None:
    with ChunkCache(root) as c:
        c.register(D1, OFFSETS)
        c.put_many(D1, [(i, chunk_bytes(D1, i)) for i in range(0, N, 2)])

    def child(q) -> None:
        with ChunkCache(root) as c2:
            q.put([c2.get(D1, i) == chunk_bytes(D1, i) if i % 2 == 0 else c2.get(D1, i) is None for i in range(N)])

    q = CTX.Queue()
    p = CTX.Process(target=child, args=(q,))
    p.start()
    res = q.get(timeout=60)
    p.join(60)
    assert all(res)
    with ChunkCache(root) as c3:
        assert c3.chunk_count(D1) == N
        assert c3.get(D1, 4) == chunk_bytes(D1, 4)


def test_entries_are_bound_to_the_index_that_verified_them(root: str) -> None:
    other_index = CacheKey(D1.blob, "sha256:" + "f" * 64)  # the same layer blob, another index
    with ChunkCache(root) as c:
        c.register(D1, OFFSETS)
        c.put(D1, 0, chunk_bytes(D1, 0))
        c.register(other_index, OFFSETS)
        assert c.get(other_index, 0) is None  # never a hit for bytes another index verified
        c.put(other_index, 0, chunk_bytes(other_index, 0))
        assert c.get(D1, 0) == chunk_bytes(D1, 0) and c.get(other_index, 0) == chunk_bytes(other_index, 0)
        c.drop(other_index)
        assert c.get(other_index, 0) is None and c.get(D1, 0) == chunk_bytes(D1, 0)
        c.release(D1)
        c.drop(D1.blob)  # a blob digest: every entry of that blob
        assert c.get(D1, 0) is None


def test_another_layout_never_replaces_an_entry_in_use(root: str) -> None:
    other = [0, 4096, 8192]
    with ChunkCache(root) as c:
        c.register(D1, OFFSETS)
        c.put(D1, 0, chunk_bytes(D1, 0))
        c.register(D1, OFFSETS)  # same geometry: kept
        assert c.has(D1, 0)
        with pytest.raises(FormatError):
            c.register(D1, other)  # held here
        assert c.chunk_count(D1) == N and c.get(D1, 0) == chunk_bytes(D1, 0)
        c.release(D1)
        c.release(D1)
        with ChunkCache(root) as elsewhere:  # another process's device holds it
            elsewhere.register(D1, OFFSETS)
            with pytest.raises(FormatError):
                c.register(D1, other)
            assert elsewhere.get(D1, 0) == chunk_bytes(D1, 0)
        c.register(D1, other)  # nobody uses it: a damaged entry is replaced
        assert c.chunk_count(D1) == 2 and not c.has(D1, 0)


def test_old_format_entries_are_discarded_once_unused(root: str) -> None:
    """Entries keyed by the blob digest alone say nothing about what verified them."""
    old = [os.path.join(root, "chunks", "sha256", h * 64) for h in "12"]
    for path in old:
        blobentry.create_entry(path, OFFSETS)
        with open(os.path.join(path, "data"), "r+b") as f:
            f.write(b"old bytes")
    held = BlobEntry(old[1])  # an older daemon still running with this entry open
    with ChunkCache(root) as c:
        assert not os.path.exists(old[0]) and os.path.exists(old[1])
        assert c.usage() >= 4096  # what it still occupies counts
        held.close()
        c.prune()
        assert not os.path.exists(os.path.join(root, "chunks"))
        c.register(D1, OFFSETS)
        assert c.get(D1, 0) is None


def _crash_child(root: str, mode: str, w) -> None:
    """Write chunk 5, then die before (or while) marking it present."""
    c = ChunkCache(root)
    if mode == "exit":
        BlobEntry._before_mark_present = lambda self: os._exit(0)
    elif mode == "kill":

        def park(self) -> None:
            os.write(w, b"k")
            for _ in range(600):  # bounded: the parent SIGKILLs us long before
                time.sleep(0.1)
            os._exit(3)

        BlobEntry._before_mark_present = park
    elif mode == "torn":
        real = os.pwrite

        def half(fd, data, off):
            real(fd, bytes(data)[: len(data) // 2], off)
            os._exit(0)

        blobentry.os.pwrite = half  # type: ignore[attr-defined]
    c.put(D1, 5, chunk_bytes(D1, 5))
    os._exit(9)


@pytest.mark.parametrize("mode", ["exit", "kill", "torn"])
def test_crash_between_data_write_and_presence_leaves_chunk_absent(root: str, mode: str) -> None:
    with ChunkCache(root) as c:
        c.register(D1, OFFSETS)
        c.put(D1, 4, chunk_bytes(D1, 4))
    r, w = os.pipe()
    p = CTX.Process(target=_crash_child, args=(root, mode, w))
    p.start()
    if mode == "kill":
        assert os.read(r, 1) == b"k"  # the child's data is durable; presence not yet set
        os.kill(p.pid, signal.SIGKILL)
    p.join(60)
    assert p.exitcode in (0, -signal.SIGKILL)
    os.close(r)
    os.close(w)
    with ChunkCache(root) as c:
        assert c.get(D1, 5) is None  # absent, never torn
        assert c.get(D1, 4) == chunk_bytes(D1, 4)  # neighbours unharmed
        c.put(D1, 5, chunk_bytes(D1, 5))  # and the slot is reusable
        assert c.get(D1, 5) == chunk_bytes(D1, 5)
        c.prune()
        assert c.get(D1, 5) == chunk_bytes(D1, 5)


def _writer(root: str, seed: int, q) -> None:
    rnd = random.Random(seed)
    ok = True
    with ChunkCache(root) as c:
        c.register(D1, OFFSETS)
        order = list(range(N))
        for _ in range(3):
            rnd.shuffle(order)
            for i in order:
                got = c.get(D1, i)
                if got is None:
                    c.put(D1, i, chunk_bytes(D1, i))
                elif got != chunk_bytes(D1, i):
                    ok = False
    q.put(ok)


def test_concurrent_processes_share_one_blob(root: str) -> None:
    q = CTX.Queue()
    procs = [CTX.Process(target=_writer, args=(root, s, q)) for s in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert results == [True] * 4
    with ChunkCache(root) as c:
        assert all(c.get(D1, i) == chunk_bytes(D1, i) for i in range(N))
        assert len(os.listdir(os.path.join(root, "entries", "sha256"))) == 1


def test_lru_eviction_under_cap_honours_pins(root: str) -> None:
    overhead = 3 * 4096  # state files and rounding
    cap = 8 * CH + overhead
    with ChunkCache(root, cap_bytes=cap, clock=counter_clock()) as c:
        c.register(D1, OFFSETS)
        c.register(D2, OFFSETS)
        pin = c.pin(D1, [0, 1])
        for i in range(6):
            c.put(D1, i, chunk_bytes(D1, i))
        c.get(D1, 2)  # chunk 2 becomes the most recently used of D1
        for i in range(6):
            c.put(D2, i, chunk_bytes(D2, i))
        assert c.stats()["evictions"] >= 1
        assert c.usage() <= cap
        assert c.has(D1, 0) and c.has(D1, 1)  # pinned, although the oldest
        assert not c.has(D1, 3) and not c.has(D1, 4)  # oldest unpinned went first
        assert c.has(D2, 5) and c.has(D2, 4)  # newest stay
        for i in range(N):  # what survived is intact
            got = c.get(D1, i)
            assert got is None or got == chunk_bytes(D1, i)
        pin.release()
        c.evict(0)
        assert not c.has(D1, 0) and c.usage() <= 2 * 4096 + 2 * 4096


def test_pins_of_other_live_processes_count_and_dead_ones_do_not(root: str) -> None:
    with ChunkCache(root, clock=counter_clock()) as c:
        c.register(D1, OFFSETS)
        c.put_many(D1, [(i, chunk_bytes(D1, i)) for i in range(4)])
        # a pin left by a dead process
        with open(os.path.join(root, "pins", "999999999.1.1.json"), "w") as f:
            json.dump({"digest": D1.name, "chunks": None, "pid": 999_999_999, "start": "1"}, f)
        ready, done = CTX.Event(), CTX.Event()

        def holder() -> None:
            with ChunkCache(root) as c2, c2.pin(D1, [2]):
                ready.set()
                done.wait(60)

        p = CTX.Process(target=holder)
        p.start()
        assert ready.wait(60)
        c.evict(0)
        done.set()
        p.join(60)
        assert [c.has(D1, i) for i in range(4)] == [False, False, True, False]
        assert os.listdir(os.path.join(root, "pins")) == []  # the dead pin was cleaned up


def test_whole_blobs(root: str) -> None:
    data = os.urandom(50_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with ChunkCache(root, clock=counter_clock()) as c:
        assert c.get_whole(digest) is None
        with pytest.raises(IntegrityError):
            c.put_whole(digest, data + b"!")
        assert c.get_whole(digest) is None
        c.put_whole(digest, data)
        assert c.get_whole(digest) == data
        with c.pin(digest):
            c.evict(0)
            assert c.get_whole(digest) == data
        path = os.path.join(root, "whole", "sha256", digest.split(":")[1])
        with open(path, "r+b") as f:
            f.seek(100)
            f.write(b"\xff")
        assert c.get_whole(digest) is None  # damaged on disk: a miss, and removed
        assert not os.path.exists(path)
        c.put_whole(digest, data)
        c.evict(0)
        assert c.get_whole(digest) is None


def test_whole_blobs_go_only_after_every_unpinned_chunk(root: str) -> None:
    """Merged metadata and chunk indexes are small, and no device opens without them: across a
    daemon restart, when nothing pins them, pressure takes chunks first however old they are."""
    meta = os.urandom(20_000)
    digest = "sha256:" + hashlib.sha256(meta).hexdigest()
    with ChunkCache(root) as c:  # the real clock: chunks and whole blobs on one time line
        c.put_whole(digest, meta)
        old = time.time() - 3600
        os.utime(os.path.join(root, "whole", "sha256", digest.split(":")[1]), (old, old))  # least recently used
        c.register(D1, OFFSETS)
        for i in range(8):
            c.put(D1, i, chunk_bytes(D1, i))
        c.evict(c.usage() - 3 * CH)  # room for a few chunks: the chunks go
        assert c.get_whole(digest) == meta
        assert not c.has(D1, 0) and c.has(D1, 7)  # LRU among the chunks
        c.evict(0)  # nothing else left to take: now the whole blob goes too
        assert c.get_whole(digest) is None


def test_enospc_is_typed_and_leaves_state_consistent(root: str, monkeypatch) -> None:
    with ChunkCache(root) as c:
        c.register(D1, OFFSETS)
        c.put(D1, 0, chunk_bytes(D1, 0))
        real = os.pwrite

        def full(fd, data, off):
            real(fd, bytes(data)[:100], off)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(blobentry.os, "pwrite", full)
        with pytest.raises(NoSpaceError):
            c.put(D1, 1, chunk_bytes(D1, 1))
        monkeypatch.setattr(blobentry.os, "pwrite", real)
        assert c.get(D1, 1) is None
        assert c.stats()["nospace"] >= 1
        c.put(D1, 1, chunk_bytes(D1, 1))
        assert c.get(D1, 1) == chunk_bytes(D1, 1)


def test_eviction_racing_a_read_never_returns_a_hole(root: str, monkeypatch) -> None:
    with ChunkCache(root) as c:
        c.register(D1, OFFSETS)
        c.put(D1, 2, chunk_bytes(D1, 2))
        real = os.pread

        def evict_then_read(fd, n, off):
            monkeypatch.setattr(blobentry.os, "pread", real)
            c.evict(0)  # clears presence, punches the hole...
            c.put(D1, 2, chunk_bytes(D1, 2))  # ...and even a re-put in between
            return b"\0" * n  # what the reader would have seen from the hole

        monkeypatch.setattr(blobentry.os, "pread", evict_then_read)
        assert c.get(D1, 2) is None  # generation changed: not trusted
        assert c.get(D1, 2) == chunk_bytes(D1, 2)


def test_damaged_state_is_dropped(root: str) -> None:
    with ChunkCache(root) as c:
        c.register(D1, OFFSETS)
        c.put(D1, 0, chunk_bytes(D1, 0))
    state = os.path.join(root, "entries", D1.relpath(), "state")
    with open(state, "r+b") as f:
        f.seek(70)
        f.write(b"\x99")
    with ChunkCache(root) as c:
        assert c.get(D1, 0) is None
        c.register(D1, OFFSETS)
        c.put(D1, 0, chunk_bytes(D1, 0))
        assert c.get(D1, 0) == chunk_bytes(D1, 0)


def test_prune(root: str) -> None:
    with ChunkCache(root) as c:
        c.register(D1, OFFSETS)
        c.register(D2, OFFSETS)
        c.put(D1, 0, chunk_bytes(D1, 0))
        c.put(D2, 0, chunk_bytes(D2, 0))
        D3 = CacheKey("sha256:" + "3" * 64, "sha256:" + "c" * 64)
        c.register(D3, OFFSETS)  # nothing cached: pruned
        c.release(D2)
        c.release(D3)
        res = c.prune(keep=lambda d: d != D2.blob)
        assert res.dropped_blobs == 2
        assert c.get(D1, 0) == chunk_bytes(D1, 0)
        assert c.get(D2, 0) is None and c.chunk_count(D3) is None
        assert c.prune(keep=lambda d: False).dropped_blobs == 0  # D1 is held (a device uses it)
        assert c.get(D1, 0) == chunk_bytes(D1, 0)
        c.release(D1)
        assert c.prune(keep=lambda d: False).dropped_blobs == 1
        assert c.get(D1, 0) is None


def _evictor(root: str, stop, rounds: int) -> None:
    with ChunkCache(root) as c:
        for _ in range(rounds):
            if stop.is_set():
                break
            c.evict(0)
            c.prune()


def test_readers_never_see_torn_or_punched_bytes_while_another_process_evicts(root: str) -> None:
    with ChunkCache(root) as c:
        c.register(D1, OFFSETS)
        stop = CTX.Event()
        p = CTX.Process(target=_evictor, args=(root, stop, 400))
        p.start()
        bad = 0
        served = 0
        try:
            for k in range(3000):
                i = k % N
                got = c.get(D1, i)
                if got is None:  # prune may drop the emptied entry: re-register through offsets
                    c.put_many(D1, [(i, chunk_bytes(D1, i))], offsets=OFFSETS)
                else:
                    served += 1
                    bad += got != chunk_bytes(D1, i)
                part = c.read(D1, i, 1000, 3000)
                if part is not None:
                    bad += part != chunk_bytes(D1, i)[1000:4000]
        finally:
            stop.set()
            p.join(60)
        assert bad == 0
        assert served > 0


@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MiB tmpfs (root only): real ENOSPC, real hole punching."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.fail("needs root to mount a tmpfs")
    import subprocess

    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.fail("cannot mount a tmpfs here")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_enospc_evicts_or_raises_typed_error(tiny_fs: str) -> None:
    big = [i * CH for i in range(64)] + [64 * CH]  # 4 MiB of chunks: twice the filesystem
    with ChunkCache(tiny_fs, cap_bytes=1 << 30, clock=counter_clock()) as c:  # cap never binds
        c.register(D1, big)
        data = lambda i: bytes([i]) * CH  # noqa: E731
        for i in range(64):
            c.put(D1, i, data(i))  # ENOSPC -> evict older chunks -> retry
        assert c.stats()["nospace"] >= 1
        assert c.has(D1, 63) and not c.has(D1, 0)
        present = [i for i in range(64) if c.has(D1, i)]
        assert all(c.get(D1, i) == data(i) for i in present)
        with c.pin(D1):  # nothing may be evicted: the typed error, state intact
            with pytest.raises(NoSpaceError):
                for i in range(64):
                    if not c.has(D1, i):
                        c.put(D1, i, data(i))
            assert all(c.get(D1, i) == data(i) for i in present if c.has(D1, i))
    with ChunkCache(tiny_fs) as c:  # and it reopens cleanly
        assert all(c.get(D1, i) == data(i) for i in present if c.has(D1, i))


def test_closing_handles_under_running_reads_is_safe(root: str) -> None:
    import threading

    with ChunkCache(root) as c:
        c.register(D1, OFFSETS)
        c.put_many(D1, [(i, chunk_bytes(D1, i)) for i in range(N)])
        errors: list[BaseException] = []
        bad: list[int] = []
        stop = threading.Event()

        def reader(seed: int) -> None:
            rnd = random.Random(seed)
            try:
                for _ in range(3000):
                    if stop.is_set():
                        break
                    i = rnd.randrange(N)
                    got = c.read(D1, i, 10, 5000)
                    if got is not None and got != chunk_bytes(D1, i)[10:5010]:
                        bad.append(i)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for _ in range(300):  # close our handle again and again while reads run
            c.release(D1)
            c.register(D1, OFFSETS)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors and not bad
