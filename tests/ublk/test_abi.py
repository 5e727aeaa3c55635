"""The ublk ABI structures and command numbers, checked against the kernel's values (no kernel)."""

from __future__ import annotations

import struct

import pytest

from bdserver.backends import ublk_abi as abi


def test_encoded_command_numbers_match_the_kernel_header() -> None:
    # _IOR/_IOWR('u', nr, struct ublksrv_ctrl_cmd) and _IOWR('u', nr, struct ublksrv_io_cmd)
    assert abi.U_CMD_GET_DEV_INFO == 0x80207502
    assert abi.U_CMD_ADD_DEV == 0xC0207504
    assert abi.U_CMD_DEL_DEV == 0xC0207505
    assert abi.U_CMD_START_DEV == 0xC0207506
    assert abi.U_CMD_STOP_DEV == 0xC0207507
    assert abi.U_CMD_SET_PARAMS == 0xC0207508
    assert abi.U_CMD_GET_PARAMS == 0x80207509
    assert abi.U_CMD_START_USER_RECOVERY == 0xC0207510
    assert abi.U_CMD_END_USER_RECOVERY == 0xC0207511
    assert abi.U_CMD_GET_FEATURES == 0x80207513
    assert abi.U_IO_FETCH_REQ == 0xC0107520
    assert abi.U_IO_COMMIT_AND_FETCH_REQ == 0xC0107521


def test_legacy_numbers_are_the_ioctl_nr() -> None:
    for encoded, legacy in abi.LEGACY_CTRL.items():
        assert encoded & 0xFF == legacy
        assert (encoded >> 8) & 0xFF == ord("u")


def test_ctrl_cmd_layout() -> None:
    raw = abi.CtrlCmd(dev_id=7, len=64, addr=0x1122334455667788, data0=4242).pack()
    assert len(raw) == 32
    assert struct.unpack_from("<I", raw, 0)[0] == 7
    assert struct.unpack_from("<H", raw, 4)[0] == 0xFFFF  # queue_id: not a per-queue command
    assert struct.unpack_from("<H", raw, 6)[0] == 64
    assert struct.unpack_from("<Q", raw, 8)[0] == 0x1122334455667788
    assert struct.unpack_from("<Q", raw, 16)[0] == 4242
    assert raw[24:] == bytes(8)
    assert abi.CtrlCmd.unpack(raw) == abi.CtrlCmd(7, 0xFFFF, 64, 0x1122334455667788, 4242, 0)


def test_dev_info_layout_round_trips() -> None:
    info = abi.DevInfo(nr_hw_queues=1, queue_depth=64, state=1, max_io_buf_bytes=512 * 1024, dev_id=3,
                       ublksrv_pid=1234, flags=abi.F_USER_RECOVERY | abi.F_CMD_IOCTL_ENCODE,
                       ublksrv_flags=0xDEADBEEF00000001, owner_uid=0, owner_gid=0)
    raw = info.pack()
    assert len(raw) == 64
    assert struct.unpack_from("<HHH", raw, 0) == (1, 64, 1)
    assert struct.unpack_from("<I", raw, 8)[0] == 512 * 1024
    assert struct.unpack_from("<I", raw, 12)[0] == 3
    assert struct.unpack_from("<i", raw, 16)[0] == 1234
    assert struct.unpack_from("<Q", raw, 24)[0] == 0x48
    assert struct.unpack_from("<Q", raw, 32)[0] == 0xDEADBEEF00000001
    assert abi.DevInfo.unpack(raw) == info


def test_params_basic_layout() -> None:
    p = abi.Params(abi.ParamBasic(attrs=abi.ATTR_READ_ONLY, max_sectors=1024, dev_sectors=8 * 1000))
    raw = p.pack()
    assert len(raw) == 40
    assert struct.unpack_from("<II", raw, 0) == (40, abi.PARAM_TYPE_BASIC)
    assert struct.unpack_from("<I", raw, 8)[0] == abi.ATTR_READ_ONLY
    assert tuple(raw[12:16]) == (12, 12, 12, 12)  # logical, physical, io_opt, io_min shifts
    assert struct.unpack_from("<II", raw, 16) == (1024, 0)
    assert struct.unpack_from("<QQ", raw, 24) == (8000, 0)
    assert abi.Params.unpack(raw + bytes(112)) == p


def test_io_cmd_and_desc_layout() -> None:
    raw = abi.IoCmd(q_id=0, tag=63, result=-5, addr=0x7F0000001000).pack()
    assert raw == struct.pack("<HHiQ", 0, 63, -5, 0x7F0000001000)
    assert abi.IoCmd.unpack(raw).result == -5
    descs = bytearray(4096)
    descs[24 * 5:24 * 6] = abi.IoDesc(op_flags=abi.OP_READ | (1 << 13), nr_sectors=16, start_sector=80,
                                      addr=0x1000).pack()
    d = abi.IoDesc.unpack_from(descs, 5)
    assert (d.op, d.offset, d.length, d.addr) == (abi.OP_READ, 80 * 512, 16 * 512, 0x1000)


@pytest.mark.parametrize("depth,length", [(1, 4096), (64, 4096), (170, 4096), (171, 8192), (4096, 98304)])
def test_descriptor_map_geometry(depth: int, length: int) -> None:
    assert abi.desc_map_length(depth) == length
    assert abi.desc_map_offset(0) == 0
    assert abi.desc_map_offset(1) == 98304  # queues are spaced for the maximum depth
