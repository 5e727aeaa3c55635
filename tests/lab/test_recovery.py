"""A restarted daemon that cannot reopen a device's source never leaves a hung device (issue 9.2).

The daemon (real CLI) attaches a local EROFS image over ublk or TCMU and mounts it; it is killed;
the image file disappears; a new daemon starts. The device must come back as `error`, its readers
must get EIO (not sit in D state waiting for a server that will never come), and `detach` must
leave no kernel device, mount or configfs object behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from tests.lab.helpers import configfs_residue, drop_caches, in_tcmu_lab, make_tree, mkfs_erofs

pytestmark = pytest.mark.lab


def _lab_backend(name: str) -> None:
    if name == "tcmu":
        ok, why = in_tcmu_lab()
    else:
        from tests.lab.test_ublk import in_ublk_lab

        ok, why = in_ublk_lab()
    if not ok:
        pytest.skip(f"not inside the lab: {why}")


@pytest.fixture
def lab_daemon(tmp_path: Path) -> Iterator[object]:
    from tests.node.conftest import REPO, Daemon, cleanup_mounts

    base = tmp_path / "d"
    base.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BDSERVER_")}
    env["BDSERVER_CONFIG"] = str(base / "config.toml")
    env["PYTHONPATH"] = str(REPO)
    d = Daemon(base, env)
    d.write_config("daemon_start_wait_s = 180.0\n")  # a cold Python start under qemu TCG is slow
    try:
        yield d
    finally:
        cleanup_mounts(tmp_path)
        if d.pid() is not None:
            d.stop()


@pytest.mark.parametrize("backend", ["ublk", "tcmu"])
def test_unopenable_source_after_a_crash_fails_io_and_detaches_cleanly(backend: str, lab_daemon, tmp_path: Path) -> None:
    _lab_backend(backend)
    src = make_tree(tmp_path / "src", seed=3)
    image = mkfs_erofs(tmp_path / "img.erofs", src)
    cfg = lab_daemon.base / "config.toml"
    cfg.write_text(cfg.read_text().replace('backend = "fuse"', f'backend = "{backend}"'))
    mnt = tmp_path / "mnt"
    info = lab_daemon.json("mount", f"file:{image}", str(mnt), "--lower-only")
    dev = info["path"]
    assert info["backend"] == backend and os.path.exists(dev)
    assert (mnt / "text").read_text() == (src / "text").read_text()
    held = os.open(mnt / "d" / "big", os.O_RDONLY)  # a container's open file keeps the mount busy
    lab_daemon.kill()
    image.unlink()  # the source cannot be reopened
    lab_daemon.start()
    (d,) = lab_daemon.json("ls")
    assert d["status"] == "error" and "img.erofs" in d["error"]
    drop_caches()
    # a reader gets an error in bounded time: never a hang
    p = subprocess.run(["dd", f"if={dev}", "of=/dev/null", "bs=4096", "count=16", "iflag=direct", "status=none"],
                       capture_output=True, timeout=180)
    assert p.returncode != 0 or not os.path.exists(dev)
    with ThreadPoolExecutor(1) as ex:  # the open file's read fails too, in bounded time
        fut = ex.submit(os.pread, held, 65536, 1 << 20)
        with pytest.raises(OSError) as err:
            fut.result(timeout=180)
    assert err.value.errno == errno.EIO
    os.close(held)
    lab_daemon.cli("detach", d["id"], timeout=300)
    assert lab_daemon.json("ls") == []
    assert not os.path.exists(dev)
    assert not any(m.split()[1] == str(mnt) for m in Path("/proc/mounts").read_text().splitlines())
    if backend == "tcmu":
        assert configfs_residue("bd-bd") == []
    else:
        assert not list(Path("/sys/class/ublk-char").glob("ublkc*"))
    shutil.rmtree(src)
