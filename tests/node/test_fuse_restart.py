"""The FUSE backend outlives its daemon (issue 9.1): a reader streams a large file from a lazily mounted
image through a slow registry link; the daemon is SIGKILLed (a crash) or stopped (`bdserver stop`, an
upgrade) mid-stream and a new `bdserver serve` starts. The reader must finish with the right checksum
and never see an error; the mounts are the same mounts (taken over, not redone); and detaching the
last device leaves no connection, holder process or fd behind. A device whose source is gone after
the restart is discarded instead: its readers get EIO at once (issue 9.2), and it detaches cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from bdserver import mounts
from tests.fixtures.layers import build_oci_layout, small_tar_layer
from tests.fixtures.proxy import FaultProxy
from tests.fixtures.registry import start_registry
from tests.fixtures.converter import convert_cli
from tests.node.conftest import fuse_connections, mkfs_erofs

pytestmark = pytest.mark.slow

MiB = 1 << 20
BIG = 48 * MiB

READER = r"""
import hashlib, os, sys, time
path, progress = sys.argv[1], sys.argv[2]
h, n = hashlib.sha256(), 0
with open(path, "rb", buffering=0) as f:
    while True:
        b = f.read(256 * 1024)
        if not b:
            break
        h.update(b)
        n += len(b)
        with open(progress + ".tmp", "w") as p:
            p.write(str(n))
        os.replace(progress + ".tmp", progress)
        time.sleep(0.02)  # a consumer, not a copy loop: the stream lasts seconds
print(h.hexdigest(), n)
"""


@dataclass
class Image:
    ref: str  # through the slow proxy
    trust: str  # [trust] TOML allowing its lazy image
    digest: str  # sha256 of /data/big
    proxy: FaultProxy


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    base = tmp_path_factory.mktemp("restart")
    big = random.Random(9).randbytes(BIG)
    layer = small_tar_layer(base / "big.tar", {"data/big": big, "data/small": b"small\n"})
    build_oci_layout([layer], base / "layout")
    reg = start_registry(base / "registry")
    try:
        reg.push_layout(base / "layout", "latest", "stream", "v1")
        converted = convert_cli(base, f"{reg.host}/stream:v1", timeout=600)
        lazy = converted["lazy"]
        with FaultProxy(reg.url) as proxy:
            proxy.latency = 0.05  # every registry request waits 50 ms: fetches are in flight at the kill
            yield Image(f"{proxy.host}/stream:v1", f'[trust]\nallowed = ["{lazy}"]\n',
                        hashlib.sha256(big).hexdigest(), proxy)
    finally:
        reg.stop()


def _holders(run_dir: Path) -> list[int]:
    sock = str(run_dir / "fdholder.sock")
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"bdserver.daemon.fdholder" in cmd and sock.encode() in cmd:
            out.append(int(pid))
    return out


def _fuse_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse"
        except OSError:
            pass
    return n


def _mount_ids(*targets: Path) -> list[int]:
    return [mounts.find_mounts(target=str(t))[0].mount_id for t in targets]


@pytest.mark.parametrize("how", ["sigkill", "stop"])
def test_reader_survives_daemon_restart(image: Image, daemon, tmp_path: Path, how: str) -> None:
    daemon.write_config(image.trust)
    target = tmp_path / "rootfs"
    info = daemon.json("mount", image.ref, str(target))
    lower = daemon.base / "run" / "mnt" / info["id"] / "lower"
    before = _mount_ids(target, lower)
    conn = max((m for m in mounts.list_mounts() if m.fstype == "fuse.bdserver" and info["path"].startswith(m.target)),
               key=lambda m: len(m.target)).major_minor.split(":")[1]
    holders = _holders(daemon.base / "run")
    progress = tmp_path / "progress"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target / "data" / "big"), str(progress)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (progress.exists() and int(progress.read_text() or 0) >= 8 * MiB):
            assert reader.poll() is None, reader.communicate()
            assert time.monotonic() < deadline, "the reader never got going"
            time.sleep(0.05)
        if how == "sigkill":
            daemon.kill()
        else:
            daemon.stop()
        at_stop = int(progress.read_text())
        time.sleep(1.0)  # the reader now waits on requests nobody serves
        assert reader.poll() is None, f"the reader ended while no daemon ran: {reader.communicate()}"
        daemon.start()
        out, err = reader.communicate(timeout=300)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert reader.returncode == 0, f"the reader saw an error: {err}"
    assert holders, "the FUSE fd was not handed to a holder"
    digest, n = out.split()
    assert int(n) == BIG and digest == image.digest
    assert at_stop < BIG, "the stream was over before the daemon went away"
    assert _mount_ids(target, lower) == before, "the mounts were redone instead of kept"
    assert [(d["id"], d["status"]) for d in daemon.json("ls")] == [(info["id"], "attached")]
    assert "adopted" in (daemon.state_dir / "bdserver.log").read_text()
    # stopping for good: the last device goes, and with it every trace of the connection
    daemon.cli("umount", str(target))
    assert daemon.json("ls") == []
    assert not [m for m in mounts.list_mounts() if m.fstype == "fuse.bdserver"
                and m.target.startswith(str(daemon.base))]
    assert conn not in fuse_connections()
    for _ in range(100):
        if not _holders(daemon.base / "run"):
            break
        time.sleep(0.05)
    assert not _holders(daemon.base / "run"), "the fd holder outlived the last device"
    assert _fuse_fds(daemon.pid()) == 0


EIO_READER = r"""
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)  # opened while the device works
os.pread(fd, 4096, 0)
print("open", flush=True)
sys.stdin.readline()  # the test crashes the daemon and makes the source unreachable meanwhile
try:
    os.pread(fd, 4096, int(sys.argv[2]))
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno))
else:
    print("read")
