"""A stand-in for the kernel's producer side of a TCMU ring, in a bytearray (unit tests only).

It lays entries out as target_core_user does (base = max(48 + 16*iovs, 112), the CDB right
after, PAD when an entry would not fit before the end, data iovecs in 4 KiB blocks). It shares the
layout tables of bdserver.backends.tcmu_ring, so a wrong table would fool both: each ring test
names the lab test that checks the same behaviour against the real kernel.
"""

from __future__ import annotations

import struct

from bdserver.backends.tcmu_ring import (
    ENTRY_MIN,
    MAILBOX_SIZE,
    OP_CMD,
    OP_MASK,
    OP_PAD,
    SENSE_BUFFERSIZE,
    UFLAG_READ_LEN,
    _HDR,
    _IOV,
    _REQ,
    _RSP,
    RingError,
    format_empty_ring,
)


class FakeKernel:
    """Plays the kernel's producer side of a ring in ``buf`` (for unit tests of the handler).

    Entries are laid out exactly as target_core_user does: base = max(48 + 16*iovs, 112), the CDB
    right after, PAD when an entry would not fit before the end, data iovecs in 4 KiB blocks.
    """

    def __init__(self, buf: bytearray, cmdr_size: int = 4096, data_block: int = 4096) -> None:
        self.buf = buf
        self.cmdr_size = cmdr_size
        format_empty_ring(buf, cmdr_size)
        self.data_off = MAILBOX_SIZE + cmdr_size
        self.data_block = data_block
        self.next_id = 1
        self.next_block = 0
        self.cleaned = 0  # cmdr_last_cleaned
        self.pending: dict[int, tuple[bytes, list[tuple[int, int]]]] = {}

    @property
    def head(self) -> int:
        return struct.unpack_from("<I", self.buf, 12)[0]

    def submit(self, cdb: bytes, data_length: int) -> int:
        nblk = -(-data_length // self.data_block) if data_length else 0
        iovs = []
        for _ in range(nblk):
            base = self.data_off + (self.next_block * self.data_block)
            self.next_block = (self.next_block + 1) % ((len(self.buf) - self.data_off) // self.data_block)
            iovs.append((base, min(self.data_block, data_length - len(iovs) * self.data_block)))
        base_len = max(48 + 16 * len(iovs), ENTRY_MIN)
        length = base_len + (-(-len(cdb) // 8) * 8)
        head = self.head
        if head + length > self.cmdr_size:  # PAD to the end, start over at 0
            pad = self.cmdr_size - head
            _HDR.pack_into(self.buf, MAILBOX_SIZE + head, pad | OP_PAD, 0, 0, 0)
            head = 0
        pos = MAILBOX_SIZE + head
        cmd_id = self.next_id
        self.next_id = self.next_id % 65535 + 1
        self.buf[pos:pos + length] = bytes(length)
        _HDR.pack_into(self.buf, pos, length | OP_CMD, cmd_id, 0, 0)
        cdb_off = pos + base_len
        _REQ.pack_into(self.buf, pos + 8, len(iovs), 0, 0, cdb_off, 0, 0)
        for i, (b, ln) in enumerate(iovs):
            _IOV.pack_into(self.buf, pos + 48 + 16 * i, b, ln)
        self.buf[cdb_off:cdb_off + len(cdb)] = cdb
        struct.pack_into("<I", self.buf, 12, (head + length) % self.cmdr_size)
        self.pending[cmd_id] = (cdb, iovs)
        return cmd_id

    def reap(self) -> dict[int, tuple[int, bytes, bytes]]:
        """Handle completions up to cmd_tail: {cmd_id: (status, sense, data-in)}."""
        out = {}
        tail = struct.unpack_from("<I", self.buf, 64)[0]
        while self.cleaned != tail:
            pos = MAILBOX_SIZE + self.cleaned
            len_op, cmd_id, _k, uflags = _HDR.unpack_from(self.buf, pos)
            length = len_op & ~OP_MASK
            if len_op & OP_MASK == OP_CMD:
                if cmd_id not in self.pending:
                    raise RingError(f"BROKEN: completion for unknown cmd_id {cmd_id}")
                _cdb, iovs = self.pending.pop(cmd_id)
                status, read_len = _RSP.unpack_from(self.buf, pos + 8)
                sense = bytes(self.buf[pos + 16:pos + 16 + SENSE_BUFFERSIZE]) if status == 2 else b""
                data = b"".join(bytes(self.buf[b:b + ln]) for b, ln in iovs)
                if uflags & UFLAG_READ_LEN and read_len:
                    data = data[:read_len]
                out[cmd_id] = (status, sense, data)
            self.cleaned = (self.cleaned + length) % self.cmdr_size
        return out
