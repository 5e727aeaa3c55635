#!/usr/bin/env python3
"""Warm read throughput of the TCMU disk against a loop device on the same image (lab only).

Run inside the lab:  vagrant/lab -- .venv/bin/python bench/read_tcmu.py [--size-mib 64] [--json OUT]

Both devices serve the same image file from the guest's page cache (tmpfs), so "warm" means no
registry or cache-miss cost: what is measured is the block path (loop driver vs. SCSI + TCMU ring +
our Python handler). Reads use O_DIRECT so neither side is served by the block device's page cache.
The random-read driver is Python on both sides (same overhead), run at queue depth 1 and 8 (threads).
Prints a table with the ratio tcmu/loop (target: >= 0.5). Under qemu TCG (no KVM) absolute figures
are far below real hardware; the ratio is the figure of merit.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bdserver.backends.tcmu import TcmuBackend  # noqa: E402

BS = 4096
REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys
from bdserver.backends.tcmu import TcmuBackend
from bdserver.vdev.device import VirtualDevice
b = TcmuBackend()
att = b.attach(VirtualDevice.from_files([sys.argv[1]]), "bench")
print(att.path, flush=True)
sys.stdin.read()
print(b.stats("bench"), file=sys.stderr)
b.detach(att)
"""


def seq_read(dev: str, total: int, chunk: int = 1 << 20) -> float:
    """Bytes per second for one O_DIRECT sequential pass of ``total`` bytes."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)
    try:
        t0 = time.perf_counter()
        off = 0
        while off < total:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            off += n
        return off / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        buf.close()


def rand_read(dev: str, size: int, ops: int, depth: int, seed: int = 1) -> float:
    """4 KiB O_DIRECT random reads per second with ``depth`` threads in flight."""
    nblocks = size // BS
    per = ops // depth

    def worker(k: int) -> None:
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, BS)
        rng = random.Random(seed * 100 + k)
        try:
            for _ in range(per):
                os.preadv(fd, [buf], rng.randrange(nblocks) * BS)
        finally:
            os.close(fd)
            buf.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(depth)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return per * depth / (time.perf_counter() - t0)


def measure(dev: str, size: int, rand_ops: int) -> dict[str, float]:
    seq_read(dev, min(size, 8 << 20))  # warm-up: thread pools, TLBs, first-touch of data pages
    return {
        "seq_MiBps": seq_read(dev, size) / (1 << 20),
        "rand4k_qd1_iops": rand_read(dev, size, rand_ops // 2, 1),
        "rand4k_qd8_iops": rand_read(dev, size, rand_ops, 8),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--rand-ops", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    backend = TcmuBackend()
    ok, why = backend.available()
    if not ok:
        print(f"bench/read_tcmu.py: TCMU unavailable ({why}); run it inside vagrant/lab", file=sys.stderr)
        return 2
    size = args.size_mib << 20
    runs: dict[str, list[dict[str, float]]] = {"loop": [], "tcmu": []}
    with tempfile.TemporaryDirectory(prefix="bdbench-") as tmp:
        image = Path(tmp) / "image.bin"
        with open(image, "wb") as f:  # incompressible, block-aligned; lives in tmpfs (warm)
            rng = random.Random(7)
            for _ in range(size // (1 << 20)):
                f.write(rng.randbytes(1 << 20))
        loop = subprocess.run(["losetup", "--find", "--show", "--read-only", str(image)], check=True,
                              capture_output=True, text=True).stdout.strip()
        # The handler runs in its own process, as in the daemon: the benchmark's reader threads
        # must not compete with it for the GIL.
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(image)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=str(REPO))
        try:
            path = holder.stdout.readline().strip()
            if not path:
                raise SystemExit("the TCMU handler process failed to attach")
            # Interleaved rounds, best of each: the emulated machine is noisy (host load).
            for _ in range(args.rounds):
                runs["loop"].append(measure(loop, size, args.rand_ops))
                runs["tcmu"].append(measure(path, size, args.rand_ops))
        finally:
            holder.stdin.close()  # the holder detaches and exits
            holder.wait(300)
            subprocess.run(["losetup", "-d", loop], check=False)
    results = {dev: {k: max(r[k] for r in rs) for k in rs[0]} for dev, rs in runs.items()}

    rows = [("sequential 1 MiB, MiB/s", "seq_MiBps"), ("random 4 KiB QD1, IOPS", "rand4k_qd1_iops"),
            ("random 4 KiB QD8, IOPS", "rand4k_qd8_iops")]
    print(f"{'warm read, best of ' + str(args.rounds):<28} {'loop':>10} {'tcmu':>10} {'tcmu/loop':>10}")
    ratios = {}
    for label, key in rows:
        lo, tc = results["loop"][key], results["tcmu"][key]
        ratios[key] = tc / lo if lo else 0.0
        print(f"{label:<28} {lo:>10.1f} {tc:>10.1f} {ratios[key]:>9.2f}x")
    print("target: tcmu/loop >= 0.50x" + ("" if min(ratios.values()) >= 0.5 else "  (not met on every row)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"best": results, "ratios": ratios, "runs": runs,
                                               "size_mib": args.size_mib}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
