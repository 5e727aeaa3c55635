"""SCSI block-device emulation for the TCMU backend: CDB in, status + data + sense out.

TCMU is a passthrough backstore: LIO hands the handler every CDB except REPORT LUNS and the
reservation commands, so capacity, identity, write protection and range checks are ours. This
module is pure (no kernel, no I/O): `ScsiDisk.handle(cdb)` either answers at once (`Reply`) or asks
the caller to read the device (`ReadRequest`), whose outcome `read_reply`/`read_error_reply` turn into
the final `Reply`. That keeps it unit-testable on any host and lets the ring run reads in parallel.

Choices: a read-only, non-rotational disk with 4096-byte logical blocks (= the EROFS block, and
the virtual device's unit, so one READ never splits a block between two fetches); write cache off
(Linux then never sends SYNCHRONIZE CACHE); the MODE SENSE write-protect bit on (sd marks the disk
read-only), and every write-class command refused with DATA PROTECT / WRITE PROTECTED.
Sense data is fixed format (18 bytes), which the Linux initiator and tcmu-runner both use.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

# SAM status codes.
GOOD = 0x00
CHECK_CONDITION = 0x02

# Sense keys.
NO_SENSE = 0x0
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
DATA_PROTECT = 0x7

# (ASC, ASCQ) pairs.
ASC_NONE = (0x00, 0x00)
ASC_UNRECOVERED_READ_ERROR = (0x11, 0x00)
ASC_INVALID_OPCODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_WRITE_PROTECTED = (0x27, 0x00)
ASC_SAVING_PARAMS_UNSUPPORTED = (0x39, 0x00)
ASC_INTERNAL_TARGET_FAILURE = (0x44, 0x00)

# Opcodes we answer.
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
SYNCHRONIZE_CACHE_10 = 0x35
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
SYNCHRONIZE_CACHE_16 = 0x91
SERVICE_ACTION_IN_16 = 0x9E
SAI_READ_CAPACITY_16 = 0x10
READ_12 = 0xA8

# Everything that would change the medium: refused with DATA PROTECT / WRITE PROTECTED.
WRITE_OPCODES = frozenset({
    0x04,  # FORMAT UNIT
    0x0A, 0x2A, 0xAA, 0x8A,  # WRITE(6/10/12/16)
    0x2E, 0xAE, 0x8E,  # WRITE AND VERIFY(10/12/16)
    0x41, 0x93,  # WRITE SAME(10/16)
    0x42,  # UNMAP
    0x89,  # COMPARE AND WRITE
    0x9C,  # WRITE ATOMIC(16)
    0x3B,  # WRITE BUFFER
    0x07,  # REASSIGN BLOCKS
    0x53,  # XDWRITEREAD(10)
    0x83,  # EXTENDED COPY
})

SENSE_LEN = 18
VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)


def cdb_length(opcode: int, second_byte_hint: int | None = None) -> int:
    """CDB length as the kernel's scsi_command_size computes it (group code; 0x7F is variable)."""
    if opcode == 0x7F:
        return 8 + (second_byte_hint or 0)
    return (6, 10, 10, 12, 16, 12, 10, 10)[opcode >> 5]


@dataclass(frozen=True)
class Sense:
    """Fixed-format sense data; ``info`` (the first bad LBA) sets the VALID bit."""

    key: int
    asc: int
    ascq: int
    info: int | None = None

    def to_bytes(self) -> bytes:
        b = bytearray(SENSE_LEN)
        b[0] = 0x70 | (0x80 if self.info is not None else 0)
        b[2] = self.key & 0x0F
        if self.info is not None:
            b[3:7] = struct.pack(">I", self.info & 0xFFFFFFFF)
        b[7] = SENSE_LEN - 8
        b[12] = self.asc
        b[13] = self.ascq
        return bytes(b)

    @classmethod
    def parse(cls, data: bytes) -> Sense:
        if len(data) < 14 or data[0] & 0x7F not in (0x70, 0x71):
            raise ValueError("not fixed-format sense data")
        info = struct.unpack(">I", data[3:7])[0] if data[0] & 0x80 else None
        return cls(data[2] & 0x0F, data[12], data[13], info)


@dataclass(slots=True)
class Reply:
    """A finished command: SAM status, Data-In bytes (already cut to the allocation length), sense."""

    status: int
    data: bytes = b""
    sense: Sense | None = None

    @classmethod
    def check(cls, key: int, asc_ascq: tuple[int, int], info: int | None = None) -> Reply:
        return cls(CHECK_CONDITION, b"", Sense(key, asc_ascq[0], asc_ascq[1], info))


@dataclass(slots=True)
class ReadRequest:
    """A READ the caller must satisfy from the device: ``length`` bytes at byte ``offset``."""

    lba: int
    blocks: int
    offset: int
    length: int


def _ascii(text: str, width: int) -> bytes:
    return text.encode("ascii", "replace")[:width].ljust(width, b" ")


def _alloc(data: bytes, allocation_length: int) -> bytes:
    return data[:allocation_length]


