"""Shared helpers for conversion tests: real mounts (always unmounted), unique temp dirs."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


@contextmanager
def mounted(image: Path, *, options: str = "ro") -> Iterator[Path]:
    """Mount an EROFS image file (file-backed; kernel 6.12+) on a fresh directory."""
    mnt = Path(tempfile.mkdtemp(prefix="bdserver-cvt-mnt-"))
    subprocess.run(["mount", "-t", "erofs", "-o", options, str(image), str(mnt)], check=True,
                   capture_output=True, text=True)
    try:
        yield mnt
    finally:
        for i in range(50):
            r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        os.rmdir(mnt)


def fsck(image: Path, devices: int = 0) -> subprocess.CompletedProcess[str]:
    args = ["fsck.erofs"] + ["--device=/dev/null"] * devices + [str(image)]
    return subprocess.run(args, capture_output=True, text=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