"""


def test_device_that_cannot_be_reopened_fails_its_io_and_detaches(daemon, tmp_path: Path) -> None:
    """Issue 9.2: after a crash the device's source is gone. It shows as `error`, a process that has a
    file of it open gets EIO at once (nothing waits for a daemon that cannot serve the device), and
    `detach` leaves nothing of it: no mount, connection, holder or fd."""
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    (src / "data" / "big").write_bytes(random.Random(3).randbytes(24 * MiB))
    image = mkfs_erofs(tmp_path / "img.erofs", src)
    target = tmp_path / "lower"
    info = daemon.json("mount", f"file:{image}", str(target), "--lower-only")
    fuse_mnt = os.path.dirname(info["path"])
    conn = next(m.major_minor.split(":")[1] for m in mounts.list_mounts() if m.target == fuse_mnt)
    reader = subprocess.Popen([sys.executable, "-c", EIO_READER, str(target / "data" / "big"), str(24 * MiB - 4096)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "open"
        daemon.kill()
        image.rename(tmp_path / "gone.erofs")  # the source cannot be reopened
        daemon.start()
        [dev] = daemon.json("ls")
        assert dev["id"] == info["id"] and dev["status"] == "error" and "img.erofs" in dev["error"]
        # the tail of the big file was never read: the kernel must ask for it, and gets an error
        out, _ = reader.communicate("go\n", timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert out.strip() == "EIO"
    daemon.cli("detach", info["id"])
    assert daemon.json("ls") == []
    assert not [m for m in mounts.list_mounts() if m.target.startswith(str(daemon.base)) or m.target == str(target)]
    assert conn not in fuse_connections()
    for _ in range(100):
        if not _holders(daemon.base / "run"):
            break
        time.sleep(0.05)
    assert not _holders(daemon.base / "run"), "the fd holder outlived the last device"
    assert _fuse_fds(daemon.pid()) == 0


def test_connection_of_a_device_missing_from_state_is_removed(daemon, erofs_image, tmp_path: Path) -> None:
    """A crash between handing a new connection to the holder and saving state (here: the record is
    dropped from state.json) leaves a connection nobody claims: the next daemon removes it, with its
    mount and, as it was the last one, the holder."""
    image, _ = erofs_image
    info = daemon.json("attach", f"file:{image}")
    fuse_mnt = os.path.dirname(info["path"])
    assert any(m.target == fuse_mnt for m in mounts.list_mounts())
    daemon.kill()
    state = daemon.state_dir / "state.json"
    data = json.loads(state.read_text())
    data["devices"].pop(info["id"])
    state.write_text(json.dumps(data))
    assert _holders(daemon.base / "run"), "nothing held the connection across the crash"
    daemon.start()
    assert daemon.json("ls") == []
    assert not any(m.target == fuse_mnt for m in mounts.list_mounts())
    for _ in range(100):
        if not _holders(daemon.base / "run"):
            break
        time.sleep(0.05)
    assert not _holders(daemon.base / "run")
    assert _fuse_fds(daemon.pid()) == 0


def test_holder_lets_go_of_a_connection_that_died(daemon, erofs_image) -> None:
    """With the daemon stopped, someone unmounts the device's FUSE mount (the connection ends): the
    holder closes its copy and, holding nothing, exits."""
    image, _ = erofs_image
    info = daemon.json("attach", f"file:{image}")
    daemon.stop()
    assert _holders(daemon.base / "run")
    mounts.sys_umount(os.path.dirname(info["path"]), mounts.MNT_DETACH)
    for _ in range(100):
        if not _holders(daemon.base / "run"):
            break
        time.sleep(0.05)
    assert not _holders(daemon.base / "run"), "the holder kept a dead connection"
