"""Read-path micro benchmark: `python -m bdserver.vdev.bench [--mib 256] [--dir /tmp]`.

Builds a synthetic layer (mixed random / zero / text blocks), writes it as a chunked zstd blob,
serves it through a local fetch function (no network: this measures OUR overhead) and reports
cold (fetch + verify + decompress + cache write) and warm (cache hit) sequential throughput for
several request sizes, and warm 4 KiB random reads across threads.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import threading
import time

from bdserver.digest import sha256_digest
from bdserver.blob.chunked import annotations, write_chunked_zstd
from bdserver.cache import ChunkCache
from bdserver.vdev.lazyimage import layout_fetcher, open_lazy_image
from bdserver.vdev.pools import FetchPools


def _image(path: str, mib: int) -> None:
    rnd = random.Random(0)
    with open(path, "wb") as f:
        for _ in range(mib * 256):
            k = rnd.randrange(4)
            f.write(rnd.randbytes(4096) if k == 0 else bytes(4096) if k == 1 else ((b"text %d " % rnd.randrange(1000)) * 512)[:4096])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="simulated registry round trip per range request")
    ap.add_argument("--threads", type=int, default=16, help="concurrent readers in the cold random test")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        img = os.path.join(d, "image")
        _image(img, args.mib)
        blobs = os.path.join(d, "blobs")
        os.makedirs(os.path.join(blobs, "sha256"))
        t = time.perf_counter()
        with open(img, "rb") as src:
            out = io.BytesIO()
            info = write_chunked_zstd(src, out)
        wt = time.perf_counter() - t
        with open(os.path.join(blobs, "sha256", info.digest.split(":")[1]), "wb") as f:
            f.write(out.getvalue())
        meta = b"\0" * 4096
        md = sha256_digest(meta)
        with open(os.path.join(blobs, "sha256", md.split(":")[1]), "wb") as f:
            f.write(meta)
        ann = dict(annotations(info), **{"org.erofs.role": "device", "org.bdserver.mapped-blkaddr": "1"})
        manifest = {
            "layers": [
                {"mediaType": info.media_type, "digest": info.digest, "size": info.size, "annotations": ann},
                {"mediaType": "application/vnd.erofs", "digest": md, "size": len(meta), "annotations": {}},
            ]
        }
        size = info.uncompressed_size
        print(f"image {size >> 20} MiB -> blob {info.size >> 20} MiB, {info.chunk_count} chunks; "
              f"write_chunked_zstd {size / wt / 1e6:.0f} MB/s")
        cache = ChunkCache(os.path.join(d, "cache"), cap_bytes=4 * size)
        pools = FetchPools()
        dev = open_lazy_image(manifest, layout_fetcher(blobs), cache, pools=pools)
        base = 4096

        def seq(req: int) -> float:
            t0 = time.perf_counter()
            for off in range(0, size - req + 1, req):
                dev.read(base + off, req)
            return size / (time.perf_counter() - t0) / 1e6

        print(f"cold sequential 1 MiB reads: {seq(1 << 20):.0f} MB/s (local fetch, verify, decompress, cache)")
        for req in (1 << 20, 128 << 10, 4096):
            print(f"warm sequential {req >> 10:>5} KiB reads: {seq(req):.0f} MB/s")
        nthreads, per = 4, 20000
        def rnd_reader(seed: int) -> None:
            r = random.Random(seed)
            for _ in range(per):
                dev.read(base + r.randrange(size // 4096) * 4096, 4096)
        ths = [threading.Thread(target=rnd_reader, args=(s,)) for s in range(nthreads)]
        t0 = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        el = time.perf_counter() - t0
        print(f"warm random 4 KiB reads, {nthreads} threads: {nthreads * per / el:.0f} IOPS "
              f"({nthreads * per * 4096 / el / 1e6:.0f} MB/s)")
        s = dev.stats()
        print(f"latency p50 {s['latency_ms']['p50']:.3f} ms, p90 {s['latency_ms']['p90']:.3f} ms, "
              f"p99 {s['latency_ms']['p99']:.3f} ms; fetches {s['fetches']}, fetched {s['fetched_bytes'] >> 20} MiB")
        dev.close()
        cache.close()

        # Cold random reads against a slow "registry": misses overlap, hits never wait for them.
        local = layout_fetcher(blobs)

        def slow_fetch(digest: str, off: int, n: int) -> bytes:
            time.sleep(args.rtt_ms / 1000)
            return local(digest, off, n)

        cache2 = ChunkCache(os.path.join(d, "cache2"), cap_bytes=4 * size)
        dev2 = open_lazy_image(manifest, slow_fetch, cache2, pools=pools)
        per2 = 40
        def cold_reader(seed: int) -> None:
            r = random.Random(seed)
            for _ in range(per2):
                dev2.read(base + r.randrange(size // 4096) * 4096, 4096)
        ths = [threading.Thread(target=cold_reader, args=(s,)) for s in range(args.threads)]
        t0 = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        el = time.perf_counter() - t0
        s2 = dev2.stats()
        print(f"cold random 4 KiB reads, {args.threads} threads, RTT {args.rtt_ms:g} ms: "
              f"{args.threads * per2 / el:.0f} reads/s, {s2['fetches']} fetches, {s2['joined']} joined in flight, "
              f"read p50 {s2['latency_ms']['p50']:.1f} ms p99 {s2['latency_ms']['p99']:.1f} ms")
        dev2.close()
        cache2.close()
        pools.close()


if __name__ == "__main__":
    main()
