"""SCSI emulation of the TCMU backend, on the host (no kernel): CDBs in, status/data/sense out."""

from __future__ import annotations

import struct

import pytest

from bdserver.backends import scsi
from bdserver.backends.scsi import ReadRequest, Reply, ScsiDisk, Sense

SIZE = 10 * 4096 + 100  # 11 blocks, the last one partial


@pytest.fixture
def disk() -> ScsiDisk:
    return ScsiDisk(size=SIZE, serial="0123456789abcdef", config="bdserver/bd-test")


def check(reply: Reply | ReadRequest, key: int, asc: tuple[int, int]) -> Sense:
    assert isinstance(reply, Reply)
    assert reply.status == scsi.CHECK_CONDITION
    assert reply.sense is not None
    assert (reply.sense.key, reply.sense.asc, reply.sense.ascq) == (key, *asc)
    return reply.sense


def good(reply: Reply | ReadRequest) -> bytes:
    assert isinstance(reply, Reply), reply
    assert reply.status == scsi.GOOD, reply.sense
    return reply.data


def test_sense_fixed_format_roundtrip() -> None:
    raw = Sense(scsi.MEDIUM_ERROR, 0x11, 0x00, info=1234).to_bytes()
    assert len(raw) == 18
    assert raw[0] == 0xF0 and raw[2] == 0x03 and raw[7] == 10 and raw[12:14] == b"\x11\x00"
    assert struct.unpack(">I", raw[3:7])[0] == 1234
    assert Sense.parse(raw) == Sense(3, 0x11, 0, 1234)
    assert Sense.parse(Sense(5, 0x20, 0).to_bytes()).info is None


@pytest.mark.parametrize(
    "opcode,length", [(0x00, 6), (0x12, 6), (0x28, 10), (0x5A, 10), (0xA8, 12), (0x88, 16), (0x9E, 16)]
)
def test_cdb_length_by_group(opcode: int, length: int) -> None:
    assert scsi.cdb_length(opcode) == length


def test_standard_inquiry(disk: ScsiDisk) -> None:
    data = good(disk.handle(bytes([0x12, 0, 0, 0, 36, 0])))
    assert len(data) == 36
    assert data[0] == 0x00 and data[1] & 0x80 == 0  # direct access, not removable
    assert data[4] == 31 and data[7] & 0x02  # additional length, CmdQue
    assert data[8:16] == b"BDSERVER" and data[16:32] == b"lazy EROFS disk "
    # allocation length truncates
    assert good(disk.handle(bytes([0x12, 0, 0, 0, 5, 0]))) == data[:5]
    # page code without EVPD, and CmdDt, are invalid
    check(disk.handle(bytes([0x12, 0, 0x80, 0, 36, 0])), scsi.ILLEGAL_REQUEST, scsi.ASC_INVALID_FIELD_IN_CDB)
    check(disk.handle(bytes([0x12, 2, 0, 0, 36, 0])), scsi.ILLEGAL_REQUEST, scsi.ASC_INVALID_FIELD_IN_CDB)


def vpd(disk: ScsiDisk, page: int, alloc: int = 255) -> bytes:
    data = good(disk.handle(bytes([0x12, 1, page, alloc >> 8, alloc & 0xFF, 0])))
    assert data[1] == page
    assert struct.unpack(">H", data[2:4])[0] == len(data) - 4
    return data


def test_vpd_supported_pages(disk: ScsiDisk) -> None:
    assert vpd(disk, 0x00)[4:] == bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])


def test_vpd_serial(disk: ScsiDisk) -> None:
    assert vpd(disk, 0x80)[4:] == b"0123456789abcdef"


def test_vpd_device_identification(disk: ScsiDisk) -> None:
    data = vpd(disk, 0x83)
    descs, pos = [], 4
    while pos < len(data):
        code_set, kind, _, n = data[pos:pos + 4]
        descs.append((code_set & 0x0F, kind & 0x0F, data[pos + 4:pos + 4 + n]))
        pos += 4 + n
    assert pos == len(data)
    t10, naa, vendor = descs
    assert t10 == (2, 1, b"BDSERVER0123456789abcdef")
    assert naa[:2] == (1, 3) and len(naa[2]) == 16
    assert naa[2][0] >> 4 == 6 and naa[2].hex()[1:7] == "001405"  # NAA 6, OUI 00:14:05
    assert disk.wwid == "naa." + naa[2].hex()
    assert vendor[2].rstrip(b"\0") == b"bdserver/bd-test"
    # different serials, different NAA ids
    assert ScsiDisk(size=SIZE, serial="other").naa != disk.naa