@dataclass
class ScsiDisk:
    """One read-only logical unit of ``size`` bytes (the last block is zero-padded)."""

    size: int
    serial: str
    block_size: int = 4096
    vendor: str = "BDSERVER"
    product: str = "lazy EROFS disk"
    revision: str = "0001"
    max_transfer_blocks: int = 128
    config: str = ""  # the TCMU dev_config, echoed in a vendor-specific VPD 0x83 descriptor

    def __post_init__(self) -> None:
        if self.block_size not in (512, 4096):
            raise ValueError("block size must be 512 or 4096")
        if not self.serial or not self.serial.isascii() or len(self.serial) > 64:
            raise ValueError("serial must be 1..64 ASCII characters")
        self.blocks = -(-self.size // self.block_size)

    # -- identity ------------------------------------------------------------------------------

    @property
    def naa(self) -> bytes:
        """NAA type 6 (IEEE registered extended) id: LIO's OUI 00:14:05 + a hash of the serial."""
        digest = hashlib.sha256(self.serial.encode()).digest()
        tail = int.from_bytes(digest[:13], "big") >> 4  # 100 bits of vendor-specific id
        value = (0x6 << 124) | (0x001405 << 100) | tail
        return value.to_bytes(16, "big")

    @property
    def wwid(self) -> str:
        """What the kernel shows in /sys/block/sdX/device/wwid for this disk."""
        return "naa." + self.naa.hex()

    # -- dispatch ------------------------------------------------------------------------------

    def handle(self, cdb: bytes) -> Reply | ReadRequest:
        """Answer one CDB, or ask for a device read."""
        if not cdb:
            return Reply.check(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
        op = cdb[0]
        if len(cdb) < cdb_length(op, cdb[7] if len(cdb) > 7 else 0):
            return Reply.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        if op in (READ_6, READ_10, READ_12, READ_16):
            return self._read(cdb)
        if op in WRITE_OPCODES:
            return Reply.check(DATA_PROTECT, ASC_WRITE_PROTECTED)
        if op == INQUIRY:
            return self._inquiry(cdb)
        if op == TEST_UNIT_READY:
            return Reply(GOOD)
        if op == READ_CAPACITY_10:
            return self._read_capacity_10()
        if op == SERVICE_ACTION_IN_16 and cdb[1] & 0x1F == SAI_READ_CAPACITY_16:
            return self._read_capacity_16(cdb)
        if op in (MODE_SENSE_6, MODE_SENSE_10):
            return self._mode_sense(cdb)
        if op == REQUEST_SENSE:
            return self._request_sense(cdb)
        if op in (SYNCHRONIZE_CACHE_10, SYNCHRONIZE_CACHE_16, START_STOP_UNIT,
                  PREVENT_ALLOW_MEDIUM_REMOVAL):
            return Reply(GOOD)  # nothing is ever dirty; the "medium" cannot be ejected
        return Reply.check(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)

    # -- READ ----------------------------------------------------------------------------------

    def _read(self, cdb: bytes) -> Reply | ReadRequest:
        op = cdb[0]
        if op == READ_6:
            lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
            blocks = cdb[4] or 256
        elif op == READ_10:
            lba, blocks = struct.unpack(">I", cdb[2:6])[0], struct.unpack(">H", cdb[7:9])[0]
        elif op == READ_12:
            lba, blocks = struct.unpack(">II", cdb[2:10])
        else:
            lba, blocks = struct.unpack(">QI", cdb[2:14])
        if op != READ_6 and cdb[1] >> 5:  # RDPROTECT: we have no protection information
            return Reply.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        if lba + blocks > self.blocks:
            return Reply.check(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
        if blocks == 0:
            return Reply(GOOD)
        return ReadRequest(lba, blocks, lba * self.block_size, blocks * self.block_size)

    def read_reply(self, req: ReadRequest, data: bytes) -> Reply:
        """The Data-In for a finished read; bytes past the device's end read as zeros."""
        if len(data) < req.length:
            data = data + bytes(req.length - len(data))
        return Reply(GOOD, data)

    def read_error_reply(self, req: ReadRequest, failed_offset: int | None = None) -> Reply:
        """MEDIUM ERROR / UNRECOVERED READ ERROR, INFORMATION = the first LBA that failed."""
        lba = req.lba if failed_offset is None else max(req.lba, failed_offset // self.block_size)
        return Reply.check(MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR, info=lba if lba < 2**32 else None)

    # -- INQUIRY -------------------------------------------------------------------------------

    def _inquiry(self, cdb: bytes) -> Reply:
        evpd, page = cdb[1] & 0x01, cdb[2]
        alloc = struct.unpack(">H", cdb[3:5])[0]
        if cdb[1] & 0x02:  # CmdDt is obsolete
            return Reply.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        if not evpd:
            if page:
                return Reply.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
            return Reply(GOOD, _alloc(self.standard_inquiry(), alloc))
        body = self.vpd_page(page)
        if body is None:
            return Reply.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        return Reply(GOOD, _alloc(body, alloc))

    def standard_inquiry(self) -> bytes:
        b = bytearray(36)
        b[0] = 0x00  # peripheral qualifier 0, direct-access block device
        b[1] = 0x00  # not removable
        b[2] = 0x06  # SPC-4
        b[3] = 0x02  # response data format 2
        b[4] = len(b) - 5
        b[7] = 0x02  # CmdQue: we take many commands at once
        b[8:16] = _ascii(self.vendor, 8)
        b[16:32] = _ascii(self.product, 16)
        b[32:36] = _ascii(self.revision, 4)
        return bytes(b)

    def vpd_page(self, page: int) -> bytes | None:
        """The full VPD page (header included), or None if we do not have it."""
        if page == 0x00:
            body = bytes(VPD_PAGES)
        elif page == 0x80:
            body = self.serial.encode("ascii")
        elif page == 0x83:
            body = self._device_identification()
        elif page == 0xB0:  # Block Limits
            b = bytearray(0x3C)
            struct.pack_into(">I", b, 4, self.max_transfer_blocks)  # MAXIMUM TRANSFER LENGTH
            struct.pack_into(">I", b, 8, self.max_transfer_blocks)  # OPTIMAL TRANSFER LENGTH
            body = bytes(b)
        elif page == 0xB1:  # Block Device Characteristics
            b = bytearray(0x3C)
            struct.pack_into(">H", b, 0, 0x0001)  # MEDIUM ROTATION RATE: non-rotating
            body = bytes(b)
        elif page == 0xB2:  # Logical Block Provisioning: fully provisioned, no UNMAP
            body = bytes(4)
        else:
            return None
        return bytes([0x00, page]) + struct.pack(">H", len(body)) + body

    def _device_identification(self) -> bytes:
        def desc(code_set: int, id_type: int, ident: bytes) -> bytes:
            # protocol 0, code set; PIV 0, association 0 (the logical unit), designator type
            return bytes([code_set, id_type, 0, len(ident)]) + ident

        t10 = _ascii(self.vendor, 8) + self.serial.encode("ascii")
        out = desc(0x2, 0x1, t10) + desc(0x1, 0x3, self.naa)
        if self.config:
            cfg = self.config.encode("utf-8")[:250]
            cfg += bytes(-len(cfg) % 4)
            out += desc(0x2, 0x0, cfg)  # vendor specific: the handler config, as tcmu-runner does
        return out

    # -- capacity, mode pages, sense -----------------------------------------------------------

    def _read_capacity_10(self) -> Reply:
        last = self.blocks - 1
        return Reply(GOOD, struct.pack(">II", min(last, 0xFFFFFFFF), self.block_size))

    def _read_capacity_16(self, cdb: bytes) -> Reply:
        alloc = struct.unpack(">I", cdb[10:14])[0]
        b = bytearray(32)
        struct.pack_into(">QI", b, 0, self.blocks - 1, self.block_size)
        return Reply(GOOD, _alloc(bytes(b), alloc))

    def _mode_page(self, page: int, changeable: bool) -> bytes | None:
        if page == 0x01:  # read-write error recovery
            body = bytearray(0x0A)
        elif page == 0x08:  # caching: WCE=0 (no flushes needed), RCD=0 (reads may be cached)
            body = bytearray(0x12)
        elif page == 0x0A:  # control
            body = bytearray(0x0A)
            if not changeable:
                body[1] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
        else:
            return None
        return bytes([page, len(body)]) + bytes(body)

    def _mode_sense(self, cdb: bytes) -> Reply:
        ten = cdb[0] == MODE_SENSE_10
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = struct.unpack(">H", cdb[7:9])[0] if ten else cdb[4]
        if pc == 3:
            return Reply.check(ILLEGAL_REQUEST, ASC_SAVING_PARAMS_UNSUPPORTED)
        if subpage not in (0x00, 0xFF) or (subpage == 0xFF and page != 0x3F):
            return Reply.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        if page == 0x3F:
            pages = b"".join(p for p in (self._mode_page(n, pc == 1) for n in (0x01, 0x08, 0x0A)) if p)
        else:
            one = self._mode_page(page, pc == 1)
            if one is None:
                return Reply.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
            pages = one
        wp = 0x80  # WP: the medium is write-protected
        if ten:
            header = struct.pack(">HBBBBH", 6 + len(pages), 0, wp, 0, 0, 0)
        else:
            header = bytes([3 + len(pages), 0, wp, 0])
        return Reply(GOOD, _alloc(header + pages, alloc))

    def _request_sense(self, cdb: bytes) -> Reply:
        alloc = cdb[4]
        if cdb[1] & 0x01:  # DESC: descriptor format, NO SENSE, no descriptors
            return Reply(GOOD, _alloc(bytes([0x72, NO_SENSE, 0, 0, 0, 0, 0, 0]), alloc))
        return Reply(GOOD, _alloc(Sense(NO_SENSE, *ASC_NONE).to_bytes(), alloc))
