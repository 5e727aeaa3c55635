"""The raw-syscall io_uring binding on this machine's kernel (NOPs, polls, 128-byte SQEs)."""

from __future__ import annotations

import os
import struct

import pytest

from bdserver.backends import uring
from bdserver.backends.ublk_abi import CtrlCmd, U_CMD_ADD_DEV


def _ring(entries: int, flags: int = 0) -> uring.IoUring:
    ok, why = uring.supported()
    if not ok:
        pytest.fail(why)
    try:
        return uring.IoUring(entries, flags)
    except OSError as exc:  # e.g. io_uring disabled for this user by sysctl or seccomp
        pytest.fail(f"io_uring_setup: {exc}")


def test_sqe_layout() -> None:
    raw = uring.uring_cmd_sqe(9, U_CMD_ADD_DEV, CtrlCmd(dev_id=1).pack(), user_data=77, size=128)
    assert len(raw) == 128
    assert raw[0] == uring.IORING_OP_URING_CMD
    assert struct.unpack_from("<i", raw, 4)[0] == 9
    assert struct.unpack_from("<I", raw, 8)[0] == U_CMD_ADD_DEV
    assert struct.unpack_from("<Q", raw, 32)[0] == 77
    assert raw[48:80] == CtrlCmd(dev_id=1).pack() and raw[80:] == bytes(48)
    poll = uring.poll_add_sqe(5, 3)
    assert len(poll) == 64 and poll[0] == uring.IORING_OP_POLL_ADD
    assert struct.unpack_from("<I", poll, 28)[0] == uring.POLLIN
    with pytest.raises(ValueError):
        uring.sqe_bytes(uring.IORING_OP_NOP, -1, cmd=bytes(17))  # a 64-byte SQE holds 16


@pytest.mark.parametrize("flags", [0, uring.IORING_SETUP_SQE128])
def test_nops_round_trip(flags: int) -> None:
    ring = _ring(8, flags)
    try:
        size = ring.sqe_size
        assert size == (128 if flags else 64)
        for batch in range(3):  # wraps the 8-entry ring several times
            for i in range(8):
                ring.queue(uring.sqe_bytes(uring.IORING_OP_NOP, -1, user_data=batch * 100 + i, size=size))
            assert ring.submit(8) == 8
            got = sorted(c.user_data for c in ring.completions())
            assert got == [batch * 100 + i for i in range(8)]
    finally:
        ring.close()


def test_poll_on_eventfd_and_timeout() -> None:
    ring = _ring(4)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        ring.queue(uring.poll_add_sqe(efd, 42))
        assert ring.wait(42, 0.05) is None  # nothing yet: a bounded wait returns empty-handed
        os.eventfd_write(efd, 1)
        cqe = ring.wait(42, 5.0)
        assert cqe is not None and cqe.res & uring.POLLIN
    finally:
        os.close(efd)
        ring.close()


def test_packed_cmd_sqe_equals_the_built_one() -> None:
    """The hot path packs a URING_CMD SQE in one go; it must equal uring_cmd_sqe(IoCmd(...))."""
    from bdserver.backends.ublk_abi import U_IO_COMMIT_AND_FETCH_REQ, IoCmd

    built = uring.uring_cmd_sqe(7, U_IO_COMMIT_AND_FETCH_REQ, IoCmd(0, 9, -5, 0x7F00DEAD0000).pack(), 9)
    packed = uring.SQE_CMD16.pack(uring.IORING_OP_URING_CMD, 0, 0, 7, U_IO_COMMIT_AND_FETCH_REQ, 0, 0, 0, 9,
                                  0, 0, 0, 0, 9, -5, 0x7F00DEAD0000)
    assert packed == built and len(packed) == 64


def test_queue_struct_round_trip() -> None:
    ring = _ring(4)
    nop = struct.Struct("<BBHiQQIIQHHiQQ")
    try:
        for i in range(6):
            ring.queue_struct(nop, uring.IORING_OP_NOP, 0, 0, -1, 0, 0, 0, 0, 1000 + i, 0, 0, 0, 0, 0)
            cqe = ring.wait(1000 + i, 5.0)
            assert cqe is not None and cqe.res == 0
    finally:
        ring.close()
