"""The ublk backend on a real kernel (lab only): a VirtualDevice becomes /dev/ublkbN that the kernel's
EROFS driver mounts; reads, faults, writes, concurrency, restarts and teardown are checked from the
outside. Outside the lab (no ublk_drv, not root) every test skips; inside, none may."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from bdserver.backends import udev
from bdserver.vdev.device import VirtualDevice
from tests.lab.helpers import (
    ProbeDevice, assert_same_tree, dd, device_holder, drop_caches, mounted, parallel_direct_reads, settle,
)

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("ublk_lab")]
BS = 4096


def in_ublk_lab() -> tuple[bool, str]:
    """True inside the lab VM: root, and ublk_drv loads (the lab kernel has it as a module)."""
    if os.geteuid() != 0:
        return False, "not root"
    if not os.path.exists("/dev/ublk-control"):
        if subprocess.run(["modprobe", "ublk_drv"], capture_output=True, check=False).returncode != 0:
            return False, "kernel module ublk_drv is not available (run inside vagrant/lab)"
        for _ in range(100):
            if os.path.exists("/dev/ublk-control"):
                break
            time.sleep(0.05)
    if not os.path.exists("/dev/ublk-control"):
        return False, "no /dev/ublk-control (ublk_drv missing: run inside vagrant/lab)"
    return True, ""


@pytest.fixture(scope="session")
def ublk_lab() -> None:
    ok, why = in_ublk_lab()
    if not ok:
        pytest.skip(f"not inside the ublk lab: {why}")


@pytest.fixture(scope="session")
def ublk_backend(ublk_lab) -> Iterator[object]:
    from bdserver.backends.ublk import UblkBackend

    backend = UblkBackend()
    ok, why = backend.available()
    assert ok, why  # inside the lab this must work: never skip here
    yield backend


@contextmanager
def attached(backend, device, dev_id: str) -> Iterator[object]:
    att = backend.attach(device, dev_id)
    try:
        yield att
    finally:
        backend.detach(att)


def file_device(image: Path) -> ProbeDevice:
    return ProbeDevice(VirtualDevice.from_files([str(image)]))


def sysfs(dev: str, rel: str) -> str:
    return Path(f"/sys/block/{os.path.basename(dev)}/{rel}").read_text().strip()


def ublk_nodes() -> list[str]:
    return sorted(n for n in os.listdir("/dev") if n.startswith("ublkb") or n.startswith("ublkc"))


def test_auto_picks_ublk(ublk_backend) -> None:
    from bdserver.backends.base import describe_backends, pick_backend

    assert pick_backend("auto").name == "ublk"
    assert describe_backends()["ublk"]["available"] is True


def test_mount_and_compare_tree(ublk_backend, erofs_pair, tmp_path) -> None:
    image, src = erofs_pair
    dev = file_device(image)
    with attached(ublk_backend, dev, "tree") as att:
        assert att.path.startswith("/dev/ublkb") and att.backend == "ublk"
        with mounted(att.path, tmp_path / "mnt") as mnt:
            assert_same_tree(src, mnt)
    assert dev.read_count() > 0


def test_disk_identity_in_sysfs(ublk_backend, erofs_pair) -> None:
    image, _ = erofs_pair
    with attached(ublk_backend, file_device(image), "ident") as att:
        assert sysfs(att.path, "ro") == "1"  # UBLK_ATTR_READ_ONLY
        assert sysfs(att.path, "queue/logical_block_size") == str(BS)
        assert sysfs(att.path, "queue/physical_block_size") == str(BS)
        assert int(sysfs(att.path, "size")) * 512 == image.stat().st_size
        assert int(sysfs(att.path, "queue/max_hw_sectors_kb")) == att.extra["max_io_bytes"] // 1024
        assert att.extra["queue_depth"] > 1
        assert att.extra["char"] == f"/dev/ublkc{att.extra['ublk_id']}" and os.path.exists(att.extra["char"])


def test_attach_returns_once_udev_has_processed_the_disk(ublk_backend, erofs_pair) -> None:
    """The lab runs udevd like any node; attach returns only after udev has processed the new
    char and block devices (matched by the ublk device number)."""
    import pyudev

    assert udev.udev_running(), "the lab guest runs no udev daemon (see vagrant/lab-guest)"
    image, _ = erofs_pair
    with attached(ublk_backend, file_device(image), "udev") as att:
        ctx = pyudev.Context()
        for node in (att.path, att.extra["char"]):
            dev = pyudev.Devices.from_device_file(ctx, node)
            assert dev.is_initialized, node  # in udev's database: its rules have run
        assert att.path == f"/dev/ublkb{att.extra['ublk_id']}"


def test_whole_disk_equals_image(ublk_backend, erofs_pair, tmp_path) -> None:
    image, _ = erofs_pair
    data = image.read_bytes()
    with attached(ublk_backend, file_device(image), "dd") as att:
        out = tmp_path / "disk.bin"
        r = dd([f"if={att.path}", f"of={out}", "bs=1M", "iflag=direct"])
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
        last = len(data) // BS - 1  # the last block, through the page cache
        r = dd([f"if={att.path}", f"bs={BS}", f"skip={last}", "count=1"])
        assert r.returncode == 0 and r.stdout == data[last * BS:]
        r = dd([f"if={att.path}", f"bs={BS}", f"skip={last + 1}", "count=1", "iflag=direct"])
        assert r.returncode == 0 and r.stdout == b""  # past the end: an empty read, not an error


def test_second_read_fetches_nothing(ublk_backend, erofs_pair, tmp_path) -> None:
    image, src = erofs_pair
    dev = file_device(image)
    with attached(ublk_backend, dev, "twice") as att:
        with mounted(att.path, tmp_path / "mnt") as mnt:
            first = (mnt / "d" / "big").read_bytes()
            settle(att.path)
            after_first = dev.read_count()
            assert first == (mnt / "d" / "big").read_bytes() == (src / "d" / "big").read_bytes()
            assert dev.read_count() == after_first  # the page cache answered


def test_writes_fail(ublk_backend, erofs_pair) -> None:
    image, _ = erofs_pair
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    with attached(ublk_backend, file_device(image), "ro") as att:
        r = dd(["if=/dev/zero", f"of={att.path}", f"bs={BS}", "count=1", "oflag=direct"])
        assert r.returncode != 0 and b"Operation not permitted" in r.stderr, r.stderr
        r = subprocess.run(["blkdiscard", att.path], capture_output=True)
        assert r.returncode != 0
        r = dd([f"if={att.path}", "of=/dev/null", f"bs={BS}", "count=4", "iflag=direct"])
        assert r.returncode == 0  # still reads fine
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_server_refuses_writes_below_the_block_layer(erofs_pair, ublk_lab) -> None:
    """With the kernel's read-only flag off, writes, discards and write-zeroes reach the server,
    which answers -EROFS (the writer sees EIO) and keeps serving reads."""
    from bdserver.backends.ublk import UblkBackend

    image, _ = erofs_pair
    before = image.read_bytes()
    backend = UblkBackend(kernel_read_only=False)
    dev = file_device(image)
    with attached(backend, dev, "rw-refused") as att:
        assert sysfs(att.path, "ro") == "0"
        r = dd(["if=/dev/zero", f"of={att.path}", f"bs={BS}", "count=1", "oflag=direct"])
        assert r.returncode != 0 and b"Input/output error" in r.stderr, r.stderr
        r = dd([f"if={att.path}", f"bs={BS}", "count=2", "iflag=direct"])
        assert r.returncode == 0 and r.stdout == before[:2 * BS]
    assert image.read_bytes() == before
    backend.close()


def test_read_fault_is_eio_then_heals(ublk_backend, erofs_pair, tmp_path) -> None:
    image, src = erofs_pair
    data = image.read_bytes()
    big = (src / "d" / "big").read_bytes()
    off = data.find(big[:BS])  # d/big is stored plain: its first block is in the image as is
    assert off > 0 and off % BS == 0
    blk = off // BS
    dev = file_device(image)
    with attached(ublk_backend, dev, "fault") as att:
        dev.fail_range = (off, off + BS)
        r = dd([f"if={att.path}", "of=/dev/null", f"bs={BS}", f"skip={blk}", "count=1", "iflag=direct"])
        assert r.returncode != 0 and b"Input/output error" in r.stderr, r.stderr
        with mounted(att.path, tmp_path / "mnt") as mnt:
            with pytest.raises(OSError) as exc:
                (mnt / "d" / "big").read_bytes()
            assert exc.value.errno == errno.EIO
            r = dd([f"if={att.path}", f"bs={BS}", f"skip={blk - 1}", "count=1", "iflag=direct"])
            assert r.returncode == 0 and r.stdout == data[(blk - 1) * BS:blk * BS]  # neighbours fine
            dev.fail_range = None  # healed: the same reads now succeed
            r = dd([f"if={att.path}", f"bs={BS}", f"skip={blk}", "count=1", "iflag=direct"])
            assert r.returncode == 0 and r.stdout == data[blk * BS:(blk + 1) * BS]
            assert (mnt / "d" / "big").read_bytes() == big
    assert ublk_backend.stats("fault") == {}  # detached


def test_slow_read_does_not_block_others(ublk_backend, erofs_pair) -> None:
    """Out-of-order completion: while one read waits (a miss), another read completes."""
    image, _ = erofs_pair
    data = image.read_bytes()
    dev = file_device(image)
    slow_blk, fast_blk = 3, len(data) // BS - 2
    with attached(ublk_backend, dev, "ooo") as att:
        dev.park_range = (slow_blk * BS, (slow_blk + 1) * BS)
        slow = subprocess.Popen(["dd", f"if={att.path}", "of=/dev/null", f"bs={BS}", f"skip={slow_blk}",
                                 "count=1", "iflag=direct", "status=none"])
        try:
            assert dev.parked.wait(20), "the slow read never reached the device"
            r = dd([f"if={att.path}", f"bs={BS}", f"skip={fast_blk}", "count=1", "iflag=direct"])
            assert r.returncode == 0 and r.stdout == data[fast_blk * BS:(fast_blk + 1) * BS]
            assert slow.poll() is None  # the slow one is still waiting: the fast one overtook it
        finally:
            dev.release.set()
            dev.park_range = None
        assert slow.wait(60) == 0


class CachedProbe(ProbeDevice):
    """A ProbeDevice with the optional ``read_cached`` hook: everything is local except the fail
    and park ranges, which stand for blocks that must come from the network."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.cached_hits = 0

    def read_cached(self, offset: int, length: int) -> bytes | None:
        if self._hits(self.fail_range, offset, length) or self._hits(self.park_range, offset, length):
            return None
        self.cached_hits += 1
        return self.inner.read(offset, length)


