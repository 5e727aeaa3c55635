"""Real directory trees (a crafted one and the debootstrap rootfs) through our writer: the
mounted image and our reader must equal the directory on disk, and mkfs.erofs agrees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bdserver.erofs.reader import ErofsImage
from bdserver.erofs.writer import write_image
from tests.erofs.helpers import disk_tree_equals_reader, fsck, mounted, tree_from_dir
from tests.erofs.test_interop import make_source_dir


def _roundtrip(src: Path, tmp_path: Path) -> None:
    root, _ = tree_from_dir(src, tmp_path / "spool")
    img = tmp_path / "img"
    with open(img, "wb") as out:
        write_image(root, out)
    fsck(img)
    with ErofsImage.open(img) as e:
        disk_tree_equals_reader(src, e)
        with mounted(img, tmp_path / "mnt") as mnt:
            disk_tree_equals_reader(mnt, e)


def test_crafted_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source_dir(src)
    _roundtrip(src, tmp_path)


@pytest.mark.slow
def test_debootstrap_rootfs(tmp_path: Path) -> None:
    from tests.fixtures.rootfs import debootstrap_rootfs

    rootfs = debootstrap_rootfs()
    if not os.access(rootfs, os.R_OK):
        pytest.fail("no rootfs fixture")
    _roundtrip(rootfs, tmp_path)
