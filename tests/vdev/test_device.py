"""VirtualDevice: layout, coalescing, single-flight, hits never wait for misses, failures, restarts."""

from __future__ import annotations

import random
import threading

import pytest

from bdserver.cache import ChunkCache
from bdserver.errors import FetchError, FormatError, IntegrityError
from bdserver.vdev import FetchPools, VirtualDevice, open_lazy_image
from bdserver.vdev.lazyimage import layout_fetcher
from tests.vdev.conftest import BS, CS, WAIT, LazyImage, build_lazy_image, joined, sha


def layer_chunk_offset(lazy: LazyImage, layer: int, chunk: int) -> int:
    """Device offset of a layer's chunk."""
    return lazy.layers[layer][2] * BS + chunk * CS


def test_whole_device_and_random_reads_match(pools: FetchPools, lazy: LazyImage, cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    assert dev.size == len(lazy.expected)
    assert dev.read(0, dev.size) == lazy.expected
    rnd = random.Random(1)
    for _ in range(300):
        o = rnd.randrange(dev.size)
        n = rnd.randrange(min(dev.size - o, 3 * CS) + 1)
        assert dev.read(o, n) == lazy.expected[o : o + n]
    assert dev.read(dev.size, 0) == b""
    with pytest.raises(ValueError):
        dev.read(dev.size - 10, 11)
    with pytest.raises(ValueError):
        dev.read(-1, 1)
    dev.close()


def test_works_without_a_cache(pools: FetchPools, lazy: LazyImage) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, None, pools=pools)
    assert dev.read(0, dev.size) == lazy.expected


