"""The FUSE backend on the real kernel: EROFS file-backed mount of the served file, concurrency with a
parked slow miss, EIO on failed reads, and clean teardown (no mount, connection or thread left)."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from bdserver.vdev import VirtualDevice
from bdserver.errors import FetchError, IntegrityError
from bdserver import mounts
from tests.node.conftest import assert_same_tree, fuse_connections, loop_count

MiB = 1024 * 1024


class FaultyDevice:
    """Wraps a device: reads touching [start, end) park on ``gate`` or fail with ``error``."""

    def __init__(self, inner, start: int, end: int, *, gate: threading.Event | None = None,
                 error: Exception | None = None) -> None:
        self.inner, self.start, self.end, self.gate, self.error = inner, start, end, gate, error
        self.parked = threading.Event()
        self.size = inner.size

    def read(self, offset: int, length: int) -> bytes:
        if offset < self.end and offset + length > self.start:
            if self.error is not None:
                raise self.error
            if self.gate is not None:
                self.parked.set()
                assert self.gate.wait(60), "gate never opened"
        return self.inner.read(offset, length)


class ParkingDevice:
    """Wraps a device: every read waits for ``gate`` (a registry fetch that does not come back);
    ``waiting`` counts the reads parked right now."""

    def __init__(self, inner, gate: threading.Event) -> None:
        self.inner, self.gate, self.size = inner, gate, inner.size
        self.waiting = 0
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.waiting += 1
        try:
            assert self.gate.wait(120), "gate never opened"
        finally:
            with self._lock:
                self.waiting -= 1
        return self.inner.read(offset, length)


def wait_until(probe: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.05)
    return probe()


def test_erofs_mount_of_fuse_file_equals_source(fuse_backend, erofs_image, tmp_path: Path) -> None:
    image, src = erofs_image
    loops = loop_count()
    dev = VirtualDevice.from_files([str(image)])
    att = fuse_backend.attach(dev, "t0")
    assert os.stat(att.path).st_size == image.stat().st_size
    conn = fuse_backend.connection_id("t0")
    assert conn is not None and conn in fuse_connections()
    fuse_mnt = fuse_backend.mountpoint("t0")
    assert mounts.find_mounts(target=fuse_mnt)[0].fstype == "fuse.bdserver"
    target = tmp_path / "mnt" / "t0"
    how = mounts.mount_erofs(att.path, str(target))
    assert how == "file"  # file-backed EROFS: no loop device
    try:
        assert_same_tree(target, src)
        assert loop_count() == loops
        m = mounts.find_mounts(target=str(target))[0]
        assert m.fstype == "erofs" and m.source == att.path
    finally:
        mounts.unmount(str(target))
    fuse_backend.detach(att)
    dev.close()
    assert not mounts.find_mounts(target=fuse_mnt)
    assert conn not in fuse_connections()
    assert not fuse_backend.conns and not os.path.exists(fuse_mnt)


def test_file_semantics_and_read_only(fuse_backend, tmp_path: Path) -> None:
    data = os.urandom(3 * 4096 + 100)  # not block-aligned: the file ends where the device does

    class BytesDevice:
        size = len(data)

        def read(self, offset: int, length: int) -> bytes:
            return data[offset : offset + length]

        def close(self) -> None:
            pass

    dev = BytesDevice()
    att = fuse_backend.attach(dev, "t1")
    try:
        with open(att.path, "rb") as fh:
            assert fh.read() == data
            assert os.pread(fh.fileno(), 4096, len(data) - 100) == data[-100:]  # short read at the end
            assert os.pread(fh.fileno(), 4096, len(data)) == b""  # at the end: nothing
            assert os.pread(fh.fileno(), 10, len(data) + 5000) == b""
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(OSError) as e:
                os.open(att.path, flags)
            assert e.value.errno in (errno.EROFS, errno.EACCES)
        assert sorted(os.listdir(fuse_backend.root)) == ["t1"]
        assert os.listdir(os.path.dirname(att.path)) == ["disk"]
        with pytest.raises(Exception):
            fuse_backend.attach(dev, "t1")  # ids are unique
    finally:
        fuse_backend.detach(att)
        dev.close()


def test_slow_miss_does_not_block_hits(fuse_backend, tmp_path: Path) -> None:
    size = 32 * MiB
    f = tmp_path / "raw"
    with open(f, "wb") as out:
        out.write(os.urandom(size))
    data = f.read_bytes()
    gate = threading.Event()
    slow_at = 28 * MiB
    dev = FaultyDevice(VirtualDevice.from_files([str(f)]), slow_at, slow_at + 4096, gate=gate)
    att = fuse_backend.attach(dev, "slow")
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def reader(off: int, n: int) -> None:
        try:
            fd = os.open(att.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                results[off] = os.pread(fd, n, off)
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    slow = threading.Thread(target=reader, args=(slow_at, 4096))
    slow.start()
    try:
        assert dev.parked.wait(30), "the slow read never reached the device"
        hits = [threading.Thread(target=reader, args=(i * 512 * 1024, 65536)) for i in range(40)]
        for t in hits:
            t.start()
        for t in hits:
            t.join(60)
        assert not any(t.is_alive() for t in hits), "a hit was blocked behind the parked miss"
        assert slow.is_alive(), "the slow read finished before it was released"
        assert not errors
        for i in range(40):
            off = i * 512 * 1024
            assert results[off] == data[off:off + 65536]
    finally:
        gate.set()
        slow.join(60)
    assert results[slow_at] == data[slow_at:slow_at + 4096]
    fuse_backend.detach(att)


@pytest.mark.parametrize("exc", [FetchError("registry gone"), IntegrityError("bad chunk")])
def test_failed_read_is_eio(fuse_backend, tmp_path: Path, exc: Exception) -> None:
    f = tmp_path / "raw"
    data = os.urandom(4 * MiB)
    f.write_bytes(data)
    bad = 2 * MiB
    dev = FaultyDevice(VirtualDevice.from_files([str(f)]), bad, bad + 4096, error=exc)
    att = fuse_backend.attach(dev, "bad")
    try:
        fd = os.open(att.path, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, bad)
            assert e.value.errno == errno.EIO
            assert os.pread(fd, 4096, 0) == data[:4096]  # the rest of the device still reads
        finally:
            os.close(fd)
    finally:
        fuse_backend.detach(att)


def test_erofs_over_failing_device_gives_eio_to_reader(fuse_backend, erofs_image, tmp_path: Path) -> None:
    """A fetch failure under a mounted EROFS reaches the reading process as EIO."""
    image, src = erofs_image
    probe = mounts  # find the block of dir/big inside the image by content
    raw = image.read_bytes()
    big = (src / "d" / "big").read_bytes()
    pos = raw.find(big[:8192])
    assert pos > 0 and pos % 4096 == 0
    dev = FaultyDevice(VirtualDevice.from_files([str(image)]), pos + 1024 * 1024, pos + 1024 * 1024 + 4096,
                       error=FetchError("network down"))
    att = fuse_backend.attach(dev, "e1")
    target = tmp_path / "mnt" / "e1"
    probe.mount_erofs(att.path, str(target))
    try:
        assert (target / "text").read_text() == "hello bdserver 1\n"
        with pytest.raises(OSError) as e:
            (target / "d" / "big").read_bytes()
        assert e.value.errno == errno.EIO
    finally:
        mounts.unmount(str(target))
        fuse_backend.detach(att)


def test_slow_device_cannot_starve_another_device(fuse_backend, tmp_path: Path) -> None:
    """Issue 9.3: a device whose every read waits on a slow fetch ties up only its own readers; another
    device keeps answering its reads (bounded wait, not a speed assert)."""
    size = 16 * MiB
    slow_raw, fast_raw = tmp_path / "slow", tmp_path / "fast"
    slow_raw.write_bytes(os.urandom(size))
    fast_raw.write_bytes(os.urandom(size))
    fast_data = fast_raw.read_bytes()
    gate = threading.Event()
    slow_dev = ParkingDevice(VirtualDevice.from_files([str(slow_raw)]), gate)
    slow = fuse_backend.attach(slow_dev, "slowdev")
    fast = fuse_backend.attach(VirtualDevice.from_files([str(fast_raw)]), "fastdev")
    errors: list[BaseException] = []

    def pread(path: str, off: int, out: dict[int, bytes]) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # one FUSE request per page
                out[off] = os.pread(fd, 4096, off)
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    slow_out: dict[int, bytes] = {}
    parked = [threading.Thread(target=pread, args=(slow.path, i * 64 * 1024, slow_out)) for i in range(96)]
    try:
        for t in parked:
            t.start()
        assert wait_until(lambda: slow_dev.waiting >= 8, 30), "the slow device's reads never reached it"
        time.sleep(1.0)  # let every reader that can take a slow request take one
        fast_out: dict[int, bytes] = {}
        readers = [threading.Thread(target=pread, args=(fast.path, i * 256 * 1024, fast_out)) for i in range(32)]
        for t in readers:
            t.start()
        deadline = time.monotonic() + 20  # generous: proves "not stuck behind the other device", not speed
        for t in readers:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in readers), \
            f"reads of one device waited behind {slow_dev.waiting} parked reads of another"
        assert not errors
        assert all(fast_out[o] == fast_data[o:o + 4096] for o in fast_out) and len(fast_out) == 32
    finally:
        gate.set()
        for t in parked:
            t.join(60)
    assert not errors and len(slow_out) == 96
    fuse_backend.detach(slow)
    fuse_backend.detach(fast)
