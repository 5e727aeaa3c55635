"""The kernel check of issue 13 item 2 on Debian's 6.12 (the lab): merged metadata whose
COMPRESSED_FULL inodes point at lz4 pclusters inside the layer regions of ONE flat device is read
right by the kernel (tests/erofs/test_compressed.py does the same on this machine's kernel).

Run: vagrant/lab -- .venv/bin/pytest -q -m lab tests/lab/test_erofs_compressed.py
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest

from tests.convert.conftest import mounted
from tests.fixtures.erofs_layers import MIXED, flat_device, layer_views, mkfs_layer, reference
from tests.fixtures.reftree import compare_trees

pytestmark = pytest.mark.lab


@pytest.fixture
def work(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fresh tmpfs: the guest's /tmp is an overlay, where whiteout device nodes cannot be made."""
    d = tmp_path / "work"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_flat_device_with_compressed_extents_in_layers(work: Path) -> None:
    subprocess.run(["modprobe", "erofs"], check=False, capture_output=True)
    tmp_path = work
    views = layer_views(tmp_path)
    layers = [mkfs_layer(v, tmp_path / f"layer{i}.erofs", variant) for i, (v, variant) in enumerate(zip(views, MIXED))]
    _, flat = flat_device(layers, tmp_path / "flat.img")
    ref = reference(tmp_path)
    with mounted(flat) as mnt:
        diffs = compare_trees(mnt, ref)
        for rel in ("srv/two/data", "text/big.txt", "bin/mixed.bin"):
            assert (mnt / rel).read_bytes() == (ref / rel).read_bytes(), rel
    assert diffs == [], "\n".join(diffs)
    print(f"\nkernel {platform.release()}: compressed extents in layer regions of a flat device read correctly")
