"""The TCMU shared-memory ring (UIO map0): mailbox, command entries, completions, data iovecs.

Layout (include/uapi/linux/target_core_user.h, host-endian): a 128-byte mailbox, then the command
ring at ``cmdr_off`` of ``cmdr_size`` bytes, then the data area. The kernel produces entries at
``cmd_head``; we keep a private ``read_off`` for what we have parsed and advance the mailbox's
``cmd_tail`` as we complete. Completions may be out of order: a completion is written into the
slot at ``cmd_tail`` carrying the finishing command's ``cmd_id`` (the kernel looks commands up by
id, not by slot), so a slow read never holds a fast one back.

This works on any writable buffer (the real mmap, or a bytearray in unit tests). Indices are read
and written as aligned 32-bit words through a ``memoryview`` cast, which is atomic; plain program
order suffices on x86_64 (TSO) only — other architectures would need barriers Python lacks.
Every iovec is bounds-checked against the buffer: touching a data page that is not ours would be
SIGBUS on current kernels.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Iterable

from bdserver.backends.scsi import cdb_length

MAILBOX_VERSION = 2
MAILBOX_SIZE = 128
FLAG_CAP_OOOC = 1 << 0
FLAG_CAP_READ_LEN = 1 << 1

OP_PAD = 0
OP_CMD = 1
OP_TMR = 2
OP_MASK = 7

UFLAG_UNKNOWN_OP = 0x1
UFLAG_READ_LEN = 0x2

SENSE_BUFFERSIZE = 96
ENTRY_MIN = 112  # sizeof(struct tcmu_cmd_entry)

# struct tcmu_mailbox: u16 version, u16 flags, u32 cmdr_off, u32 cmdr_size, u32 cmd_head @12,
# cmd_tail @64 (its own cache line).
_MAILBOX = struct.Struct("<HHIII")
_CMD_HEAD_WORD = 12 // 4
_CMD_TAIL_WORD = 64 // 4
# struct tcmu_cmd_entry_hdr: u32 len_op, u16 cmd_id, u8 kflags, u8 uflags
_HDR = struct.Struct("<IHBB")
# req: u32 iov_cnt, u32 iov_bidi_cnt, u32 iov_dif_cnt, pad, u64 cdb_off, u64 pad1, u64 pad2
_REQ = struct.Struct("<III4xQQQ")
_IOV = struct.Struct("<QQ")
# rsp: u8 scsi_status, u8 pad, u16 pad, u32 read_len, then the 96-byte sense buffer
_RSP = struct.Struct("<BxxxI")


class RingError(Exception):
    """The kernel wrote something we refuse to act on (bad version, iovec out of the map, ...)."""


@dataclass(frozen=True)
class Mailbox:
    version: int
    flags: int
    cmdr_off: int
    cmdr_size: int

    @classmethod
    def parse(cls, buf: memoryview | bytes | bytearray) -> Mailbox:
        version, flags, cmdr_off, cmdr_size, _head = _MAILBOX.unpack_from(buf, 0)
        return cls(version, flags, cmdr_off, cmdr_size)


@dataclass(slots=True)
class Command:
    """A command taken off the ring; everything is copied out because the slot gets reused."""

    cmd_id: int
    cdb: bytes
    iovecs: tuple[tuple[int, int], ...]  # (offset in the map, length)

    @property
    def data_length(self) -> int:
        return sum(length for _, length in self.iovecs)


class Ring:
    """One TCMU command ring over ``buf`` (the whole UIO map0)."""

    def __init__(self, buf: memoryview | bytearray) -> None:
        self.buf = memoryview(buf)
        if self.buf.format != "B":
            self.buf = self.buf.cast("B")
        self.size = len(self.buf)
        self.mailbox = Mailbox.parse(self.buf)
        mb = self.mailbox
        if mb.version != MAILBOX_VERSION:
            raise RingError(f"TCMU mailbox version {mb.version}, expected {MAILBOX_VERSION}")
        if mb.cmdr_off < MAILBOX_SIZE or mb.cmdr_off + mb.cmdr_size > self.size or mb.cmdr_size % 8:
            raise RingError(f"bad command ring geometry {mb}")
        if not mb.flags & FLAG_CAP_OOOC:
            raise RingError("kernel lacks out-of-order completion (TCMU_MAILBOX_FLAG_CAP_OOOC)")
        self.words = self.buf[:MAILBOX_SIZE].cast("I")
        self.read_off = self.cmd_tail  # parse from where completion stands (fresh or reset ring)
        self._lock = threading.Lock()  # completions come from many threads

    def release(self) -> None:
        """Drop our views of the buffer (the mmap cannot be closed while they exist)."""
        self.words.release()
        self.buf.release()

    # -- indices -------------------------------------------------------------------------------

    @property
    def cmd_head(self) -> int:
        return self.words[_CMD_HEAD_WORD]

    @property
    def cmd_tail(self) -> int:
        return self.words[_CMD_TAIL_WORD]

    def _entry_at(self, off: int) -> tuple[int, int, int]:
        """(opcode, length, absolute position) of the entry at ring offset ``off``."""
        pos = self.mailbox.cmdr_off + off
        len_op = struct.unpack_from("<I", self.buf, pos)[0]
        length = len_op & ~OP_MASK
        if length == 0 or off + length > self.mailbox.cmdr_size:
            raise RingError(f"corrupt ring entry at {off}: len_op={len_op:#x}")
        return len_op & OP_MASK, length, pos

    # -- consuming -----------------------------------------------------------------------------

    def take(self) -> list[Command]:
        """Parse every entry the kernel has produced since the last call (single consumer)."""
        out: list[Command] = []
        head = self.cmd_head
        size = self.mailbox.cmdr_size
        for _ in range(size // 8 + 1):  # bounded: at most one entry per 8 bytes of ring
            if self.read_off == head:
                break
            op, length, pos = self._entry_at(self.read_off)
            if op == OP_CMD:
                out.append(self._parse_cmd(pos, length))
            elif op not in (OP_PAD, OP_TMR):
                # An op we do not know: flag it so the kernel fails it, and move on.
                self.buf[pos + 7] = self.buf[pos + 7] | UFLAG_UNKNOWN_OP
            self.read_off = (self.read_off + length) % size
        return out

    def _parse_cmd(self, pos: int, length: int) -> Command:
        _len_op, cmd_id, _kflags, _uflags = _HDR.unpack_from(self.buf, pos)
        iov_cnt, bidi_cnt, _dif, cdb_off, _p1, _p2 = _REQ.unpack_from(self.buf, pos + _HDR.size)
        n = iov_cnt + bidi_cnt
        if 48 + 16 * n > length:
            raise RingError(f"command {cmd_id}: {n} iovecs do not fit a {length}-byte entry")
        iovecs = []
        for i in range(iov_cnt):  # BIDI (Data-In after Data-Out) never happens for a disk we serve
            base, ln = _IOV.unpack_from(self.buf, pos + 48 + 16 * i)
            if base + ln > self.size or base < self.mailbox.cmdr_off + self.mailbox.cmdr_size and ln:
                raise RingError(f"command {cmd_id}: iovec {base:#x}+{ln} outside the data area")
            iovecs.append((base, ln))
        if cdb_off + 6 > self.size:
            raise RingError(f"command {cmd_id}: CDB offset {cdb_off:#x} outside the map")
        op = self.buf[cdb_off]
        hint = self.buf[cdb_off + 7] if cdb_off + 8 <= self.size else 0
        cdb = bytes(self.buf[cdb_off:cdb_off + min(cdb_length(op, hint), self.size - cdb_off)])
        return Command(cmd_id, cdb, tuple(iovecs))

    # -- data ----------------------------------------------------------------------------------

    def fill(self, cmd: Command, data: bytes | memoryview) -> int:
        """Scatter Data-In into the command's iovecs; returns the number of bytes placed."""
        src = memoryview(data)
        done = 0
        for base, ln in cmd.iovecs:
            if done >= len(src):
                break
            n = min(ln, len(src) - done)
            self.buf[base:base + n] = src[done:done + n]
            done += n
        return done

    # -- completing ----------------------------------------------------------------------------

    def complete(self, cmd_id: int, status: int, sense: bytes | None = None,
                 read_len: int | None = None) -> None:
        """Publish one completion at ``cmd_tail`` (any order); the caller then kicks the kernel."""
        size = self.mailbox.cmdr_size
        with self._lock:
            tail = self.cmd_tail
            for _ in range(size // 8 + 1):  # skip PAD/TMR slots up to the next command slot
                if tail == self.read_off:
                    raise RingError(f"completion of {cmd_id} with no command slot left to use")
                op, length, pos = self._entry_at(tail)
                if op == OP_CMD:
                    break
                tail = (tail + length) % size
            else:
                raise RingError("ring walk did not terminate")
            struct.pack_into("<H", self.buf, pos + 4, cmd_id)
            uflags = self.buf[pos + 7] & ~(UFLAG_READ_LEN | UFLAG_UNKNOWN_OP)
            if read_len is not None and self.mailbox.flags & FLAG_CAP_READ_LEN:
                uflags |= UFLAG_READ_LEN
            self.buf[pos + 7] = uflags
            _RSP.pack_into(self.buf, pos + 8, status, read_len or 0)
            if sense:
                s = sense[:SENSE_BUFFERSIZE]
                self.buf[pos + 16:pos + 16 + len(s)] = s
            self.words[_CMD_TAIL_WORD] = (tail + length) % size  # after the rsp stores


def format_empty_ring(buf: bytearray, cmdr_size: int, flags: int = FLAG_CAP_OOOC | FLAG_CAP_READ_LEN) -> None:
    """Initialise a mailbox in ``buf`` as the kernel would (for tests that play the kernel)."""
    _MAILBOX.pack_into(buf, 0, MAILBOX_VERSION, flags, MAILBOX_SIZE, cmdr_size, 0)
    struct.pack_into("<I", buf, 64, 0)


def iovec_total(iovecs: Iterable[tuple[int, int]]) -> int:
    return sum(ln for _, ln in iovecs)
