"""The ublk kernel ABI (include/uapi/linux/ublk_cmd.h) as dataclasses packed with `struct`.

Only what the ublk backend uses: control commands sent to /dev/ublk-control as io_uring URING_CMDs
(payload `CtrlCmd`, 32 bytes, needs 128-byte SQEs), the device info and parameter blocks they point
at, and the per-tag I/O commands (`IoCmd`, 16 bytes) and descriptors (`IoDesc`, 24 bytes) of the
data path. Everything here is pure: host unit tests check the layouts and command numbers without
a ublk kernel. Layouts follow shared/reference/tcmu-ublk.md Part B.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# -- command numbers ---------------------------------------------------------------------------
# Since 6.4 commands are ioctl-encoded: _IOC(dir, 'u', nr, sizeof(payload)). 6.0-6.3 only know the
# bare numbers ("legacy"); we send encoded numbers and fall back when ADD_DEV says EOPNOTSUPP/EINVAL.

_IOC_WRITE = 1
_IOC_READ = 2


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """Linux _IOC(): dir in bits 30-31, size in 16-29, type in 8-15, nr in 0-7."""
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def _ior(nr: int, size: int) -> int:
    return ioc(_IOC_READ, ord("u"), nr, size)


def _iowr(nr: int, size: int) -> int:
    return ioc(_IOC_READ | _IOC_WRITE, ord("u"), nr, size)


CTRL_CMD_SIZE = 32
IO_CMD_SIZE = 16

# control (legacy nr; encoded op)
CMD_GET_DEV_INFO = 0x02
CMD_ADD_DEV = 0x04
CMD_DEL_DEV = 0x05
CMD_START_DEV = 0x06
CMD_STOP_DEV = 0x07
CMD_SET_PARAMS = 0x08
CMD_GET_PARAMS = 0x09
CMD_START_USER_RECOVERY = 0x10
CMD_END_USER_RECOVERY = 0x11

U_CMD_GET_DEV_INFO = _ior(CMD_GET_DEV_INFO, CTRL_CMD_SIZE)
U_CMD_ADD_DEV = _iowr(CMD_ADD_DEV, CTRL_CMD_SIZE)
U_CMD_DEL_DEV = _iowr(CMD_DEL_DEV, CTRL_CMD_SIZE)
U_CMD_START_DEV = _iowr(CMD_START_DEV, CTRL_CMD_SIZE)
U_CMD_STOP_DEV = _iowr(CMD_STOP_DEV, CTRL_CMD_SIZE)
U_CMD_SET_PARAMS = _iowr(CMD_SET_PARAMS, CTRL_CMD_SIZE)
U_CMD_GET_PARAMS = _ior(CMD_GET_PARAMS, CTRL_CMD_SIZE)
U_CMD_START_USER_RECOVERY = _iowr(CMD_START_USER_RECOVERY, CTRL_CMD_SIZE)
U_CMD_END_USER_RECOVERY = _iowr(CMD_END_USER_RECOVERY, CTRL_CMD_SIZE)
U_CMD_GET_FEATURES = _ior(0x13, CTRL_CMD_SIZE)

LEGACY_CTRL = {
    U_CMD_GET_DEV_INFO: CMD_GET_DEV_INFO, U_CMD_ADD_DEV: CMD_ADD_DEV, U_CMD_DEL_DEV: CMD_DEL_DEV,
    U_CMD_START_DEV: CMD_START_DEV, U_CMD_STOP_DEV: CMD_STOP_DEV, U_CMD_SET_PARAMS: CMD_SET_PARAMS,
    U_CMD_GET_PARAMS: CMD_GET_PARAMS, U_CMD_START_USER_RECOVERY: CMD_START_USER_RECOVERY,
    U_CMD_END_USER_RECOVERY: CMD_END_USER_RECOVERY,
}

# I/O
IO_FETCH_REQ = 0x20
IO_COMMIT_AND_FETCH_REQ = 0x21
U_IO_FETCH_REQ = _iowr(IO_FETCH_REQ, IO_CMD_SIZE)
U_IO_COMMIT_AND_FETCH_REQ = _iowr(IO_COMMIT_AND_FETCH_REQ, IO_CMD_SIZE)

# FETCH / COMMIT_AND_FETCH completion results
IO_RES_OK = 0
IO_RES_NEED_GET_DATA = 1
IO_RES_ABORT = -19  # -ENODEV: the tag is cancelled (STOP_DEV or the ring going away); do not re-arm

# request ops (low 8 bits of IoDesc.op_flags)
OP_READ = 0
OP_WRITE = 1
OP_FLUSH = 2
OP_DISCARD = 3
OP_WRITE_SAME = 4
OP_WRITE_ZEROES = 5

# device flags (ublksrv_ctrl_dev_info.flags)
F_SUPPORT_ZERO_COPY = 1 << 0
F_URING_CMD_COMP_IN_TASK = 1 << 1
F_NEED_GET_DATA = 1 << 2
F_USER_RECOVERY = 1 << 3
F_USER_RECOVERY_REISSUE = 1 << 4
F_UNPRIVILEGED_DEV = 1 << 5
F_CMD_IOCTL_ENCODE = 1 << 6
F_USER_COPY = 1 << 7

# device states
S_DEV_DEAD = 0
S_DEV_LIVE = 1
S_DEV_QUIESCED = 2
S_DEV_FAIL_IO = 3

# params
PARAM_TYPE_BASIC = 1 << 0
ATTR_READ_ONLY = 1 << 0
ATTR_ROTATIONAL = 1 << 1

DEV_ID_ANY = 0xFFFFFFFF
QUEUE_ID_NONE = 0xFFFF
MAX_QUEUE_DEPTH = 4096
IO_DESC_SIZE = 24
CMD_BUF_OFFSET = 0  # UBLKSRV_CMD_BUF_OFFSET: per-queue descriptor arrays in the ublkc mmap space


def page_round(n: int, page: int = 4096) -> int:
    return -(-n // page) * page


def desc_map_length(depth: int, page: int = 4096) -> int:
    """Length to mmap for one queue's descriptor array (the kernel insists on this exact size)."""
    return page_round(depth * IO_DESC_SIZE, page)


