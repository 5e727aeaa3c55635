"""The TCMU backend on a real kernel (lab only): a VirtualDevice becomes /dev/sdX that the kernel's
EROFS driver mounts; reads, faults, writes, concurrency and teardown are checked from the outside."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from bdserver.backends import udev
from bdserver.backends.tcmu import MAX_SECTORS
from bdserver.vdev.device import VirtualDevice
from tests.lab.sgio import sg_io
from tests.lab.helpers import (
    ProbeDevice, assert_same_tree, configfs_residue, dd, drop_caches, kernel_log, mounted, settle, uio_names,
    parallel_direct_reads, device_holder,
)

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("tcmu_lab")]
BS = 4096


@contextmanager
def attached(backend, device, dev_id: str) -> Iterator[object]:
    att = backend.attach(device, dev_id)  # returns once udev has probed the disk: reads are ours
    try:
        yield att
    finally:
        backend.detach(att)


def file_device(image: Path) -> ProbeDevice:
    return ProbeDevice(VirtualDevice.from_files([str(image)]))


def sysfs(dev: str, rel: str) -> str:
    return Path(f"/sys/block/{os.path.basename(dev)}/{rel}").read_text(errors="replace").strip()


def test_mount_and_compare_tree(tcmu_backend, erofs_pair, tmp_path) -> None:
    image, src = erofs_pair
    dev = file_device(image)
    with attached(tcmu_backend, dev, "tree") as att:
        assert att.path.startswith("/dev/sd") and att.backend == "tcmu"
        with mounted(att.path, tmp_path / "mnt") as mnt:
            assert_same_tree(src, mnt)
    assert dev.read_count() > 0


def test_disk_identity_in_sysfs(tcmu_backend, erofs_pair) -> None:
    image, _ = erofs_pair
    dev = file_device(image)
    with attached(tcmu_backend, dev, "ident") as att:
        assert sysfs(att.path, "ro") == "1"  # MODE SENSE write-protect bit seen by sd
        assert sysfs(att.path, "queue/logical_block_size") == str(BS)
        assert sysfs(att.path, "queue/rotational") == "0"  # VPD B1
        assert int(sysfs(att.path, "size")) * 512 == image.stat().st_size
        assert sysfs(att.path, "device/vendor") == "BDSERVER"
        assert sysfs(att.path, "device/model") == "lazy EROFS disk"
        assert sysfs(att.path, "device/wwid") == att.extra["wwid"]  # VPD 83 NAA descriptor
        assert att.extra["serial"] in sysfs(att.path, "device/vpd_pg80")
        assert int(sysfs(att.path, "queue/max_sectors_kb")) <= MAX_SECTORS * BS // 1024  # VPD B0 limit
        assert att.extra["uio"].startswith("/dev/uio")


def test_attach_returns_once_udev_has_probed_the_disk(tcmu_backend, erofs_pair) -> None:
    """The lab runs udevd like any node, and udev reads every new disk (blkid, scsi_id). Attach
    returns only after udev has processed the disk, matched by the WWID the backend gave it: what
    reads the disk afterwards is the caller alone."""
    import pyudev

    assert udev.udev_running(), "the lab guest runs no udev daemon (see vagrant/lab-guest)"
    image, _ = erofs_pair
    dev = file_device(image)
    att = tcmu_backend.attach(dev, "udev")
    try:
        reads = dev.read_count()
        disk = pyudev.Devices.from_device_file(pyudev.Context(), att.path)
        assert disk.is_initialized  # udev's database has the disk: its rules have run
        assert disk.properties.get("ID_FS_TYPE") == "erofs"  # blkid read it
        assert disk.properties.get("ID_SCSI_SERIAL") == att.extra["serial"]
        assert disk.properties.get("ID_WWN_WITH_EXTENSION") == "0x" + att.extra["wwid"].removeprefix("naa.")
        time.sleep(5)
        assert dev.read_count() == reads, dev.reads[reads:]  # nobody probed the disk after attach
    finally:
        tcmu_backend.detach(att)


def test_second_read_fetches_nothing(tcmu_backend, erofs_pair, tmp_path) -> None:
    image, src = erofs_pair
    dev = file_device(image)
    with attached(tcmu_backend, dev, "twice") as att:
        with mounted(att.path, tmp_path / "mnt") as mnt:
            first = (mnt / "d" / "big").read_bytes()
            settle(att.path)  # let readahead finish before counting
            after_first = dev.read_count()
            second = (mnt / "d" / "big").read_bytes()
            assert first == second == (src / "d" / "big").read_bytes()
            assert dev.read_count() == after_first  # served from the page cache: no device read


def test_whole_disk_equals_image(tcmu_backend, erofs_pair, tmp_path) -> None:
    image, _ = erofs_pair
    with attached(tcmu_backend, file_device(image), "dd") as att:
        out = tmp_path / "disk.bin"
        r = dd([f"if={att.path}", f"of={out}", "bs=1M", "iflag=direct"])
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(image.read_bytes()).hexdigest()
        # odd sizes and offsets through the page cache too (READ of 1 block at the end)
        last = image.stat().st_size // BS - 1
        r = dd([f"if={att.path}", f"bs={BS}", f"skip={last}", "count=1"])
        assert r.returncode == 0 and r.stdout == image.read_bytes()[last * BS:]
        # reading past the end is an empty read, not an error
        r = dd([f"if={att.path}", f"bs={BS}", f"skip={last + 1}", "count=1", "iflag=direct"])
        assert r.returncode == 0 and r.stdout == b""


def read10(lba: int, blocks: int) -> bytes:
    return bytes([0x28, 0]) + struct.pack(">I", lba) + b"\0" + struct.pack(">H", blocks) + b"\0"


def test_writes_fail_cleanly(tcmu_backend, erofs_pair) -> None:
    image, _ = erofs_pair
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    with attached(tcmu_backend, file_device(image), "ro") as att:
        # the block layer already knows the disk is read-only (MODE SENSE WP bit)
        r = dd(["if=/dev/zero", f"of={att.path}", f"bs={BS}", "count=1", "oflag=direct"])
        assert r.returncode != 0 and b"Read-only file system" in r.stderr
        # below the block layer the disk itself refuses: DATA PROTECT / WRITE PROTECTED
        write10 = bytes([0x2A, 0]) + struct.pack(">I", 0) + b"\0" + struct.pack(">H", 1) + b"\0"
        res = sg_io(att.path, write10, data_out=bytes(BS))
        assert res.status == 0x02 and res.sense_key_asc == (0x7, 0x27, 0x00)
        write_same16 = bytes([0x93, 0]) + struct.pack(">QI", 0, 1) + b"\0\0"
        res = sg_io(att.path, write_same16, data_out=bytes(BS))
        assert res.status == 0x02 and res.sense_key_asc == (0x7, 0x27, 0x00)
        # and the other answers a real initiator gets back through the kernel
        res = sg_io(att.path, bytes([0xC0]) + bytes(15))
        assert res.status == 0x02 and res.sense_key_asc == (0x5, 0x20, 0x00)  # invalid opcode
        nblocks = image.stat().st_size // BS
        res = sg_io(att.path, read10(nblocks - 1, 2), data_in=2 * BS)
        assert res.status == 0x02 and res.sense_key_asc == (0x5, 0x21, 0x00)  # LBA out of range
        res = sg_io(att.path, read10(1, 1), data_in=BS)
        assert res.status == 0 and res.data == image.read_bytes()[BS:2 * BS]
        res = sg_io(att.path, bytes([0x35]) + bytes(9))  # SYNCHRONIZE CACHE: nothing to flush
        assert res.status == 0
        # the disk still reads fine afterwards
        r = dd([f"if={att.path}", "of=/dev/null", f"bs={BS}", "count=4", "iflag=direct"])
        assert r.returncode == 0
        assert sysfs(att.path, "device/state") == "running"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_detach_leaves_no_residue(tcmu_backend, erofs_pair, tmp_path) -> None:
    image, _ = erofs_pair
    before_uio = uio_names()
    att = tcmu_backend.attach(file_device(image), "gone")
    disk = att.path
    name = os.path.basename(disk)
    assert configfs_residue("bd-gone") and os.path.exists(disk)
    with mounted(disk, tmp_path / "mnt"):
        pass
    tcmu_backend.detach(att)
    assert configfs_residue() == []
    assert not os.path.exists(disk) and not os.path.exists(f"/sys/block/{name}")
    assert uio_names() == before_uio
    tcmu_backend.detach(att)  # idempotent


def test_two_devices_two_disks(tcmu_backend, erofs_pair, erofs_pair2, tmp_path) -> None:
    (img1, src1), (img2, src2) = erofs_pair, erofs_pair2
    with attached(tcmu_backend, file_device(img1), "one") as a1, \
            attached(tcmu_backend, file_device(img2), "two") as a2:
        assert a1.path != a2.path
        assert a1.extra["wwid"] != a2.extra["wwid"]
        with mounted(a1.path, tmp_path / "m1") as m1, mounted(a2.path, tmp_path / "m2") as m2:
            assert_same_tree(src1, m1)
            assert_same_tree(src2, m2)
    assert configfs_residue() == []


def test_read_fault_is_medium_error_then_heals(tcmu_backend, erofs_pair, tmp_path) -> None:
    """A failed fetch: MEDIUM ERROR / UNRECOVERED READ ERROR at the failing LBA; the raw disk reader
    gets ENODATA (the block layer's errno for BLK_STS_MEDIUM), a file reader on EROFS gets EIO; the
    next read after healing succeeds and the SCSI device keeps running."""
    image, src = erofs_pair
    data = image.read_bytes()
    big = (src / "d" / "big").read_bytes()
    off = data.find(big[:BS])  # d/big is stored plain: its first block is in the image as is
    assert off > 0 and off % BS == 0
    blk = off // BS
    dev = file_device(image)
    with attached(tcmu_backend, dev, "fault") as att:
        dev.fail_range = (off, off + BS)
        res = sg_io(att.path, read10(blk, 1), data_in=BS)
        assert res.status == 0x02 and res.sense_key_asc == (0x3, 0x11, 0x00)
        assert res.sense[0] & 0x80 and struct.unpack(">I", res.sense[3:7])[0] == blk  # INFORMATION
        r = dd([f"if={att.path}", "of=/dev/null", f"bs={BS}", f"skip={blk}", "count=1", "iflag=direct"])
        assert r.returncode != 0 and b"No data available" in r.stderr, r.stderr
        log = kernel_log()
        assert "Medium Error" in log and "Unrecovered read error" in log
        with mounted(att.path, tmp_path / "mnt") as mnt:
            with pytest.raises(OSError) as exc:
                (mnt / "d" / "big").read_bytes()
            assert exc.value.errno == errno.EIO
            # a read next to the fault is unaffected, and the device is still running
            r = dd([f"if={att.path}", f"bs={BS}", f"skip={blk - 1}", "count=1", "iflag=direct"])
            assert r.returncode == 0 and r.stdout == data[(blk - 1) * BS:blk * BS]
            assert sysfs(att.path, "device/state") == "running"
            dev.fail_range = None  # healed: the same reads now succeed
            r = dd([f"if={att.path}", f"bs={BS}", f"skip={blk}", "count=1", "iflag=direct"])
            assert r.returncode == 0 and r.stdout == data[blk * BS:(blk + 1) * BS]
            assert (mnt / "d" / "big").read_bytes() == big
    assert configfs_residue() == []


def test_slow_read_does_not_block_others(tcmu_backend, erofs_pair) -> None:
    """Out-of-order completion: while one read waits (a miss), another read completes."""
    image, _ = erofs_pair
    data = image.read_bytes()
    dev = file_device(image)
    slow_blk, fast_blk = 3, len(data) // BS - 2
    with attached(tcmu_backend, dev, "ooo") as att:
        dev.park_range = (slow_blk * BS, (slow_blk + 1) * BS)
        slow = subprocess.Popen(["dd", f"if={att.path}", "of=/dev/null", f"bs={BS}", f"skip={slow_blk}",
                                 "count=1", "iflag=direct", "status=none"])
        try:
            assert dev.parked.wait(20), "the slow read never reached the device"
            r = dd([f"if={att.path}", f"bs={BS}", f"skip={fast_blk}", "count=1",
                    "iflag=direct"])
            assert r.returncode == 0 and r.stdout == data[fast_blk * BS:(fast_blk + 1) * BS]
            assert slow.poll() is None  # the slow one is still waiting: the fast one overtook it
        finally:
            dev.release.set()
            dev.park_range = None
        assert slow.wait(60) == 0


def test_parallel_readers(tcmu_backend, erofs_pair) -> None:
    """Many concurrent direct reads at random places return the right bytes."""
    image, _ = erofs_pair
    with attached(tcmu_backend, file_device(image), "par") as att:
        errors = parallel_direct_reads(att.path, image.read_bytes(), sizes=(1, 2, 16), block=BS)
    assert errors == []


def test_restarted_handler_adopts_device(tcmu_backend, erofs_pair, tmp_path) -> None:
    """A handler process dies with the disk mounted and a read in flight; a new handler adopts
    the same /dev/sdX (ring reset: the stuck read is retried and served), the mount keeps working."""
    import signal

    image, src = erofs_pair
    data = image.read_bytes()
    with device_holder("tcmu", image, "adopt") as (holder, first):
        path = first["path"]
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "erofs", "-o", "ro", path, str(mnt)], check=True)
        try:
            assert (mnt / "text").read_text() == (src / "text").read_text()
            os.kill(holder.pid, signal.SIGKILL)  # the process this test started
            holder.wait(60)
            # a read that reaches the now unserved ring and waits there
            blk = len(data) // BS - 3
            stuck = subprocess.Popen(["dd", f"if={path}", f"bs={BS}", f"skip={blk}", "count=1", "iflag=direct",
                                      "status=none"], stdout=subprocess.PIPE)
            for _ in range(600):
                if Path(f"/sys/block/{os.path.basename(path)}/inflight").read_text().split() != ["0", "0"]:
                    break
                __import__("time").sleep(0.05)
            dev = file_device(image)
            att = tcmu_backend.attach(dev, "adopt")
            try:
                assert att.path == path and att.extra.get("adopted")
                out, _ = stuck.communicate(timeout=120)
                assert stuck.returncode == 0 and out == data[blk * BS:(blk + 1) * BS]
                drop_caches()
                assert_same_tree(src, mnt)  # the old mount reads through the new handler
                assert dev.read_count() > 0
            finally:
                subprocess.run(["umount", str(mnt)], check=False)
                tcmu_backend.detach(att)
        finally:
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
    assert configfs_residue() == []
    assert not os.path.exists(path)