def test_a_run_of_missing_chunks_is_one_request(pools: FetchPools, lazy: LazyImage, cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    digest = lazy.layers[0][0]
    before = len(lazy.registry.calls_for(digest))
    start = layer_chunk_offset(lazy, 0, 0) + 100
    n_chunks = 3
    data = dev.read(start, n_chunks * CS - 200)  # spans 3 chunks, none cached
    assert data == lazy.expected[start : start + n_chunks * CS - 200]
    assert len(lazy.registry.calls_for(digest)) - before == 1
    s = dev.stats()
    assert s["fetches"] == 1 and s["misses"] == n_chunks
    # cached now: no request at all
    assert dev.read(start, 100) == lazy.expected[start : start + 100]
    assert len(lazy.registry.calls_for(digest)) - before == 1
    assert dev.stats()["hits"] == 1
    # a read whose middle chunk is cached fetches the two others separately (not adjacent)
    dev.read(layer_chunk_offset(lazy, 0, 1), 10)  # cached already (chunk 1)
    before = len(lazy.registry.calls)
    o = layer_chunk_offset(lazy, 0, 3)
    dev.read(o, 3 * CS)
    assert len(lazy.registry.calls) - before == 1  # chunks 3..5 missing and adjacent: 1 request


def test_single_flight(pools: FetchPools, lazy: LazyImage, cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    digest = lazy.layers[0][0]
    entered, release = threading.Event(), threading.Event()

    def hook(d: str, off: int, n: int) -> None:
        if d == digest:
            entered.set()
            release.wait(WAIT)

    lazy.registry.hook = hook
    before = len(lazy.registry.calls_for(digest))
    off = layer_chunk_offset(lazy, 0, 2) + 5
    results: list[bytes] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            results.append(dev.read(off, 1000))
        except BaseException as e:  # surfaced by the asserts below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(16)]
    for t in threads:
        t.start()
    assert entered.wait(WAIT)
    assert joined(dev.segments[1].source, 15), "the other readers never joined the fetch in flight"
    release.set()  # only now does the one fetch complete
    for t in threads:
        t.join(WAIT)
    assert not errors
    assert results == [lazy.expected[off : off + 1000]] * 16
    assert len(lazy.registry.calls_for(digest)) - before == 1


def test_slow_miss_does_not_block_a_hit(pools: FetchPools, lazy: LazyImage, cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    a = layer_chunk_offset(lazy, 0, 0)
    b = layer_chunk_offset(lazy, 0, 2)
    c = layer_chunk_offset(lazy, 1, 0)
    assert dev.read(b, 100) == lazy.expected[b : b + 100]  # chunk B is cached now
    entered, release = threading.Event(), threading.Event()

    def hook(d: str, off: int, n: int) -> None:
        entered.set()
        release.wait(WAIT)

    lazy.registry.hook = hook
    done = threading.Event()
    out: list[bytes] = []

    def slow() -> None:
        out.append(dev.read(a, 100))
        done.set()

    t = threading.Thread(target=slow)
    t.start()
    assert entered.wait(WAIT)  # the miss on A is parked inside the fetch
    assert dev.read(b, 100) == lazy.expected[b : b + 100]  # same layer, cached: completes
    assert dev.read(0, 4096) == lazy.expected[:4096]  # metadata: completes
    assert not done.is_set()  # ...while the miss is still parked
    lazy.registry.hook = None
    assert dev.read(c, 100) == lazy.expected[c : c + 100]  # another layer's miss is not held up either
    release.set()
    t.join(WAIT)
    assert out == [lazy.expected[a : a + 100]]


def test_failed_fetch_raises_caches_nothing_and_is_retried(pools: FetchPools, lazy: LazyImage,
                                                           cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    off = layer_chunk_offset(lazy, 0, 1)
    lazy.registry.fail = ConnectionResetError("registry went away")
    with pytest.raises(FetchError):
        dev.read(off, 3 * CS)
    key = dev.segments[1].source.key
    assert not any(cache.has(key, i) for i in range(1, 4))
    assert dev.stats()["fetch_errors"] == 1 and dev.stats()["read_errors"] == 1
    lazy.registry.fail = None
    assert dev.read(off, 3 * CS) == lazy.expected[off : off + 3 * CS]
    dev.flush()  # cache writes are write-behind
    assert all(cache.has(key, i) for i in range(1, 4))


def test_an_exception_in_the_store_path_never_parks_later_reads(pools: FetchPools, lazy: LazyImage, cache: ChunkCache,
                                                                 monkeypatch) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    key = dev.segments[1].source.key
    off = layer_chunk_offset(lazy, 0, 1)

    def broken(*a, **kw):
        raise RuntimeError("injected: the cache write blew up")

    monkeypatch.setattr(cache, "put_many", broken)
    assert dev.read(off, 100) == lazy.expected[off : off + 100]  # verified bytes are served anyway
    assert not cache.has(key, 1) and dev.stats()["cache_put_errors"] == 1
    monkeypatch.undo()
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(dev.read(off, 100)), daemon=True)
    t.start()
    t.join(WAIT)  # generous: the claim must be resolved, not waited out
    assert not t.is_alive(), "the next read of the chunk is parked on a claim nobody resolves"
    assert out == [lazy.expected[off : off + 100]] and cache.has(key, 1)
    dev.close()


def test_waiters_of_a_failed_fetch_fail_too(pools: FetchPools, lazy: LazyImage, cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    off = layer_chunk_offset(lazy, 0, 0)
    entered, release = threading.Event(), threading.Event()
    before = len(lazy.registry.calls_for(lazy.layers[0][0]))

    def hook(d: str, o: int, n: int) -> None:
        entered.set()
        release.wait(WAIT)
        raise TimeoutError("slow registry")

    lazy.registry.hook = hook
    errs: list[BaseException] = []

    def reader() -> None:
        try:
            dev.read(off, 10)
        except BaseException as e:
            errs.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    assert entered.wait(WAIT)
    assert joined(dev.segments[1].source, 3), "the other readers never joined the fetch in flight"
    release.set()
    for t in threads:
        t.join(WAIT)
    assert len(errs) == 4 and all(isinstance(e, FetchError) for e in errs)
    assert len(lazy.registry.calls_for(lazy.layers[0][0])) == before + 1  # one fetch failed for all four
    lazy.registry.hook = None
    assert dev.read(off, 10) == lazy.expected[off : off + 10]


def test_a_join_waits_at_most_the_fetch_deadline_and_the_next_read_retries(pools: FetchPools, lazy: LazyImage,
                                                                          cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools, fetch_deadline=0.5)
    digest = lazy.layers[0][0]
    before = len(lazy.registry.calls_for(digest))
    off = layer_chunk_offset(lazy, 0, 2)
    wedged, release = threading.Event(), threading.Event()

    def hook(d: str, o: int, n: int) -> None:
        if d == digest and not wedged.is_set():  # the first fetch hangs (a registry that went quiet)
            wedged.set()
            release.wait(WAIT)

    lazy.registry.hook = hook
    first: list[bytes] = []
    t = threading.Thread(target=lambda: first.append(dev.read(off, 10)), daemon=True)
    t.start()
    assert wedged.wait(WAIT)
    outcome: list[BaseException | bytes] = []

    def joiner() -> None:
        try:
            outcome.append(dev.read(off, 10))
        except BaseException as e:  # surfaced by the asserts below
            outcome.append(e)

    j = threading.Thread(target=joiner, daemon=True)
    j.start()
    j.join(WAIT)  # bounded by the 0.5 s deadline, not by the wedged fetch
    assert not j.is_alive() and len(outcome) == 1 and isinstance(outcome[0], FetchError)
    assert t.is_alive()  # the wedged fetch is still on the wire
    assert dev.read(off, 10) == lazy.expected[off : off + 10]  # the next read fetches it itself
    assert len(lazy.registry.calls_for(digest)) - before == 2
    release.set()
    t.join(WAIT)
    assert first == [lazy.expected[off : off + 10]]
    s = dev.stats()
    assert s["joined"] == 1 and s["join_timeouts"] == 1 and s["read_errors"] == 1
    dev.close()


def test_corrupt_chunk_is_integrity_error_and_not_cached(pools: FetchPools, lazy: LazyImage, cache: ChunkCache) -> None:
    digest = lazy.layers[0][0]
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    blob = bytearray(lazy.registry.blobs[digest])
    o, n = dev.segments[1].source.blob.chunk_span(1)
    blob[o + n // 2] ^= 0x40
    lazy.registry.corrupt[digest] = bytes(blob)
    off = layer_chunk_offset(lazy, 0, 0)
    with pytest.raises(IntegrityError):
        dev.read(off, 3 * CS)  # chunks 0..2 in one request; chunk 1 is bad
    dev.flush()
    assert not any(cache.has(dev.segments[1].source.key, i) for i in range(3))
    assert dev.stats()["integrity_errors"] == 1
    with pytest.raises(IntegrityError):
        dev.read(layer_chunk_offset(lazy, 0, 1), 10)  # next read tries the registry again
    assert dev.read(layer_chunk_offset(lazy, 0, 2), 10) == lazy.expected[layer_chunk_offset(lazy, 0, 2) :][:10]
    del lazy.registry.corrupt[digest]
    assert dev.read(off, 3 * CS) == lazy.expected[off : off + 3 * CS]


def test_metadata_and_index_are_verified_at_open(pools: FetchPools, cache: ChunkCache) -> None:
    lazy = build_lazy_image(seed=2)
    meta_digest = lazy.manifest["layers"][-1]["digest"]
    lazy.registry.corrupt[meta_digest] = b"X" + lazy.meta[1:]
    with pytest.raises(IntegrityError):
        open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    assert cache.get_whole(meta_digest) is None
    del lazy.registry.corrupt[meta_digest]
    d0 = lazy.layers[0][0]
    blob = bytearray(lazy.registry.blobs[d0])
    blob[-5] ^= 1  # inside the chunk index
    lazy.registry.corrupt[d0] = bytes(blob)
    # (no cache: the indexes were fetched beside the bad metadata above, verified, and cached)
    with pytest.raises(IntegrityError):
        open_lazy_image(lazy.manifest, lazy.registry.fetch, None, pools=pools)


def test_reattach_after_restart_needs_no_request(pools: FetchPools, tmp_path) -> None:
    lazy = build_lazy_image(seed=3)
    root = str(tmp_path / "cache")
    with ChunkCache(root) as c:
        dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, c, pools=pools)
        assert dev.read(0, dev.size) == lazy.expected
        dev.close()
    lazy.registry.fail = ConnectionRefusedError("offline")
    with ChunkCache(root) as c:
        dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, c, pools=pools)
        assert dev.read(0, dev.size) == lazy.expected
        assert dev.stats()["fetches"] == 0
        dev.close()


def test_metadata_is_pinned_while_attached(pools: FetchPools, lazy: LazyImage, cache: ChunkCache) -> None:
    meta_digest = lazy.manifest["layers"][-1]["digest"]
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    dev.read(0, dev.size)
    dev.flush()
    cache.evict(0)
    assert cache.get_whole(meta_digest) == lazy.meta
    assert not cache.has(dev.segments[1].source.key, 0)  # data chunks are fair game
    assert dev.read(0, dev.size) == lazy.expected
    dev.close()
    cache.evict(0)
    assert cache.get_whole(meta_digest) is None


def test_metadata_and_indexes_of_a_live_device_survive_cache_pressure(pools: FetchPools, tmp_path) -> None:
    lazy = build_lazy_image(seed=8, layer_blocks=(120, 60, 30))
    meta_digest = lazy.manifest["layers"][-1]["digest"]
    indexes = [d["annotations"]["org.erofs.chunk-index.digest"] for d in lazy.manifest["layers"][:-1]]
    with ChunkCache(str(tmp_path / "cache"), cap_bytes=4 * BS) as cache:  # less than the metadata alone
        dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
        for _ in range(2):
            assert dev.read(0, dev.size) == lazy.expected  # every chunk fetched, and evicted again
        assert cache.stats()["evicted_chunks"] > 0
        assert cache.get_whole(meta_digest) == lazy.meta
        assert all(cache.get_whole(d) is not None for d in indexes)
        dev.close()
        lazy.registry.fail = ConnectionRefusedError("offline")  # the registry goes away: reopen from the cache
        dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
        assert dev.read(0, BS) == lazy.expected[:BS]
        dev.close()
        cache.evict(0)  # nothing live: now they may go
        assert cache.get_whole(meta_digest) is None


def test_concurrent_random_readers(pools: FetchPools, lazy: LazyImage, cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    bad: list[tuple[int, int]] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(150):
            o = rnd.randrange(dev.size)
            n = rnd.randrange(min(dev.size - o, 2 * CS) + 1)
            if dev.read(o, n) != lazy.expected[o : o + n]:
                bad.append((o, n))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not bad
    s = dev.stats()
    total_chunks = sum(-(-len(img) // CS) for _, img, _ in lazy.layers)
    assert s["fetched_bytes"] <= sum(len(lazy.registry.blobs[d]) for d, _, _ in lazy.layers)
    assert s["fetched_chunks"] <= total_chunks  # no chunk fetched twice (the cache never evicted)
    for lat in (s["latency_ms"], s["fetch_latency_ms"]):  # one summary shape, as the daemon reports it
        assert set(lat) == {"p50", "p90", "p99", "max", "samples"}
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and lat["samples"] > 0


def test_plan_rejects_what_is_not_a_lazy_image(pools: FetchPools, lazy: LazyImage, cache: ChunkCache) -> None:
    import copy

    def mutate(fn) -> dict:
        m = copy.deepcopy(lazy.manifest)
        fn(m["layers"])
        return m

    bad = [
        mutate(lambda ls: ls[0]["annotations"].pop("org.bdserver.mapped-blkaddr")),
        mutate(lambda ls: ls[0]["annotations"].update({"org.bdserver.mapped-blkaddr": "1"})),  # overlaps meta
        mutate(lambda ls: ls[1]["annotations"].update({"org.bdserver.mapped-blkaddr": ls[0]["annotations"]["org.bdserver.mapped-blkaddr"]})),
        mutate(lambda ls: ls[0]["annotations"].update({"org.erofs.role": "overlay-lower"})),
        mutate(lambda ls: ls[0]["annotations"].pop("org.erofs.chunk-index.range")),
        mutate(lambda ls: ls[0]["annotations"].pop("org.erofs.chunk-index.digest")),
        mutate(lambda ls: ls[0]["annotations"].update({"org.bdserver.blocks": "1"})),  # data does not fit
        mutate(lambda ls: ls.reverse()),
        mutate(lambda ls: ls.clear()),
    ]
    for m in bad:
        with pytest.raises(FormatError):
            open_lazy_image(m, lazy.registry.fetch, cache, pools=pools)


def test_from_files(tmp_path) -> None:
    a = tmp_path / "meta.img"
    b = tmp_path / "layer.img"
    a.write_bytes(b"A" * 5000)
    b.write_bytes(b"B" * 8192)
    dev = VirtualDevice.from_files([str(a), (str(b), 4)])
    assert dev.size == 6 * BS
    want = b"A" * 5000 + bytes(3 * BS - 5000) + bytes(BS) + b"B" * 8192
    assert dev.read(0, dev.size) == want[: dev.size]
    assert len(want) == 6 * BS
    assert dev.read(4000, 5000) == want[4000:9000]
    dev.close()
    dev2 = VirtualDevice.from_files([str(a), str(b)])
    assert dev2.size == 4 * BS and dev2.read(2 * BS, 10) == b"B" * 10
    dev2.close()


def test_layout_fetcher_serves_an_oci_blob_store(pools: FetchPools, tmp_path, lazy: LazyImage,
                                                 cache: ChunkCache) -> None:
    root = tmp_path / "blobs"
    (root / "sha256").mkdir(parents=True)
    for d, data in lazy.registry.blobs.items():
        (root / "sha256" / d.split(":")[1]).write_bytes(data)
    dev = open_lazy_image(lazy.manifest, layout_fetcher(str(root)), cache, pools=pools)
    assert dev.read(0, dev.size) == lazy.expected
    with pytest.raises(FetchError):
        layout_fetcher(str(root))(sha(b"nope"), 0, 1)


def test_standalone_chunk_index_layer(pools: FetchPools, cache: ChunkCache) -> None:
    """spec §3.4.3: the index as its own layer right after the layer it indexes."""
    import copy

    lazy = build_lazy_image(seed=5)
    m = copy.deepcopy(lazy.manifest)
    d0 = m["layers"][0]
    blob = lazy.registry.blobs[d0["digest"]]
    start = int(d0["annotations"]["org.erofs.chunk-index.range"].split(":")[0])
    data, payload = blob[:start], blob[start + 8 :]
    dd, pd = sha(data), sha(payload)
    lazy.registry.blobs[dd] = data
    lazy.registry.blobs[pd] = payload
    ann = {k: v for k, v in d0["annotations"].items() if not k.startswith("org.erofs.chunk-index")}
    m["layers"][0] = dict(d0, digest=dd, size=len(data), annotations=ann)
    m["layers"].insert(
        1,
        {"mediaType": "application/vnd.erofs.chunk-index.v1", "digest": pd, "size": len(payload),
         "annotations": {"org.erofs.chunk-index.target": dd}},
    )
    dev = open_lazy_image(m, lazy.registry.fetch, cache, pools=pools)
    assert dev.read(0, dev.size) == lazy.expected
    dev.close()
    bad = copy.deepcopy(m)
    bad["layers"][1]["annotations"]["org.erofs.chunk-index.target"] = sha(b"other")
    with pytest.raises(FormatError):
        open_lazy_image(bad, lazy.registry.fetch, cache, pools=pools)
    lazy.registry.corrupt[pd] = payload[:-1] + bytes([payload[-1] ^ 1])
    cache.drop(pd)
    with pytest.raises(IntegrityError):
        open_lazy_image(m, lazy.registry.fetch, cache, pools=pools)


def test_split_runs_are_fetched_separately_and_both_resolve(pools: FetchPools, lazy: LazyImage,
                                                            cache: ChunkCache) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools)
    digest = lazy.layers[0][0]
    mid = layer_chunk_offset(lazy, 0, 7)
    dev.read(mid, 10)  # chunk 7 cached
    before = len(lazy.registry.calls_for(digest))
    o = layer_chunk_offset(lazy, 0, 6)
    assert dev.read(o, 3 * CS) == lazy.expected[o : o + 3 * CS]  # 6 and 8 missing: two runs
    assert len(lazy.registry.calls_for(digest)) - before == 2
    # one run failing fails the read; the other run's chunk is cached and served later
    o2 = layer_chunk_offset(lazy, 0, 3)
    dev.read(layer_chunk_offset(lazy, 0, 4), 10)
    bad_off = dev.segments[1].source.blob.chunk_span(5)[0]

    def hook(d: str, off: int, n: int) -> None:
        if d == digest and off == bad_off:
            raise ConnectionResetError("one run fails")

    lazy.registry.hook = hook
    with pytest.raises(FetchError):
        dev.read(o2, 3 * CS)  # runs {3} and {5}
    lazy.registry.hook = None
    dev.flush()
    key = dev.segments[1].source.key
    assert cache.has(key, 3) and not cache.has(key, 5)
    assert dev.read(o2, 3 * CS) == lazy.expected[o2 : o2 + 3 * CS]


def test_write_behind_miss_does_not_wait_for_the_cache_write(pools: FetchPools, lazy: LazyImage, cache: ChunkCache,
                                                             monkeypatch) -> None:
    dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, cache, pools=pools, write_behind=True)
    digest = lazy.layers[0][0]
    entered, release = threading.Event(), threading.Event()
    real = cache.put_many

    def slow_put(*a, **kw):
        entered.set()
        release.wait(WAIT)
        return real(*a, **kw)

    monkeypatch.setattr(cache, "put_many", slow_put)
    off = layer_chunk_offset(lazy, 0, 4)
    assert dev.read(off, 2 * CS) == lazy.expected[off : off + 2 * CS]  # returns while the write is parked
    assert entered.wait(WAIT)
    n = len(lazy.registry.calls_for(digest))
    assert dev.read(off + 10, CS) == lazy.expected[off + 10 : off + 10 + CS]  # served from memory
    assert len(lazy.registry.calls_for(digest)) == n
    key = dev.segments[1].source.key
    assert not cache.has(key, 4)
    release.set()
    dev.flush()
    assert cache.has(key, 4) and cache.has(key, 5)
    dev.close()


def test_merged_meta_may_be_zstd(pools: FetchPools, cache: ChunkCache) -> None:
    import copy
    import io

    from bdserver.blob.chunked import write_chunked_zstd

    lazy = build_lazy_image(seed=6)
    m = copy.deepcopy(lazy.manifest)
    out = io.BytesIO()
    info = write_chunked_zstd(io.BytesIO(lazy.meta), out, chunk_size=4096)
    lazy.registry.blobs[info.digest] = out.getvalue()
    m["layers"][-1] = {
        "mediaType": "application/vnd.erofs+zstd",
        "digest": info.digest,
        "size": info.size,
        "annotations": {"org.bdserver.role": "merged-meta", "org.erofs.uncompressed-digest": info.uncompressed_digest},
    }
    dev = open_lazy_image(m, lazy.registry.fetch, cache, pools=pools)
    assert dev.read(0, dev.size) == lazy.expected
    dev.close()
    m["layers"][-1]["annotations"]["org.erofs.uncompressed-digest"] = sha(b"something else")
    cache.drop(info.digest)
    with pytest.raises(IntegrityError):
        open_lazy_image(m, lazy.registry.fetch, cache, pools=pools)


def test_by_default_a_chunk_is_durable_before_it_is_returned(pools: FetchPools, lazy: LazyImage, tmp_path) -> None:
    """A crash right after a read (no flush, no close) must find the chunk in the cache."""
    root = str(tmp_path / "c")
    with ChunkCache(root) as c:
        dev = open_lazy_image(lazy.manifest, lazy.registry.fetch, c, pools=pools)
        off = layer_chunk_offset(lazy, 0, 2)
        dev.read(off, 10)
        with ChunkCache(root) as other:  # another process's view, before any flush or close
            assert other.has(dev.segments[1].source.key, 2)
