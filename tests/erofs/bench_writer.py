"""Writer throughput against mkfs.erofs on the same directory tree.

    .venv/bin/python -m tests.erofs.bench_writer SRC_DIR [--workdir DIR]

The tree is first spooled into one file (as convert/ does from a tar stream; not timed). Then
`write_image` is timed, and `mkfs.erofs -Enoinline_data` (same data layout: no tail packing) on
SRC_DIR, each after a warm-up run so that both read from the page cache. Prints MB/s of
regular-file bytes and the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from bdserver.erofs.tree import Inode, SpooledData
from bdserver.erofs.writer import write_image


def tree_from_dir(top: Path, spool_path: Path) -> tuple[Inode, int]:
    """Build a tree of `top`, copying file bytes into one spool file. Returns (tree, bytes)."""
    spool = open(spool_path, "w+b")
    by_ino: dict[tuple[int, int], Inode] = {}
    total = 0

    def node_for(path: str, st: os.stat_result) -> Inode:
        nonlocal total
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in by_ino:
            return by_ino[key]
        xattrs = {}
        for k in os.listxattr(path, follow_symlinks=False):
            if k.startswith(("user.", "trusted.", "security.", "system.posix_acl")):
                xattrs[k] = os.getxattr(path, k, follow_symlinks=False)
        n = Inode(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime=st.st_mtime_ns // 10**9,
                  mtime_nsec=st.st_mtime_ns % 10**9, xattrs=xattrs, rdev=st.st_rdev)  # fmt: skip
        if stat.S_ISDIR(st.st_mode):
            n.children = {}
        elif stat.S_ISLNK(st.st_mode):
            n.symlink = os.fsencode(os.readlink(path))
        elif stat.S_ISREG(st.st_mode) and st.st_size:
            off = spool.seek(0, os.SEEK_END)
            with open(path, "rb") as f:
                shutil.copyfileobj(f, spool, 1 << 20)
            size = spool.tell() - off
            n.data = SpooledData.dense(spool, off, size)
            total += size
        by_ino[key] = n
        return n

    root = node_for(str(top), os.lstat(top))
    stack = [(str(top), root)]
    while stack:
        d, node = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                child = node_for(e.path, st)
                node.children[os.fsencode(e.name)] = child  # type: ignore[index]
                if stat.S_ISDIR(st.st_mode):
                    stack.append((e.path, child))
    spool.flush()
    return root, total


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