def test_hits_inline_misses_in_the_pool(ublk_backend, erofs_pair) -> None:
    """With ``read_cached``, hits are answered by the ring thread; a miss parked in the pool does
    not hold them up, and a failing miss is EIO."""
    image, _ = erofs_pair
    data = image.read_bytes()
    dev = CachedProbe(VirtualDevice.from_files([str(image)]))
    slow_blk, fast_blk, bad_blk = 3, len(data) // BS - 2, 5
    with attached(ublk_backend, dev, "inline") as att:
        r = dd([f"if={att.path}", "bs=1M", "iflag=direct"])
        assert r.returncode == 0 and r.stdout == data
        assert dev.cached_hits > 0 and ublk_backend.stats("inline")["inline_reads"] == dev.cached_hits
        dev.fail_range = (bad_blk * BS, (bad_blk + 1) * BS)
        r = dd([f"if={att.path}", "of=/dev/null", f"bs={BS}", f"skip={bad_blk}", "count=1", "iflag=direct"])
        assert r.returncode != 0 and b"Input/output error" in r.stderr, r.stderr
        dev.fail_range = None
        dev.park_range = (slow_blk * BS, (slow_blk + 1) * BS)
        slow = subprocess.Popen(["dd", f"if={att.path}", "of=/dev/null", f"bs={BS}", f"skip={slow_blk}",
                                 "count=1", "iflag=direct", "status=none"])
        try:
            assert dev.parked.wait(20), "the slow read never reached the device"
            hits = dev.cached_hits
            r = dd([f"if={att.path}", f"bs={BS}", f"skip={fast_blk}", "count=1", "iflag=direct"])
            assert r.returncode == 0 and r.stdout == data[fast_blk * BS:(fast_blk + 1) * BS]
            assert dev.cached_hits > hits and slow.poll() is None  # the hit overtook the miss
        finally:
            dev.release.set()
            dev.park_range = None
        assert slow.wait(60) == 0


