"""Helpers for the TCMU lab tests: test devices (counting, faulty, blocking), trees, mounts."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bdserver.errors import FetchError
from tests.fixtures.trees import assert_same_tree, make_tree, mkfs_erofs  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[2]


def in_tcmu_lab() -> tuple[bool, str]:
    """True inside the lab VM: TCMU and tcm_loop load and configfs is there (we load them)."""
    if os.geteuid() != 0:
        return False, "not root"
    subprocess.run([str(REPO / "kernel-setup" / "lab-modules")], capture_output=True, check=False)
    for mod in ("target_core_user", "tcm_loop", "uio"):
        if not os.path.isdir(f"/sys/module/{mod}"):
            return False, f"kernel module {mod} is not available (run inside vagrant/lab)"
    if not os.path.isdir("/sys/kernel/config/target/core"):
        return False, "configfs target tree missing"
    return True, ""


class ProbeDevice:
    """Wraps a device: counts reads, can fail a byte range (FetchError) or park reads in a range."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.reads: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self.fail_range: tuple[int, int] | None = None
        self.park_range: tuple[int, int] | None = None
        self.parked = threading.Event()  # set when a read entered the park range
        self.release = threading.Event()

    @property
    def size(self) -> int:
        return self.inner.size

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.reads.append((offset, length))
        if self._hits(self.fail_range, offset, length):
            raise FetchError(f"injected fault at [{offset}, {offset + length})")
        if self._hits(self.park_range, offset, length):
            self.parked.set()
            self.release.wait(25)  # below the kernel's 30 s cmd_time_out
        return self.inner.read(offset, length)

    @staticmethod
    def _hits(rng: tuple[int, int] | None, offset: int, length: int) -> bool:
        return rng is not None and offset < rng[1] and rng[0] < offset + length

    def read_count(self) -> int:
        with self._lock:
            return len(self.reads)


@contextmanager
def mounted(dev: str, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "erofs", "-o", "ro", dev, str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def dd(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """dd with stdout captured (no ``of=`` means stdout; the guest has no /dev/stdout link)."""
    return subprocess.run(["dd", *args, "status=none"], capture_output=True, timeout=timeout)


def settle(dev: str) -> None:
    """Wait (bounded) until the block layer has no request of ``dev`` in flight (e.g. readahead)."""
    path = Path(f"/sys/block/{os.path.basename(dev)}/inflight")
    for _ in range(600):
        if path.read_text().split() == ["0", "0"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"{dev} still has requests in flight")


def drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def kernel_log() -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout


def configfs_residue(name_part: str = "") -> list[str]:
    """Our configfs objects left: user backstores and loopback targets."""
    core = Path("/sys/kernel/config/target/core")
    loop = Path("/sys/kernel/config/target/loopback")
    left = [str(p) for p in core.glob("user_*/*") if p.is_dir() and name_part in p.name]
    if loop.is_dir():
        left += [str(p) for p in loop.glob("naa.*")]
    return left


def uio_names() -> list[str]:
    out = []
    for p in Path("/sys/class/uio").glob("uio*"):
        try:
            out.append((p / "name").read_text().strip())
        except OSError:
            pass
    return out


def parallel_direct_reads(path: str, data: bytes, *, threads: int = 8, reads: int = 25,
                          sizes: tuple[int, ...] = (1, 2, 16, 64), block: int = 4096) -> list[str]:
    """Many threads reading a block device with O_DIRECT at random blocks and sizes; returns the
    mismatches (empty when every read returned the bytes of ``data``). Same check for any backend."""
    import mmap

    nblocks = len(data) // block
    errors: list[str] = []

    def reader(seed: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, max(sizes) * block)
        try:
            rng = random.Random(seed)
            for _ in range(reads):
                blk = rng.randrange(nblocks)
                n = min(rng.choice(sizes), nblocks - blk)
                got = os.preadv(fd, [memoryview(buf)[:n * block]], blk * block)
                if got != n * block or buf[:got] != data[blk * block:blk * block + got]:
                    errors.append(f"mismatch at block {blk} (+{n})")
        finally:
            os.close(fd)
            buf.close()

    workers = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return errors


_HOLDER = """
import json, sys
from bdserver.backends.base import get_backend
from bdserver.vdev.device import VirtualDevice
att = get_backend(sys.argv[3]).attach(VirtualDevice.from_files([sys.argv[1]]), sys.argv[2])
print(json.dumps(att.to_json()), flush=True)
sys.stdin.read()  # hold the device until killed
"""


@contextmanager
def device_holder(backend: str, image: Path, dev_id: str) -> Iterator[tuple[subprocess.Popen, dict]]:
    """Attach ``image`` over ``backend`` from a process of its own, which a test kills to play a
    crashed daemon; yields the process and its `Attached` as JSON, kills it at the end if alive."""
    import json
    import signal
    import sys

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(image), dev_id, backend], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, cwd=str(REPO))
    try:
        line = holder.stdout.readline() if holder.stdout else b""
        assert line, "holder process failed to attach"
        yield holder, json.loads(line)
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)  # the process this helper started
            holder.wait(60)
