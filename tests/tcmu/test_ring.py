"""The TCMU ring protocol against a fake kernel producer in a bytearray (no UIO needed).

The fake shares the production layout tables, so each test names the lab test (tests/lab/,
Debian's 6.12 kernel) that checks the same behaviour against the real target_core_user.
"""

from __future__ import annotations

import random
import struct

import pytest

from bdserver.backends import scsi
from bdserver.backends.scsi import ReadRequest, ScsiDisk
from bdserver.backends.tcmu_ring import Ring, RingError, format_empty_ring
from tests.tcmu.fake_kernel import FakeKernel

CMDR = 4096
DATA_BLOCKS = 64


def make() -> tuple[bytearray, FakeKernel, Ring]:
    buf = bytearray(128 + CMDR + DATA_BLOCKS * 4096)
    kernel = FakeKernel(buf, cmdr_size=CMDR)
    return buf, kernel, Ring(buf)


def read10(lba: int, blocks: int) -> bytes:
    return bytes([0x28, 0]) + struct.pack(">I", lba) + b"\0" + struct.pack(">H", blocks) + b"\0"


def test_mailbox_checks() -> None:
    """Real kernel: every lab TCMU test starts by accepting the kernel's mailbox (test_tcmu.py)."""
    buf = bytearray(128 + CMDR)
    format_empty_ring(buf, CMDR)
    struct.pack_into("<H", buf, 0, 1)
    with pytest.raises(RingError, match="version"):
        Ring(buf)
    format_empty_ring(buf, CMDR, flags=0)
    with pytest.raises(RingError, match="out-of-order"):
        Ring(buf)
    format_empty_ring(buf, CMDR * 2)
    with pytest.raises(RingError, match="geometry"):
        Ring(buf)


def test_in_order_roundtrip() -> None:
    """Real kernel: test_tcmu.py::test_disk_identity_in_sysfs (INQUIRY data through the ring)."""
    _buf, kernel, ring = make()
    cid = kernel.submit(bytes([0x12, 0, 0, 0, 36, 0]), 36)
    (cmd,) = ring.take()
    assert cmd.cmd_id == cid and cmd.cdb == bytes([0x12, 0, 0, 0, 36, 0]) and cmd.data_length == 36
    assert ring.take() == []
    ring.fill(cmd, b"A" * 36)
    ring.complete(cmd.cmd_id, scsi.GOOD)
    assert kernel.reap() == {cid: (0, b"", b"A" * 36)}


def test_out_of_order_completion_and_pad_wrap() -> None:
    """Many commands across several ring wraps, completed in random order: each gets its own
    data and status; PAD entries at the wrap are skipped on both sides. Real kernel:
    test_tcmu.py::test_slow_read_does_not_block_others (out of order), ::test_whole_disk_equals_image
    and ::test_parallel_readers (many wraps), ::test_read_fault_is_medium_error_then_heals (sense)."""
    _buf, kernel, ring = make()
    disk = ScsiDisk(size=DATA_BLOCKS * 4096, serial="ring")
    rng = random.Random(7)
    seen = 0
    for _round in range(40):
        ids = {}
        for _ in range(rng.randint(1, 6)):
            lba = rng.randrange(DATA_BLOCKS - 2)
            ids[kernel.submit(read10(lba, 2), 8192)] = lba
        cmds = ring.take()
        assert sorted(c.cmd_id for c in cmds) == sorted(ids)
        rng.shuffle(cmds)
        for c in cmds:
            req = disk.handle(c.cdb)
            assert isinstance(req, ReadRequest)
            if ids[c.cmd_id] % 5 == 0:
                r = disk.read_error_reply(req)
            else:
                r = disk.read_reply(req, bytes([ids[c.cmd_id] & 0xFF]) * req.length)
                ring.fill(c, r.data)
            ring.complete(c.cmd_id, r.status, r.sense.to_bytes() if r.sense else None)
        done = kernel.reap()
        assert set(done) == set(ids)
        for cid, (status, sense, data) in done.items():
            if ids[cid] % 5 == 0:
                assert status == scsi.CHECK_CONDITION
                assert scsi.Sense.parse(sense[:18]) == scsi.Sense(3, 0x11, 0, ids[cid])
            else:
                assert status == scsi.GOOD and data == bytes([ids[cid] & 0xFF]) * 8192
        seen += len(ids)
    assert kernel.head != 0 and seen > 40  # the ring wrapped (40 rounds x ~200 bytes > 4 KiB)


def test_short_data_in_uses_read_len() -> None:
    """Real kernel: test_tcmu.py::test_disk_identity_in_sysfs (VPD pages shorter than allocated)."""
    _buf, kernel, ring = make()
    cid = kernel.submit(bytes([0x12, 1, 0x80, 0, 255, 0]), 255)
    (cmd,) = ring.take()
    n = ring.fill(cmd, b"S" * 20)
    ring.complete(cmd.cmd_id, scsi.GOOD, read_len=n)
    assert kernel.reap()[cid][2] == b"S" * 20


def test_iovec_outside_data_area_is_refused() -> None:
    """No real-kernel twin: a correct kernel never sends this; the handler must not trust it."""
    buf, kernel, ring = make()
    kernel.submit(read10(0, 1), 4096)
    # point the iovec into the command ring: touching it would corrupt the ring (or SIGBUS)
    struct.pack_into("<Q", buf, 128 + 48, 128)
    with pytest.raises(RingError, match="outside"):
        ring.take()


def test_completion_without_command_is_refused() -> None:
    """No real-kernel twin: the handler's own invariant (completing what it never took)."""
    _buf, _kernel, ring = make()
    with pytest.raises(RingError):
        ring.complete(1, scsi.GOOD)