def test_vpd_block_limits_and_characteristics(disk: ScsiDisk) -> None:
    b0 = vpd(disk, 0xB0)
    assert len(b0) == 4 + 0x3C
    assert struct.unpack(">I", b0[8:12])[0] == 128  # maximum transfer length in blocks
    b1 = vpd(disk, 0xB1)
    assert struct.unpack(">H", b1[4:6])[0] == 1  # non-rotational
    b2 = vpd(disk, 0xB2)
    assert b2[5] & 0xE0 == 0  # no UNMAP / WRITE SAME provisioning
    check(disk.handle(bytes([0x12, 1, 0x89, 0, 255, 0])), scsi.ILLEGAL_REQUEST, scsi.ASC_INVALID_FIELD_IN_CDB)


def test_read_capacity(disk: ScsiDisk) -> None:
    data = good(disk.handle(bytes([0x25] + [0] * 9)))
    assert struct.unpack(">II", data) == (10, 4096)  # 11 blocks: last LBA 10
    cdb16 = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
    data = good(disk.handle(cdb16))
    assert len(data) == 32
    last, bs = struct.unpack(">QI", data[:12])
    assert (last, bs) == (10, 4096)
    assert data[14] & 0xC0 == 0  # not thin provisioned
    # other SERVICE ACTION IN(16) actions are not supported
    check(disk.handle(bytes([0x9E, 0x12]) + bytes(14)), scsi.ILLEGAL_REQUEST, scsi.ASC_INVALID_OPCODE)


def test_read_capacity_10_saturates() -> None:
    big = ScsiDisk(size=(2**32 + 5) * 4096, serial="big")
    data = good(big.handle(bytes([0x25] + [0] * 9)))
    assert struct.unpack(">I", data[:4])[0] == 0xFFFFFFFF


def test_mode_sense_write_protect(disk: ScsiDisk) -> None:
    data6 = good(disk.handle(bytes([0x1A, 0, 0x3F, 0, 255, 0])))
    assert data6[0] == len(data6) - 1 and data6[2] & 0x80 and data6[3] == 0
    data10 = good(disk.handle(bytes([0x5A, 0, 0x3F, 0, 0, 0, 0, 1, 0, 0])))
    assert struct.unpack(">H", data10[:2])[0] == len(data10) - 2 and data10[3] & 0x80
    assert data6[4:] == data10[8:]  # same pages
    # pages: 0x01, 0x08 (caching, WCE off), 0x0A
    pages, pos = {}, 4
    while pos < len(data6):
        pages[data6[pos] & 0x3F] = data6[pos + 2:pos + 2 + data6[pos + 1]]
        pos += 2 + data6[pos + 1]
    assert set(pages) == {0x01, 0x08, 0x0A}
    assert pages[0x08][0] & 0x04 == 0  # WCE=0: Linux sends no SYNCHRONIZE CACHE
    # the 4-byte probe Linux sends first
    assert good(disk.handle(bytes([0x1A, 0, 0x3F, 0, 4, 0]))) == data6[:4]
    # one page
    only8 = good(disk.handle(bytes([0x1A, 0, 0x08, 0, 255, 0])))
    assert only8[4] == 0x08 and only8[5] == 0x12
    # unsupported page / subpage / saved values
    check(disk.handle(bytes([0x1A, 0, 0x1C, 0, 255, 0])), scsi.ILLEGAL_REQUEST, scsi.ASC_INVALID_FIELD_IN_CDB)
    check(disk.handle(bytes([0x1A, 0, 0x0A, 0x05, 255, 0])), scsi.ILLEGAL_REQUEST, scsi.ASC_INVALID_FIELD_IN_CDB)
    check(disk.handle(bytes([0x1A, 0, 0xC8, 0, 255, 0])), scsi.ILLEGAL_REQUEST, scsi.ASC_SAVING_PARAMS_UNSUPPORTED)


def test_tur_sync_request_sense(disk: ScsiDisk) -> None:
    assert good(disk.handle(bytes(6))) == b""
    assert good(disk.handle(bytes([0x35] + [0] * 9))) == b""
    assert good(disk.handle(bytes([0x91] + [0] * 15))) == b""
    sense = good(disk.handle(bytes([0x03, 0, 0, 0, 18, 0])))
    assert Sense.parse(sense).key == scsi.NO_SENSE