def desc_map_offset(q_id: int, page: int = 4096) -> int:
    """mmap offset of queue ``q_id``'s descriptors: queues are spaced for the maximum depth."""
    return CMD_BUF_OFFSET + q_id * page_round(MAX_QUEUE_DEPTH * IO_DESC_SIZE, page)


# -- structures --------------------------------------------------------------------------------

@dataclass
class CtrlCmd:
    """struct ublksrv_ctrl_cmd: the payload of every control command (SQE bytes 48..80)."""

    FMT = "<IHHQQHHI"

    dev_id: int = DEV_ID_ANY
    queue_id: int = QUEUE_ID_NONE
    len: int = 0
    addr: int = 0
    data0: int = 0
    dev_path_len: int = 0

    def pack(self) -> bytes:
        return struct.pack(self.FMT, self.dev_id, self.queue_id, self.len, self.addr, self.data0,
                           self.dev_path_len, 0, 0)

    @classmethod
    def unpack(cls, raw: bytes) -> "CtrlCmd":
        dev_id, qid, ln, addr, data0, dpl, _, _ = struct.unpack_from(cls.FMT, raw)
        return cls(dev_id, qid, ln, addr, data0, dpl)


@dataclass
class DevInfo:
    """struct ublksrv_ctrl_dev_info (64 bytes): ADD_DEV's request and the kernel's answer."""

    FMT = "<HHHHIIiIQQIIQQ"
    SIZE = 64

    nr_hw_queues: int = 1
    queue_depth: int = 64
    state: int = 0
    max_io_buf_bytes: int = 512 * 1024
    dev_id: int = DEV_ID_ANY
    ublksrv_pid: int = 0
    flags: int = 0
    ublksrv_flags: int = 0
    owner_uid: int = 0
    owner_gid: int = 0

    def pack(self) -> bytes:
        return struct.pack(self.FMT, self.nr_hw_queues, self.queue_depth, self.state, 0,
                           self.max_io_buf_bytes, self.dev_id, self.ublksrv_pid, 0, self.flags,
                           self.ublksrv_flags, self.owner_uid, self.owner_gid, 0, 0)

    @classmethod
    def unpack(cls, raw: bytes) -> "DevInfo":
        (nrq, depth, state, _pad0, maxio, dev_id, pid, _pad1, flags, sflags, uid, gid, _r1,
         _r2) = struct.unpack_from(cls.FMT, raw)
        return cls(nrq, depth, state, maxio, dev_id, pid, flags, sflags, uid, gid)


