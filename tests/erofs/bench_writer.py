"""Writer throughput against mkfs.erofs on the same directory tree.

    .venv/bin/python -m tests.erofs.bench_writer SRC_DIR [--workdir DIR]

The tree is first spooled into one file (as convert/ does from a tar stream; not timed). Then
`write_image` is timed, and `mkfs.erofs -Enoinline_data` (same data layout: no tail packing) on
SRC_DIR, each after a warm-up run so that both read from the page cache. Prints MB/s of
regular-file bytes and the ratio.
"""

from __future__ import annotations

import argparse
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

        def ours() -> float:
            (work / "ours.img").unlink(missing_ok=True)
            t = time.perf_counter()
            with open(work / "ours.img", "wb") as out:
                write_image(root, out)
            return time.perf_counter() - t

        def mkfs() -> float:
            (work / "mkfs.img").unlink(missing_ok=True)
            t = time.perf_counter()
            subprocess.run(["mkfs.erofs", "--quiet", "-Enoinline_data", str(work / "mkfs.img"), str(args.src)],
                           check=True)  # fmt: skip
            return time.perf_counter() - t

        ours()
        mkfs()
        t_ours = min(ours() for _ in range(2))
        t_mkfs = min(mkfs() for _ in range(2))
        sz_o, sz_m = (work / "ours.img").stat().st_size, (work / "mkfs.img").stat().st_size
        print(f"bdserver write_image: {t_ours:.2f}s  {total / 1e6 / t_ours:.0f} MB/s  image {sz_o / 1e6:.1f} MB")
        print(f"mkfs.erofs -Enoinline_data: {t_mkfs:.2f}s  {total / 1e6 / t_mkfs:.0f} MB/s  image {sz_m / 1e6:.1f} MB")
        print(f"throughput ratio (ours / mkfs): {t_mkfs / t_ours:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