@pytest.mark.parametrize(
    "cdb,lba,blocks",
    [
        (bytes([0x08, 0x00, 0x00, 0x02, 3, 0]), 2, 3),
        (bytes([0x28, 0]) + struct.pack(">I", 4) + b"\0" + struct.pack(">H", 7) + b"\0", 4, 7),
        (bytes([0xA8, 0]) + struct.pack(">II", 1, 10) + b"\0\0", 1, 10),
        (bytes([0x88, 0]) + struct.pack(">QI", 10, 1) + b"\0\0", 10, 1),
    ],
)
def test_read_forms(disk: ScsiDisk, cdb: bytes, lba: int, blocks: int) -> None:
    req = disk.handle(cdb)
    assert req == ReadRequest(lba, blocks, lba * 4096, blocks * 4096)


def test_read6_zero_means_256() -> None:
    d = ScsiDisk(size=300 * 4096, serial="x")
    assert d.handle(bytes([0x08, 0, 0, 0, 0, 0])) == ReadRequest(0, 256, 0, 256 * 4096)


def test_read_range_checks(disk: ScsiDisk) -> None:
    past = bytes([0x28, 0]) + struct.pack(">I", 10) + b"\0" + struct.pack(">H", 2) + b"\0"
    check(disk.handle(past), scsi.ILLEGAL_REQUEST, scsi.ASC_LBA_OUT_OF_RANGE)
    far = bytes([0x88, 0]) + struct.pack(">QI", 2**63, 1) + b"\0\0"
    check(disk.handle(far), scsi.ILLEGAL_REQUEST, scsi.ASC_LBA_OUT_OF_RANGE)
    zero = bytes([0x28, 0]) + struct.pack(">I", 3) + b"\0" + struct.pack(">H", 0) + b"\0"
    assert good(disk.handle(zero)) == b""
    rdprotect = bytes([0x28, 0x20]) + struct.pack(">I", 0) + b"\0" + struct.pack(">H", 1) + b"\0"
    check(disk.handle(rdprotect), scsi.ILLEGAL_REQUEST, scsi.ASC_INVALID_FIELD_IN_CDB)


def test_read_replies(disk: ScsiDisk) -> None:
    req = disk.handle(bytes([0x88, 0]) + struct.pack(">QI", 10, 1) + b"\0\0")
    assert isinstance(req, ReadRequest)
    data = good(disk.read_reply(req, b"x" * 100))  # the partial last block is zero-padded
    assert data == b"x" * 100 + bytes(4096 - 100)
    sense = check(disk.read_error_reply(req), scsi.MEDIUM_ERROR, scsi.ASC_UNRECOVERED_READ_ERROR)
    assert sense.info == 10
    assert sense.to_bytes()[2] == 0x03 and sense.to_bytes()[12:14] == b"\x11\x00"


@pytest.mark.parametrize("opcode", [0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0x41, 0x93, 0x42, 0x89, 0x04])
def test_writes_are_data_protect(disk: ScsiDisk, opcode: int) -> None:
    cdb = bytes([opcode]) + bytes(scsi.cdb_length(opcode) - 1)
    check(disk.handle(cdb), scsi.DATA_PROTECT, scsi.ASC_WRITE_PROTECTED)


@pytest.mark.parametrize("opcode", [0xA3, 0x15, 0x55, 0x4D, 0xC0, 0x37])
def test_unknown_opcodes(disk: ScsiDisk, opcode: int) -> None:
    cdb = bytes([opcode]) + bytes(scsi.cdb_length(opcode) - 1)
    check(disk.handle(cdb), scsi.ILLEGAL_REQUEST, scsi.ASC_INVALID_OPCODE)


def test_short_cdb_is_invalid(disk: ScsiDisk) -> None:
    check(disk.handle(bytes([0x28, 0, 0])), scsi.ILLEGAL_REQUEST, scsi.ASC_INVALID_FIELD_IN_CDB)
    check(disk.handle(b""), scsi.ILLEGAL_REQUEST, scsi.ASC_INVALID_OPCODE)


def test_construction_limits() -> None:
    with pytest.raises(ValueError):
        ScsiDisk(size=4096, serial="s", block_size=1024)
    with pytest.raises(ValueError):
        ScsiDisk(size=4096, serial="")
    assert ScsiDisk(size=4096 * 8, serial="s", block_size=512).blocks == 64
