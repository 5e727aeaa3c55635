"""Conversion throughput and memory, side by side with the C tools on this machine.

1. The debootstrap rootfs as one tar: bdserver `convert_layer` (tar -> EROFS layer image)
   against `tar -x` + `mkfs.erofs -Enoinline_data` (erofs-utils, the same job in C), MB/s of
   tar input, as a ratio (target >= 0.5x).
2. A generated 2 GiB layer (large files of deterministic pseudo-random bytes): throughput and
   the peak RSS of the converting child process (`wait4` rusage), to show memory stays bounded.
3. lz4 inside EROFS (`convert --compress lz4`: the kernel decompresses; blobs zstd-framed as
   always) against today's uncompressed EROFS in zstd-framed blobs, on the read benchmark's images (bench/read.py: the
   demo image, and the same with a data layer): conversion time (interleaved runs), blob bytes,
   node cache bytes (what the chunk cache holds once the whole device was read, so how many
   images a cache of `cache_max_bytes` holds), and reads of every file through the kernel from a
   local copy of each device (page cache dropped; lz4 costs the kernel CPU, zstd was paid when the
   chunk was fetched). Cold start over a WAN-like link: ``bench/read.py --compress lz4``.

Run: ``.venv/bin/python bench/convert.py [--big-gib 2] [--runs 3] [--compression-only]``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.rootfs import debootstrap_rootfs  # noqa: E402
from tests.fixtures.tarwriter import header  # noqa: E402

PY = sys.executable
CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from bdserver.convert.layer import convert_layer
t = time.perf_counter()
with open(sys.argv[1], "rb") as f, open(sys.argv[2], "wb") as o:
    r = convert_layer(f, o, tmpdir=sys.argv[3])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(time.perf_counter() - t, r.size, hwm)
"""


def run_child(args: list[str]) -> tuple[float, int, str]:
    """Run a process; return (wall seconds, peak RSS in KiB of that process, stdout)."""
    t = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read().decode() if p.stdout else ""
    err = p.stderr.read().decode() if p.stderr else ""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {err}")
    return time.perf_counter() - t, ru.ru_maxrss, out