def test_parallel_readers(ublk_backend, erofs_pair) -> None:
    """Many concurrent direct reads at random places and sizes return the right bytes."""
    image, _ = erofs_pair
    with attached(ublk_backend, file_device(image), "par") as att:
        errors = parallel_direct_reads(att.path, image.read_bytes(), sizes=(1, 2, 16, 64), block=BS)
    assert errors == []


def test_two_devices_at_once(ublk_backend, erofs_pair, erofs_pair2, tmp_path) -> None:
    (img1, src1), (img2, src2) = erofs_pair, erofs_pair2
    with attached(ublk_backend, file_device(img1), "one") as a1, \
            attached(ublk_backend, file_device(img2), "two") as a2:
        assert a1.path != a2.path
        with mounted(a1.path, tmp_path / "m1") as m1, mounted(a2.path, tmp_path / "m2") as m2:
            assert_same_tree(src1, m1)
            assert_same_tree(src2, m2)
    assert not os.path.exists(a1.path) and not os.path.exists(a2.path)


def test_detach_leaves_no_residue(ublk_backend, erofs_pair, tmp_path) -> None:
    image, _ = erofs_pair
    before = ublk_nodes()
    att = ublk_backend.attach(file_device(image), "gone")
    n = att.extra["ublk_id"]
    assert os.path.exists(att.path) and os.path.exists(f"/dev/ublkc{n}")
    with mounted(att.path, tmp_path / "mnt"):
        pass
    ublk_backend.detach(att)
    assert not os.path.exists(att.path) and not os.path.exists(f"/sys/block/ublkb{n}")
    assert not os.path.exists(f"/dev/ublkc{n}") and not os.path.exists(f"/sys/class/ublk-char/ublkc{n}")
    assert ublk_nodes() == before
    ublk_backend.detach(att)  # idempotent


