"""The FUSE backend on the real kernel: EROFS file-backed mount of the served file, concurrency with a
parked slow miss, EIO on failed reads, and clean teardown (no mount, connection or thread left)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from bdserver.daemon.sources import FileDevice
from bdserver.errors import FetchError, IntegrityError
from bdserver import mounts
from tests.node.conftest import compare_trees, fuse_connections, loop_count

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


def test_erofs_mount_of_fuse_file_equals_source(fuse_backend, erofs_image, tmp_path: Path) -> None:
    image, src = erofs_image
    loops = loop_count()
    dev = FileDevice(str(image))
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
        compare_trees(src, target)
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
    data = os.urandom(3 * 4096 + 100)
    f = tmp_path / "raw"
    f.write_bytes(data)
    dev = FileDevice(str(f))
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
    dev = FaultyDevice(FileDevice(str(f)), slow_at, slow_at + 4096, gate=gate)
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
    dev = FaultyDevice(FileDevice(str(f)), bad, bad + 4096, error=exc)
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
    big = (src / "dir" / "big").read_bytes()
    pos = raw.find(big[:8192])
    assert pos > 0 and pos % 4096 == 0
    dev = FaultyDevice(FileDevice(str(image)), pos + 1024 * 1024, pos + 1024 * 1024 + 4096,
                       error=FetchError("network down"))
    att = fuse_backend.attach(dev, "e1")
    target = tmp_path / "mnt" / "e1"
    probe.mount_erofs(att.path, str(target))
    try:
        assert (target / "text").read_text() == "hello bdserver\n"
        with pytest.raises(OSError) as e:
            (target / "dir" / "big").read_bytes()
        assert e.value.errno == errno.EIO
    finally:
        mounts.unmount(str(target))
        fuse_backend.detach(att)
