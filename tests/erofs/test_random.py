"""Random trees (fixed seeds): many combinations of inode sizes, xattr bodies, inline tails
and directory sizes, so that layout corner cases (tails near block ends, extended inodes
straddling blocks, padding) are hit. Checked by fsck.erofs, our reader and the kernel."""

from __future__ import annotations

import os
import random
import shutil
import stat
from pathlib import Path

import pytest

from bdserver.erofs.reader import ErofsImage
from bdserver.erofs.tree import Inode
from bdserver.erofs.writer import DeviceSlot, plan_image, write_image
from tests.erofs.helpers import Spool, assert_mount_matches, assert_reader_matches, fsck, mounted, reg, symlink


def random_tree(rng: random.Random, spool: Spool, n: int) -> Inode:
    build_time = 1_000_000
    root = Inode.directory(mtime=build_time)
    dirs = [root]
    leaves: list[Inode] = []
    for i in range(n):
        parent = rng.choice(dirs)
        assert parent.children is not None
        name = bytes(rng.choice(b"abcXYZ.-_#09") for _ in range(rng.choice([1, 2, 5, 20, 100, 255])))
        if name in (b".", b"..") or name in parent.children:
            continue
        t = dict(
            mtime=build_time if rng.random() < 0.6 else rng.randrange(-10**9, 2**33),
            mtime_nsec=0 if rng.random() < 0.6 else rng.randrange(10**9),
            uid=rng.choice([0, 1, 1000, 65535, 65536, 2**32 - 2]),
            gid=rng.choice([0, 5, 70000]),
        )
        if t["mtime"] == build_time:
            t["mtime_nsec"] = 0
        xattrs = {}
        for _ in range(rng.choice([0, 0, 0, 1, 2, 5])):
            k = rng.choice(["user.", "trusted.", "security."]) + "k%d" % rng.randrange(50)
            xattrs[k] = rng.randbytes(rng.choice([0, 1, 3, 4, 17, 200, 1500]))
        kind = rng.random()
        if kind < 0.15:
            node = Inode.directory(rng.choice([0o755, 0o700, 0o1777]), xattrs=xattrs, **t)  # type: ignore[arg-type]
            dirs.append(node)
        elif kind < 0.3:
            node = symlink(rng.randbytes(rng.choice([1, 10, 100, 1000, 3000, 4000, 4095])).replace(b"\0", b"x"),
                           xattrs={k: v for k, v in xattrs.items() if not k.startswith("user.")}, **t)  # fmt: skip
        elif kind < 0.35 and leaves:
            node = rng.choice(leaves)  # hardlink
        elif kind < 0.4:
            node = Inode(mode=rng.choice([stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK]) | 0o640,
                         rdev=os.makedev(rng.randrange(4096), rng.randrange(1 << 20)), **t)  # fmt: skip
            if stat.S_ISFIFO(node.mode) or stat.S_ISSOCK(node.mode):
                node.rdev = 0
        elif kind < 0.45:
            size = rng.choice([5000, 100_000, 3 << 20, (1 << 32) + 7])
            pieces, pos = [], rng.randrange(0, 20_000)
            while pos < size and len(pieces) < 6:
                ln = min(size - pos, rng.choice([1, 511, 4096, 10_000, 300_000]))
                pieces.append((pos, rng.randbytes(ln)))
                pos += ln + rng.choice([1, 4096, 65536, 1 << 20, 1 << 30])
            node = reg(spool.sparse(size, pieces), **t)  # type: ignore[arg-type]
        else:
            size = rng.choice([0, 1, 100, 4095, 4096, 4097, 9000, 70_000])
            node = reg(spool.dense(rng.randbytes(size)), mode=rng.choice([0o644, 0o755, 0o4755]), xattrs=xattrs, **t)
        parent.children[name] = node
        if not node.is_dir:
            leaves.append(node)
    # a few big directories with random-length names
    for d in rng.sample(dirs, min(3, len(dirs))):
        for j in range(rng.choice([50, 200, 600])):
            nm = b"%d-" % j + bytes(rng.choice(b"qwerty") for _ in range(rng.randrange(1, 60)))
            d.children.setdefault(nm, reg(None, mtime=build_time))  # type: ignore[union-attr]
    return root


@pytest.mark.parametrize("seed", range(int(os.environ.get("EROFS_RANDOM_SEEDS", "6"))))
def test_random_tree_roundtrip(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    spool = Spool(tmp_path / "spool")
    root = random_tree(rng, spool, 400)
    img = tmp_path / "img"
    with open(img, "wb") as out:
        write_image(root, out, build_time=1_000_000)
    fsck(img)
    with ErofsImage.open(img) as e:
        assert_reader_matches(root, e)
    with mounted(img, tmp_path / "mnt") as mnt:
        assert_mount_matches(root, mnt)
    spool.close()


@pytest.mark.parametrize("seed", range(100, 100 + int(os.environ.get("EROFS_RANDOM_SEEDS", "4"))))
def test_random_tree_as_merged_metadata(tmp_path: Path, seed: int) -> None:
    """Layer image -> to_tree() -> metadata-only image with a device table -> [M | layer]."""
    rng = random.Random(seed)
    spool = Spool(tmp_path / "spool")
    root = random_tree(rng, spool, 300)
    layer = tmp_path / "layer"
    with open(layer, "wb") as out:
        lblocks = write_image(root, out, build_time=1_000_000).blocks

    def meta(m: int) -> Inode:
        with ErofsImage.open(layer) as e:
            return e.to_tree(block_offset=m)

    devs = [DeviceSlot(b"layer", lblocks, 0)]
    m = plan_image(meta(0), build_time=1_000_000, devices=devs, meta_only=True).blocks
    devs = [DeviceSlot(b"layer", lblocks, m)]
    flat = tmp_path / "flat"
    with open(flat, "wb") as out:
        assert write_image(meta(m), out, build_time=1_000_000, devices=devs, meta_only=True).blocks == m
        with open(layer, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    with ErofsImage.open(flat) as e:
        assert_reader_matches(root, e)
    with mounted(flat, tmp_path / "mnt") as mnt:
        assert_mount_matches(root, mnt)
    spool.close()