def ours(tar: Path, work: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS KiB). The peak is the child's own VmHWM: wait4's ru_maxrss would
    also do, but Linux carries a parent's high-water mark across fork+exec, so the smaller
    of the two is the honest figure for the converting process."""
    _, rss, out = run_child([PY, "-c", CHILD.format(repo=str(REPO)), str(tar), str(work / "ours.erofs"), str(work)])
    # the conversion's own wall time, measured in the child (interpreter start-up excluded)
    return float(out.split()[0]), min(rss, int(out.split()[2]))


def c_tools(tar: Path, work: Path) -> tuple[float, float]:
    """tar -x (decompressing by suffix: -z / --zstd) then mkfs.erofs; (secs tar, secs mkfs)."""
    d = work / "x"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    t0 = time.perf_counter()
    comp = {".gz": ["-z"], ".zst": ["--zstd"]}.get(tar.suffix, [])
    subprocess.run(["tar", "-x", *comp, "--xattrs", "--xattrs-include=*", "--numeric-owner", "-f", str(tar),
                    "-C", str(d)], check=True)
    t1 = time.perf_counter()
    subprocess.run(["mkfs.erofs", "--quiet", "-Enoinline_data", "-T0", str(work / "c.erofs"), str(d)], check=True,
                   stdout=subprocess.DEVNULL)
    t2 = time.perf_counter()
    shutil.rmtree(d)
    return t1 - t0, t2 - t1


def make_big_tar(path: Path, gib: int) -> None:
    """``gib`` GiB in 256 MiB files of seeded pseudo-random bytes (streamed, never in memory)."""
    per = 256 << 20
    rnd = random.Random(42)
    with open(path, "wb") as f:
        f.write(header(b"big/", b"5", mode=0o755))
        for i in range(gib * 4):
            f.write(header(b"big/file%03d" % i, b"0", size=per))
            for _ in range(per // (16 << 20)):
                f.write(rnd.randbytes(16 << 20))
        f.write(b"\0" * 1024)


def mbps(n: int, s: float) -> float:
    return n / s / 1e6


def _convert(layout: Path, out: Path, compress: str) -> tuple[float, "object"]:
    from bdserver.convert.image import convert_image
    from bdserver.oci.layout import OCILayout

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    res = convert_image(OCILayout(layout, create=False), "latest", OCILayout(out), "lazy", compress=compress,
                        tmpdir=str(out.parent))
    return time.perf_counter() - t, res


def _device(out: Path, res: "object", flat: Path) -> tuple[int, int]:
    """Assemble the device from the lazy image's blobs; (blob bytes, cache bytes = image data of
    every blob, which the chunk cache holds once all was read)."""
    import io

    import zstandard

    from bdserver.oci.layout import OCILayout

    lay = OCILayout(out, create=False)
    blob_bytes = cache_bytes = 0
    with open(flat, "wb") as f:
        for d in res.layers:  # type: ignore[attr-defined]
            raw = lay.blob_path(d.digest).read_bytes()
            blob_bytes += len(raw)
            if d.media_type.endswith("+zstd"):
                with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True) as r:
                    data = r.read()
            else:
                rng = d.annotations.get("org.erofs.chunk-index.range")
                data = raw[: int(rng.split(":")[0])] if rng else raw
            cache_bytes += len(data)
            start = int(d.annotations.get("org.bdserver.mapped-blkaddr", "0"))
            f.seek(start * 4096)
            f.write(data)
    return blob_bytes, cache_bytes


def _read_all(flat: Path, mnt: Path) -> tuple[float, int]:
    """Mount (file-backed), drop the page cache, read every regular file: (seconds, bytes)."""
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "erofs", "-o", "ro", str(flat), str(mnt)], check=True)
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        n = 0
        t = time.perf_counter()
        for dirpath, _, files in os.walk(mnt):
            for name in files:
                p = os.path.join(dirpath, name)
                if os.path.isfile(p) and not os.path.islink(p):
                    with open(p, "rb") as fh:
                        while b := fh.read(1 << 20):
                            n += len(b)
        return time.perf_counter() - t, n
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def compression_compare(work: Path, runs: int) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from read import bench_image  # the read benchmark's images  # noqa: E402

    cap = 20 << 30  # the default cache_max_bytes
    print("\nlz4 inside EROFS (convert --compress lz4) vs uncompressed EROFS (today), both in zstd-framed blobs")
    hdr = (f"{'image':8} {'variant':5} {'convert s':>9} {'blob MB':>8} {'cache MB':>8} {'images/20GiB':>12} "
           f"{'read s':>7} {'read MB/s':>9}")
    print(hdr)
    print("-" * len(hdr))
    for kind in ("sample", "big"):
        layout = bench_image(kind)
        rows = {}
        times: dict[str, list[float]] = {"none": [], "lz4": []}
        reads: dict[str, list[float]] = {"none": [], "lz4": []}
        for _ in range(runs):  # interleaved: both variants see the same background load
            for comp in ("none", "lz4"):
                sec, res = _convert(layout, work / f"conv-{comp}", comp)
                times[comp].append(sec)
                flat = work / f"flat-{comp}.img"
                blob, cache = _device(work / f"conv-{comp}", res, flat)
                rs, nbytes = _read_all(flat, work / "mnt")
                reads[comp].append(rs)
                rows[comp] = (blob, cache, nbytes)
        for comp in ("none", "lz4"):
            blob, cache, nbytes = rows[comp]
            tmin, rmin = min(times[comp]), min(reads[comp])
            print(f"{kind:8} {comp:5} {tmin:9.2f} {blob / 1e6:8.1f} {cache / 1e6:8.1f} "
                  f"{cap // cache:12d} {rmin:7.2f} {nbytes / rmin / 1e6:9.1f}")
        (zb, zc, _), (lb, lc, _) = rows["none"], rows["lz4"]
        print(f"{kind:8} lz4/none: convert {min(times['lz4']) / min(times['none']):.2f}x, blob {lb / zb:.2f}x, "
              f"cache {lc / zc:.2f}x ({zc / lc:.2f}x the images per cache), read all files "
              f"{min(reads['lz4']) / min(reads['none']):.2f}x the time")
    print(f"best of {runs} interleaved runs; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          "read = every file through the kernel from a local copy of the device, page cache dropped")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-gib", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/var/tmp"))
    ap.add_argument("--compression-only", action="store_true", help="only section 3 (lz4 vs zstd)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bdserver-bench-convert-", dir=a.workdir))
    try:
        if a.compression_only:
            compression_compare(work, a.runs)
            return
        root = debootstrap_rootfs()
        tar = work / "rootfs.tar"
        subprocess.run(["tar", "--format=posix", "--xattrs", "--numeric-owner", "--sort=name", "-cf", str(tar),
                        "-C", str(root), "."], check=True)
        size = tar.stat().st_size
        rows = []
        gz = work / "rootfs.tar.gz"
        with open(gz, "wb") as f:
            subprocess.run(["gzip", "-n", "-6", "-c", str(tar)], stdout=f, check=True)
        for src, name in ((tar, "debootstrap rootfs tar"), (gz, "debootstrap rootfs tar.gz")):
            o, c = [], []
            for _ in range(a.runs):  # interleaved, so both see the same background load
                o.append(ours(src, work))
                c.append(c_tools(src, work))
            best = min(o, key=lambda x: x[0])
            bc = min(c, key=sum)
            if src is tar:
                xs, mk = bc
            rows.append((name, size, best[0], sum(bc), best[1]))

        big = work / "big.tar"
        make_big_tar(big, a.big_gib)
        bsize = big.stat().st_size
        bsecs, brss = ours(big, work)
        (work / "ours.erofs").unlink()
        bx, bm = c_tools(big, work)
        rows.append((f"{a.big_gib} GiB layer, tar", bsize, bsecs, bx + bm, brss))
        bz = work / "big.tar.zst"
        subprocess.run(["zstd", "-q", "-1", "-T0", "-o", str(bz), str(big)], check=True)
        big.unlink()
        zsecs, zrss = ours(bz, work)
        (work / "ours.erofs").unlink()
        zx, zm = c_tools(bz, work)
        rows.append((f"{a.big_gib} GiB layer, tar+zstd", bsize, zsecs, zx + zm, zrss))

        print(f"\nbdserver convert benchmark ({os.uname().release}, {os.cpu_count()} CPUs, best of {a.runs} interleaved runs "
              "for the rootfs; bdserver time measured inside the converting process)")
        print(f"C baseline = tar -x + mkfs.erofs -Enoinline_data (erofs-utils "
              f"{subprocess.run(['mkfs.erofs', '-V'], capture_output=True, text=True).stdout.split()[-1]})\n")
        hdr = (f"{'input':28} {'tar MB':>9} {'bdserver s':>11} {'MB/s':>8} {'C tools s':>10} {'MB/s':>8} "
               f"{'ratio':>7} {'peak RSS':>9}")
        print(hdr)
        print("-" * len(hdr))
        for name, n, so, sc, rss in rows:
            r = f"{rss / 1024:7.1f}MiB" if rss else ""
            print(f"{name:28} {n / 1e6:9.1f} {so:11.2f} {mbps(n, so):8.1f} {sc:10.2f} {mbps(n, sc):8.1f} "
                  f"{sc / so:6.2f}x {r:>9}")
        print(f"\n(rootfs C best split: tar -x {xs:.2f} s + mkfs.erofs {mk:.2f} s)")
        print(f"peak RSS converting the {bsize / 2**30:.2f} GiB layer: {brss / 1024:.1f} MiB as a plain tar (described in "
              f"place), {zrss / 1024:.1f} MiB as tar+zstd (spooled to a temp file); child process: min(wait4 ru_maxrss, VmHWM)")
        print("MB/s are of uncompressed tar input; bdserver also computes the diff_id (sha256), the C tools do not")
        print("target: ratio >= 0.50x; RSS independent of layer size")
        compression_compare(work, a.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
