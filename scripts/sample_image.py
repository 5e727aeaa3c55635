"""Build the demo's sample image: a Debian minbase rootfs layer plus a Python layer.

The rootfs comes from the shared debootstrap fixture (built once per run); the Python
interpreter and its standard library are split off into a second layer, as an image built
`FROM debian` with `RUN apt-get install python3` would have them. Prints the OCI layout path.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.layers import GNU_TAR, PAX_OPT, _build_once, build_oci_layout  # noqa: E402
from tests.fixtures.rootfs import debootstrap_rootfs  # noqa: E402

PYTHON_PATHS = ["./usr/lib/python3.11", "./usr/bin/python3", "./usr/bin/python3.11"]


def _build(d: Path) -> None:
    root = debootstrap_rootfs()
    python = [p for p in PYTHON_PATHS if (root / p).exists() or (root / p).is_symlink()]
    excludes = [f"--exclude={p}" for p in python]
    tar = GNU_TAR + [PAX_OPT, "--format=posix", "--xattrs", "--xattrs-include=*"]
    subprocess.run(tar + excludes + ["-czf", str(d / "1-debian.tar.gz"), "-C", str(root), "."], check=True)
    subprocess.run(tar + ["-czf", str(d / "2-python.tar.gz"), "-C", str(root), *python], check=True)
    build_oci_layout([d / "1-debian.tar.gz", d / "2-python.tar.gz"], d / "layout", tag="latest")


def sample_image() -> Path:
    root = debootstrap_rootfs()
    key = hashlib.sha256((Path(__file__).read_bytes() + str(root.stat().st_mtime_ns).encode())).hexdigest()[:16]
    return _build_once("demo-image", key, _build) / "layout"


if __name__ == "__main__":
    print(sample_image())