def test_restarted_server_adopts_device(ublk_backend, erofs_pair, tmp_path) -> None:
    """The serving process dies with the disk mounted; a read issued meanwhile waits (user
    recovery); a new server adopts the same /dev/ublkbN, the waiting read completes, and the mount
    keeps working."""
    image, src = erofs_pair
    data = image.read_bytes()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    path = ""
    with device_holder("ublk", image, "adopt") as (holder, first):
        try:
            path = first["path"]
            assert first["extra"]["recovery"]
            subprocess.run(["mount", "-t", "erofs", "-o", "ro", path, str(mnt)], check=True)
            assert (mnt / "text").read_text() == (src / "text").read_text()
            os.kill(holder.pid, signal.SIGKILL)  # the process this test started
            holder.wait(60)
            blk = len(data) // BS - 3
            stuck = subprocess.Popen(["dd", f"if={path}", f"bs={BS}", f"skip={blk}", "count=1", "iflag=direct",
                                      "status=none"], stdout=subprocess.PIPE)
            dev = file_device(image)
            att = ublk_backend.attach(dev, "adopt")
            try:
                assert att.path == path and att.extra.get("adopted")
                out, _ = stuck.communicate(timeout=120)
                assert stuck.returncode == 0 and out == data[blk * BS:(blk + 1) * BS]
                drop_caches()
                assert_same_tree(src, mnt)  # the old mount reads through the new server
                assert dev.read_count() > 0
            finally:
                subprocess.run(["umount", str(mnt)], check=False)
                ublk_backend.detach(att)
        finally:
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
    assert path and not os.path.exists(path)

