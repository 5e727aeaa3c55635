#!/usr/bin/env python3
"""The read path's own cost (vdev + chunk cache), side by side with pread of the same bytes.

Builds a synthetic layer (mixed random / zero / text blocks), writes it as a chunked zstd blob and
serves it through a local fetch function (no network, no kernel: this measures bdserver's code).
Warm rows (every chunk in the cache) run against the baseline `os.pread` of the same uncompressed
image from a local file, in the same run, and print the ratio: sequential reads of several sizes,
and random 4 KiB reads from several threads. Cold rows (fetch + verify + decompress + durable cache
write, then against a "registry" that sleeps one round trip per request) are absolute figures.

Run: ``.venv/bin/python bench/readpath.py [--mib 256] [--dir /tmp] [--rtt-ms 20] [--threads 16] [--runs 3]``
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bdserver.blob.chunked import annotations, write_chunked_zstd  # noqa: E402
from bdserver.cache import ChunkCache  # noqa: E402
from bdserver.digest import sha256_digest  # noqa: E402
from bdserver.vdev import FetchPools, layout_fetcher, open_lazy_image  # noqa: E402

BASE = 4096  # the layer sits after one block of metadata


def _image(path: str, mib: int) -> None:
    rnd = random.Random(0)
    with open(path, "wb") as f:
        for _ in range(mib * 256):
            k = rnd.randrange(4)
            f.write(rnd.randbytes(4096) if k == 0 else bytes(4096) if k == 1
                    else ((b"text %d " % rnd.randrange(1000)) * 512)[:4096])


def _lazy_image(d: str, img: str) -> tuple[dict, str, int]:
    """The manifest of a one-layer lazy image over `img`, its blob store, the layer size."""
    blobs = os.path.join(d, "blobs")
    os.makedirs(os.path.join(blobs, "sha256"))
    with open(img, "rb") as src:
        out = io.BytesIO()
        info = write_chunked_zstd(src, out)
    with open(os.path.join(blobs, "sha256", info.digest.split(":")[1]), "wb") as f:
        f.write(out.getvalue())
    meta = b"\0" * 4096
    md = sha256_digest(meta)
    with open(os.path.join(blobs, "sha256", md.split(":")[1]), "wb") as f:
        f.write(meta)
    ann = dict(annotations(info), **{"org.erofs.role": "device", "org.bdserver.mapped-blkaddr": "1"})
    manifest = {"layers": [
        {"mediaType": info.media_type, "digest": info.digest, "size": info.size, "annotations": ann},
        {"mediaType": "application/vnd.erofs", "digest": md, "size": len(meta), "annotations": {}},
    ]}
    print(f"image {info.uncompressed_size >> 20} MiB -> blob {info.size >> 20} MiB, {info.chunk_count} chunks")
    return manifest, blobs, info.uncompressed_size


def _seq(read: Callable[[int, int], bytes], size: int, req: int) -> float:
    t0 = time.perf_counter()
    for off in range(0, size - req + 1, req):
        read(off, req)
    return size / (time.perf_counter() - t0) / 1e6


def _random(read: Callable[[int, int], bytes], size: int, nthreads: int, per: int) -> float:
    def reader(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(per):
            read(r.randrange(size // 4096) * 4096, 4096)

    ths = [threading.Thread(target=reader, args=(s,)) for s in range(nthreads)]
    t0 = time.perf_counter()
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return nthreads * per / (time.perf_counter() - t0)


def _side_by_side(measure: Callable[[Callable[[int, int], bytes]], float], ours: Callable[[int, int], bytes],
                  baseline: Callable[[int, int], bytes], runs: int) -> tuple[float, float]:
    """Medians of `runs` alternating measurements of both sides (load on the machine hits both)."""
    a, b = [], []
    for _ in range(runs):
        a.append(measure(ours))
        b.append(measure(baseline))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="simulated registry round trip per range request")
    ap.add_argument("--threads", type=int, default=16, help="concurrent readers in the cold random test")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per warm row (median)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d, FetchPools() as pools:
        img = os.path.join(d, "image")
        _image(img, args.mib)
        manifest, blobs, size = _lazy_image(d, img)
        fd = os.open(img, os.O_RDONLY)

        def baseline(off: int, n: int) -> bytes:
            return os.pread(fd, n, off)

        with ChunkCache(os.path.join(d, "cache"), cap_bytes=4 * size) as cache:
            dev = open_lazy_image(manifest, layout_fetcher(blobs), cache, pools=pools)

            def ours(off: int, n: int) -> bytes:
                return dev.read(BASE + off, n)

            print(f"cold sequential 1 MiB reads: {_seq(ours, size, 1 << 20):.0f} MB/s "
                  "(local fetch, verify, decompress, durable cache write)")
            print(f"{'warm (median of ' + str(args.runs) + ' alternating runs)':<34} {'bdserver':>12} {'pread':>12} "
                  f"{'ratio':>7}")
            for req in (1 << 20, 128 << 10, 4096):
                a, b = _side_by_side(lambda f: _seq(f, size, req), ours, baseline, args.runs)
                print(f"sequential {req >> 10:>5} KiB reads {'':<10} {a:>9.0f} MB/s {b:>7.0f} MB/s {a / b:>6.2f}x")
            nthreads, per = 4, 20000
            a, b = _side_by_side(lambda f: _random(f, size, nthreads, per), ours, baseline, args.runs)
            print(f"random 4 KiB reads, {nthreads} threads {'':<6} {a:>9.0f} IOPS {b:>7.0f} IOPS {a / b:>6.2f}x")
            dev.close()
        os.close(fd)

        local = layout_fetcher(blobs)

        def slow_fetch(digest: str, off: int, n: int) -> bytes:
            time.sleep(args.rtt_ms / 1000)
            return local(digest, off, n)

        with ChunkCache(os.path.join(d, "cache2"), cap_bytes=4 * size) as cache2:
            dev2 = open_lazy_image(manifest, slow_fetch, cache2, pools=pools)
            per2 = 40
            rate = _random(lambda off, n: dev2.read(BASE + off, n), size, args.threads, per2)
            s = dev2.stats()
            print(f"cold random 4 KiB reads, {args.threads} threads, RTT {args.rtt_ms:g} ms: {rate:.0f} reads/s, "
                  f"{s['fetches']} fetches, {s['joined']} joined in flight, read p50 {s['latency_ms']['p50']:.1f} ms "
                  f"p99 {s['latency_ms']['p99']:.1f} ms")
            dev2.close()


if __name__ == "__main__":
    main()
