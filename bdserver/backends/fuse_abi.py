"""The FUSE kernel protocol (include/uapi/linux/fuse.h), the subset a read-only one-file tree needs.

Messages on /dev/fuse: the kernel's request is a `fuse_in_header` (40 bytes) followed by the
opcode's argument; our reply is one write of a `fuse_out_header` (16 bytes) followed by the result.
The hot path (READ) unpacks with the precompiled `IN_HEADER` / `READ_IN` and packs `OUT_HEADER`
directly; the rarer replies are dataclasses, one per struct, each with its ``FMT``. Little-endian
as on every host bdserver runs on. Protocol 7.41 (Linux 6.12) is what we speak; newer kernels
accept it (the kernel uses the smaller of the two minors).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAJOR = 7
MINOR = 41  # Linux 6.12; resend needs only 6.9 (7.40), nothing here needs more
ROOT_ID = 1
MIN_READ_BUFFER = 8192  # the kernel refuses smaller read buffers

# -- opcodes ---------------------------------------------------------------------------------
LOOKUP = 1
FORGET = 2  # no reply
GETATTR = 3
SETATTR = 4
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
GETXATTR = 22
LISTXATTR = 23
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
ACCESS = 34
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42  # no reply
NO_REPLY = frozenset({FORGET, BATCH_FORGET})

# -- notifications (a write with unique 0; the error field carries the code) ----------------
NOTIFY_RESEND = 7  # 6.9+: requests read but never answered go back to the pending queue

# -- INIT flags (bits 32..63 travel in flags2 when FUSE_INIT_EXT is set) ---------------------
ASYNC_READ = 1 << 0
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
HAS_RESEND = 1 << 39

# -- OPEN reply flags ------------------------------------------------------------------------
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3

UNIQUE_RESEND = 1 << 63  # set by the kernel on a resent request; the reply echoes it unchanged
INT_REQ_BIT = 1  # an INTERRUPT's unique is the interrupted request's | 1

DT_DIR = 4
DT_REG = 8

# Hot path: header and READ argument, unpacked in place from the read buffer.
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error (negative errno or notify code), unique
READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
OPEN_IN = struct.Struct("<II")  # flags, open_flags
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type; then the name, padded to 8 bytes


@dataclass
class InitIn:
    """struct fuse_init_in: 16 bytes before 7.36, 64 with flags2 and reserved words."""

    FMT = "<IIIII"

    major: int
    minor: int
    max_readahead: int
    flags: int  # all 64 bits (flags | flags2 << 32)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> InitIn:
        if len(raw) >= 20:
            major, minor, ra, flags, flags2 = struct.unpack_from(cls.FMT, raw)
        else:
            major, minor, ra, flags = struct.unpack_from("<IIII", raw)
            flags2 = 0
        return cls(major, minor, ra, flags | (flags2 << 32 if flags & INIT_EXT else 0))


@dataclass
class InitOut:
    """struct fuse_init_out (64 bytes)."""

    FMT = "<IIIIHHIIHHII24x"

    major: int = MAJOR
    minor: int = MINOR
    max_readahead: int = 0
    flags: int = 0  # all 64 bits; the high half goes to flags2 (and INIT_EXT is set for it)
    max_background: int = 12
    congestion_threshold: int = 9
    max_write: int = 4096
    time_gran: int = 1
    max_pages: int = 32
    map_alignment: int = 0
    max_stack_depth: int = 0

    def pack(self) -> bytes:
        flags = self.flags | (INIT_EXT if self.flags >> 32 else 0)
        return struct.pack(self.FMT, self.major, self.minor, self.max_readahead, flags & 0xFFFFFFFF,
                           self.max_background, self.congestion_threshold, self.max_write, self.time_gran,
                           self.max_pages, self.map_alignment, flags >> 32, self.max_stack_depth)


@dataclass
class Attr:
    """struct fuse_attr (88 bytes)."""

    FMT = "<QQQQQQIIIIIIIIII"

    ino: int
    size: int
    mode: int
    nlink: int = 1
    time: int = 0  # atime = mtime = ctime (seconds): the device never changes
    uid: int = 0
    gid: int = 0
    blksize: int = 4096

    def pack(self) -> bytes:
        return struct.pack(self.FMT, self.ino, self.size, (self.size + 511) // 512, self.time, self.time,
                           self.time, 0, 0, 0, self.mode, self.nlink, self.uid, self.gid, 0, self.blksize, 0)


@dataclass
class EntryOut:
    """struct fuse_entry_out: fuse_attr after 40 bytes of id and timeouts (128 bytes)."""

    FMT = "<QQQQII"

    nodeid: int
    attr: Attr
    valid_s: int  # how long the kernel may cache the name and the attributes

    def pack(self) -> bytes:
        return struct.pack(self.FMT, self.nodeid, 0, self.valid_s, self.valid_s, 0, 0) + self.attr.pack()


@dataclass
class AttrOut:
    """struct fuse_attr_out: a timeout, then fuse_attr (104 bytes)."""

    FMT = "<QII"

    attr: Attr
    valid_s: int

    def pack(self) -> bytes:
        return struct.pack(self.FMT, self.valid_s, 0, 0) + self.attr.pack()


@dataclass
class OpenOut:
    """struct fuse_open_out (16 bytes)."""

    FMT = "<QIi"

    fh: int = 0
    open_flags: int = 0

    def pack(self) -> bytes:
        return struct.pack(self.FMT, self.fh, self.open_flags, 0)


@dataclass
class StatfsOut:
    """struct fuse_kstatfs (80 bytes)."""

    FMT = "<QQQQQIIII24x"

    blocks: int
    files: int
    bsize: int = 4096
    namelen: int = 255

    def pack(self) -> bytes:
        return struct.pack(self.FMT, self.blocks, 0, 0, self.files, 0, self.bsize, self.namelen, self.bsize, 0)


def dirent(ino: int, off: int, name: bytes, kind: int) -> bytes:
    """One struct fuse_dirent record, padded to a multiple of 8 bytes."""
    rec = DIRENT.pack(ino, off, len(name), kind) + name
    return rec + bytes(-len(rec) % 8)


def reply(unique: int, payload: bytes = b"", error: int = 0) -> bytes:
    """A whole reply: ``error`` is a positive errno (sent negated) or 0 with ``payload``."""
    if error:
        return OUT_HEADER.pack(OUT_HEADER.size, -error, unique)
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def notify_resend() -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0)
