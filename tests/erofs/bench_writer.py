"""Writer throughput against mkfs.erofs on the same directory tree.

    .venv/bin/python -m tests.erofs.bench_writer SRC_DIR [--workdir DIR]

The tree is first spooled into one file (as convert/ does from a tar stream; not timed). Then
`write_image` is timed, and `mkfs.erofs -Enoinline_data` (same data layout: no tail packing) on
SRC_DIR, each after a warm-up run so that both read from the page cache; best of 3. Prints
wall-clock MB/s of regular-file bytes, CPU seconds (less sensitive to a busy machine) and the
ratios. Use --workdir /dev/shm to keep disk writeback out of the numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bdserver.erofs.writer import write_image
from tests.erofs.helpers import tree_from_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="erofs-bench-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        root, total = tree_from_dir(args.src, work / "spool")
        print(f"spooled {total / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")

        def ours() -> tuple[float, float]:
            (work / "ours.img").unlink(missing_ok=True)
            c, t = time.process_time(), time.perf_counter()
            with open(work / "ours.img", "wb") as out:
                write_image(root, out)
            return time.perf_counter() - t, time.process_time() - c

        def mkfs() -> tuple[float, float]:
            (work / "mkfs.img").unlink(missing_ok=True)
            c0, t = os.times(), time.perf_counter()
            subprocess.run(["mkfs.erofs", "--quiet", "-Enoinline_data", str(work / "mkfs.img"), str(args.src)],
                           check=True)  # fmt: skip
            c1 = os.times()
            cpu = c1.children_user + c1.children_system - c0.children_user - c0.children_system
            return time.perf_counter() - t, cpu

        ours()
        mkfs()
        w_o, c_o = min(ours() for _ in range(3))
        w_m, c_m = min(mkfs() for _ in range(3))
        sz_o, sz_m = (work / "ours.img").stat().st_size, (work / "mkfs.img").stat().st_size
        mb = total / 1e6
        print(f"bdserver write_image:       wall {w_o:.2f}s ({mb / w_o:.0f} MB/s)  cpu {c_o:.2f}s  image {sz_o / 1e6:.1f} MB")
        print(f"mkfs.erofs -Enoinline_data: wall {w_m:.2f}s ({mb / w_m:.0f} MB/s)  cpu {c_m:.2f}s  image {sz_m / 1e6:.1f} MB")
        print(f"throughput ratio (ours / mkfs): wall {w_m / w_o:.2f}x  cpu {c_m / c_o:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