@dataclass
class ParamBasic:
    """struct ublk_param_basic (32 bytes)."""

    FMT = "<IBBBBIIQQ"
    SIZE = 32

    attrs: int = ATTR_READ_ONLY
    logical_bs_shift: int = 12
    physical_bs_shift: int = 12
    io_opt_shift: int = 12
    io_min_shift: int = 12
    max_sectors: int = 1024
    chunk_sectors: int = 0
    dev_sectors: int = 0
    virt_boundary_mask: int = 0

    def pack(self) -> bytes:
        return struct.pack(self.FMT, self.attrs, self.logical_bs_shift, self.physical_bs_shift,
                           self.io_opt_shift, self.io_min_shift, self.max_sectors, self.chunk_sectors,
                           self.dev_sectors, self.virt_boundary_mask)

    @classmethod
    def unpack(cls, raw: bytes, offset: int = 0) -> "ParamBasic":
        return cls(*struct.unpack_from(cls.FMT, raw, offset))


@dataclass
class Params:
    """struct ublk_params, basic part only: header {len, types} + ublk_param_basic.

    ``len`` is what we fill (40 bytes); kernels copy min(len, their sizeof), so this works on old
    and new kernels alike. GET_PARAMS answers into a larger buffer (see `unpack`).
    """

    basic: ParamBasic
    types: int = PARAM_TYPE_BASIC

    SIZE = 8 + ParamBasic.SIZE

    def pack(self) -> bytes:
        return struct.pack("<II", self.SIZE, self.types) + self.basic.pack()

    @classmethod
    def unpack(cls, raw: bytes) -> "Params":
        _ln, types = struct.unpack_from("<II", raw)
        return cls(ParamBasic.unpack(raw, 8), types)


@dataclass
class IoCmd:
    """struct ublksrv_io_cmd (16 bytes, SQE bytes 48..64): FETCH / COMMIT_AND_FETCH of one tag."""

    FMT = "<HHiQ"

    q_id: int
    tag: int
    result: int = 0
    addr: int = 0

    def pack(self) -> bytes:
        return struct.pack(self.FMT, self.q_id, self.tag, self.result, self.addr)

    @classmethod
    def unpack(cls, raw: bytes) -> "IoCmd":
        return cls(*struct.unpack_from(cls.FMT, raw))


@dataclass
class IoDesc:
    """struct ublksrv_io_desc (24 bytes), written by the kernel per tag before a FETCH completes."""

    FMT = "<IIQQ"

    op_flags: int
    nr_sectors: int
    start_sector: int
    addr: int

    @property
    def op(self) -> int:
        return self.op_flags & 0xFF

    @property
    def offset(self) -> int:
        return self.start_sector * 512

    @property
    def length(self) -> int:
        return self.nr_sectors * 512

    @classmethod
    def unpack_from(cls, buf, tag: int) -> "IoDesc":
        return cls(*struct.unpack_from(cls.FMT, buf, tag * IO_DESC_SIZE))

    def pack(self) -> bytes:
        return struct.pack(self.FMT, self.op_flags, self.nr_sectors, self.start_sector, self.addr)


assert struct.calcsize(CtrlCmd.FMT) == CTRL_CMD_SIZE
assert struct.calcsize(DevInfo.FMT) == DevInfo.SIZE
assert struct.calcsize(ParamBasic.FMT) == ParamBasic.SIZE
assert struct.calcsize(IoCmd.FMT) == IO_CMD_SIZE
assert struct.calcsize(IoDesc.FMT) == IO_DESC_SIZE
