"""Build the `app` benchmark image: the demo image plus a layer of Debian's scientific Python stack.

An import-heavy application, as the cold-start issue describes: numpy, scipy, pandas and
matplotlib from Debian packages (several hundred MB, many shared libraries the loader maps),
installed by debootstrap on the same minbase as the demo image. The third layer holds what that
install added or changed relative to the demo rootfs, as `RUN apt-get install ...` on top of it
would. Built once into ``$BDSERVER_FIXTURES`` (``app-image-<key>/layout``); prints its path.

The start it is measured with is `APP_START`: ``python3 -c "import numpy, scipy.stats, ..."``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.sample_image import sample_image  # noqa: E402
from tests.fixtures.layers import GNU_TAR, PAX_OPT, _build_once, build_oci_layout  # noqa: E402
from tests.fixtures.rootfs import MIRROR, SUITE, debootstrap_rootfs  # noqa: E402

PACKAGES = ["python3-minimal", "python3", "python3-numpy", "python3-scipy", "python3-pandas", "python3-matplotlib"]
APP_START = ["/usr/bin/python3", "-c", "import numpy, scipy.stats, scipy.optimize, pandas, matplotlib"]


def _same(a: Path, b: Path) -> bool:
    """``b`` (in the base rootfs) is what ``a`` (in the app rootfs) is: type, mode, owner, content."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    if (sa.st_mode, sa.st_uid, sa.st_gid) != (sb.st_mode, sb.st_uid, sb.st_gid):
        return False
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(a) == os.readlink(b)
    if stat.S_ISREG(sa.st_mode):
        if sa.st_size != sb.st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                x, y = fa.read(1 << 20), fb.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    return True
    return True  # directories, devices: same type and mode


def _changed(root: Path, base: Path) -> list[str]:
    """Paths (./relative, sorted) of ``root`` that ``base`` lacks or holds differently."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root)
            if not _same(p, base / rel):
                out.append(f"./{rel}")
    return out


def _build(d: Path) -> None:
    base = debootstrap_rootfs()
    demo = sample_image().parent
    root = d / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), MIRROR],
                   check=True, stdout=subprocess.DEVNULL)
    for sub in ("var/cache/apt/archives", "var/log", "var/lib/apt/lists"):  # as the base fixture does
        for child in (root / sub).iterdir() if (root / sub).is_dir() else ():
            if child.is_file() and child.name != "lock":
                child.unlink()
    changed = _changed(root, base)
    (d / "changed.list").write_text("".join(p + "\0" for p in changed))
    subprocess.run(GNU_TAR + [PAX_OPT, "--format=posix", "--xattrs", "--xattrs-include=*", "--no-recursion",
                              "-czf", str(d / "3-app.tar.gz"), "-C", str(root), "--null",
                              "-T", str(d / "changed.list")], check=True)
    shutil.rmtree(root)
    build_oci_layout([demo / "1-debian.tar.gz", demo / "2-python.tar.gz", d / "3-app.tar.gz"], d / "layout",
                     tag="latest")


def app_image() -> Path:
    demo = sample_image()
    key = hashlib.sha256(Path(__file__).read_bytes() + str(demo).encode()
                         + str(debootstrap_rootfs().stat().st_mtime_ns).encode()).hexdigest()[:16]
    return _build_once("app-image", key, _build) / "layout"


if __name__ == "__main__":
    print(app_image())
