"""EROFS on-disk structures, one dataclass per struct (compression: the lz4 subset).

Each struct has a module-level `struct.Struct`, `pack()` and `unpack()`. Field names follow the
kernel's `erofs_fs.h` (without the type prefixes) so that dumps can be compared with the C
tools. All integers are little-endian. See shared/reference/erofs-format.md for the meaning of
every field; only the facts a writer and a reader need are repeated here.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from bdserver.errors import FormatError

# --- constants ---------------------------------------------------------------------------

MAGIC = 0xE0F5E1E2
SB_OFFSET = 1024  # the superblock lives at byte 1024 of the primary device
BLKSZBITS = 12
BLOCK_SIZE = 1 << BLKSZBITS
NULL_ADDR = 0xFFFFFFFF  # "no block": a hole in chunk indexes, unused i_u of small inline inodes
ISLOT_BITS = 5  # NIDs count 32-byte slots
ISLOT_SIZE = 1 << ISLOT_BITS
NAME_MAX = 255

# feature_compat
COMPAT_SB_CHKSUM = 0x1
COMPAT_MTIME = 0x2
COMPAT_XATTR_FILTER = 0x4

# feature_incompat
INCOMPAT_ZERO_PADDING = 0x1
INCOMPAT_COMPR_CFGS = 0x2
INCOMPAT_CHUNKED_FILE = 0x4
INCOMPAT_DEVICE_TABLE = 0x8
INCOMPAT_ZTAILPACKING = 0x10
INCOMPAT_FRAGMENTS = 0x20
INCOMPAT_XATTR_PREFIXES = 0x40
INCOMPAT_48BIT = 0x80
INCOMPAT_METABOX = 0x100

COMPAT_NAMES = {COMPAT_SB_CHKSUM: "sb_csum", COMPAT_MTIME: "mtime", COMPAT_XATTR_FILTER: "xattr_filter"}
INCOMPAT_NAMES = {
    INCOMPAT_ZERO_PADDING: "zero_padding",
    INCOMPAT_COMPR_CFGS: "compr_cfgs",
    INCOMPAT_CHUNKED_FILE: "chunked_file",
    INCOMPAT_DEVICE_TABLE: "device_table",
    INCOMPAT_ZTAILPACKING: "ztailpacking",
    INCOMPAT_FRAGMENTS: "fragments",
    INCOMPAT_XATTR_PREFIXES: "xattr_prefixes",
    INCOMPAT_48BIT: "48bit",
    INCOMPAT_METABOX: "metabox",
}

# i_format: bit 0 version, bits 1-3 data layout
LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4
LAYOUT_NAMES = {0: "flat_plain", 1: "compressed_full", 2: "flat_inline", 3: "compressed_compact", 4: "chunk_based"}

# chunk format (i_u of CHUNK_BASED inodes)
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_FORMAT_48BIT = 0x40

# compressed inodes (z_erofs_*): map header advise bits, lcluster types, algorithms
Z_ADVISE_COMPACTED_2B = 0x1  # compact indexes: 4B + 2B + 4B packs (for FULL indexes: encoded extents, 6.15+)
Z_ADVISE_BIG_PCLUSTER_1 = 0x2
Z_ADVISE_BIG_PCLUSTER_2 = 0x4
Z_ADVISE_INLINE_PCLUSTER = 0x8  # ztailpacking
Z_ADVISE_INTERLACED_PCLUSTER = 0x10
Z_ADVISE_FRAGMENT_PCLUSTER = 0x20
Z_ADVISE_NAMES = {Z_ADVISE_COMPACTED_2B: "compacted_2b/extents", Z_ADVISE_BIG_PCLUSTER_1: "big_pcluster_1",
                  Z_ADVISE_BIG_PCLUSTER_2: "big_pcluster_2", Z_ADVISE_INLINE_PCLUSTER: "ztailpacking",
                  Z_ADVISE_INTERLACED_PCLUSTER: "interlaced", Z_ADVISE_FRAGMENT_PCLUSTER: "fragments"}
Z_FRAGMENT_INODE_BIT = 0x80  # h_clusterbits bit 7: the whole file lives in the packed inode
LCLUSTER_PLAIN, LCLUSTER_HEAD1, LCLUSTER_NONHEAD, LCLUSTER_HEAD2 = range(4)
LI_PARTIAL_REF = 1 << 15  # di_advise of a head: the extent uses part of its pcluster (dedupe)
LI_D0_CBLKCNT = 1 << 11  # delta[0] of the first NONHEAD: it holds the pcluster's block count
COMPR_LZ4, COMPR_LZMA, COMPR_DEFLATE, COMPR_ZSTD = range(4)
COMPR_NAMES = {COMPR_LZ4: "lz4", COMPR_LZMA: "lzma", COMPR_DEFLATE: "deflate", COMPR_ZSTD: "zstd"}
LZ4_MAX_DISTANCE = 0xFFFF  # the lz4 window; what mkfs.erofs declares
PCLUSTER_MAX_SIZE = 1 << 20  # the kernel's Z_EROFS_PCLUSTER_MAX_SIZE

# dirent file types
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHRDEV, FT_BLKDEV, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)

# xattr name indexes -> prefix. Index 2/3 are whole names (empty suffix).
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_LUSTRE = 5
XATTR_INDEX_SECURITY = 6
XATTR_PREFIXES = {
    XATTR_INDEX_USER: "user.",
    XATTR_INDEX_POSIX_ACL_ACCESS: "system.posix_acl_access",
    XATTR_INDEX_POSIX_ACL_DEFAULT: "system.posix_acl_default",
    XATTR_INDEX_TRUSTED: "trusted.",
    XATTR_INDEX_LUSTRE: "lustre.",
    XATTR_INDEX_SECURITY: "security.",
}


def split_xattr_name(name: str) -> tuple[int, bytes]:
    """Map a full xattr name to (name index, suffix bytes); FormatError for a prefix EROFS
    cannot store without long prefixes (which 6.1 kernels lack)."""
    if name in ("system.posix_acl_access", "system.posix_acl_default"):
        return (XATTR_INDEX_POSIX_ACL_ACCESS if name.endswith("access") else XATTR_INDEX_POSIX_ACL_DEFAULT), b""
    for idx in (XATTR_INDEX_USER, XATTR_INDEX_TRUSTED, XATTR_INDEX_SECURITY):
        prefix = XATTR_PREFIXES[idx]
        if name.startswith(prefix) and len(name) > len(prefix):
            suffix = name[len(prefix):].encode("utf-8", "surrogateescape")
            if len(suffix) > NAME_MAX:
                raise FormatError(f"xattr name too long for EROFS (suffix > 255 bytes): {name[:64]!r}...")
            return idx, suffix
    raise FormatError(
        f"xattr {name!r} has a prefix EROFS cannot store (only user., trusted., security., "
        "system.posix_acl_access/default)"
    )


def join_xattr_name(index: int, suffix: bytes) -> str:
    prefix = XATTR_PREFIXES.get(index)
    if prefix is None:
        raise FormatError(f"unknown xattr name index {index}")
    return prefix + suffix.decode("utf-8", "surrogateescape")


# --- CRC32C ------------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c_raw(data: bytes | bytearray | memoryview, crc: int = 0xFFFFFFFF) -> int:
    """Castagnoli CRC without the final inversion (the kernel's ``crc32c()`` primitive)."""
    t = _CRC32C_TABLE
    for b in bytes(data):
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """The standard CRC-32C (as in iSCSI, `crc32c` packages)."""
    return crc32c_raw(data) ^ 0xFFFFFFFF


def sb_checksum(block0: bytes | bytearray | memoryview, block_size: int = BLOCK_SIZE) -> int:
    """Superblock checksum over block 0 from byte 1024 with the checksum field as zero
    (reference §1.3): raw CRC32C, seed ~0, no final xor."""
    end = block_size if block_size > SB_OFFSET else SB_OFFSET + block_size
    region = bytearray(block0[SB_OFFSET:end])
    if len(region) != end - SB_OFFSET:
        raise FormatError("image too short for its superblock checksum range")
    region[4:8] = b"\0\0\0\0"
    return crc32c_raw(region)


# --- superblock --------------------------------------------------------------------------

_SB = struct.Struct("<IIIBBHQqIIII16s16sIHHHBBIQB23s")
assert _SB.size == 128


@dataclass
class Superblock:
    magic: int = MAGIC
    checksum: int = 0
    feature_compat: int = 0
    blkszbits: int = BLKSZBITS
    sb_extslots: int = 0
    root_nid: int = 0
    inos: int = 0
    build_time: int = 0
    build_time_nsec: int = 0
    blocks: int = 0
    meta_blkaddr: int = 0
    xattr_blkaddr: int = 0
    uuid: bytes = b"\0" * 16
    volume_name: bytes = b"\0" * 16
    feature_incompat: int = 0
    u1: int = 0  # available_compr_algs / lz4_max_distance
    extra_devices: int = 0
    devt_slotoff: int = 0
    dirblkbits: int = 0
    xattr_prefix_count: int = 0
    xattr_prefix_start: int = 0
    packed_nid: int = 0
    xattr_filter_reserved: int = 0
    reserved: bytes = b"\0" * 23

    SIZE = 128
    STRUCT = _SB

    def pack(self) -> bytes:
        return _SB.pack(
            self.magic, self.checksum, self.feature_compat, self.blkszbits, self.sb_extslots,
            self.root_nid, self.inos, self.build_time, self.build_time_nsec, self.blocks,
            self.meta_blkaddr, self.xattr_blkaddr, self.uuid, self.volume_name.ljust(16, b"\0"),
            self.feature_incompat, self.u1, self.extra_devices, self.devt_slotoff, self.dirblkbits,
            self.xattr_prefix_count, self.xattr_prefix_start, self.packed_nid,
            self.xattr_filter_reserved, self.reserved,
        )  # fmt: skip

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "Superblock":
        if len(buf) - offset < _SB.size:
            raise FormatError("truncated EROFS superblock")
        return cls(*_SB.unpack_from(buf, offset))


# --- inodes ------------------------------------------------------------------------------

_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIqII16s")
assert _COMPACT.size == 32 and _EXTENDED.size == 64


@dataclass
class InodeCompact:
    """32-byte inode: mtime comes from the superblock, ids and nlink fit 16 bits, size 32."""

    format: int = 0
    xattr_icount: int = 0
    mode: int = 0
    nlink: int = 1
    size: int = 0
    mtime: int = 0  # i_reserved before 6.15; write 0
    u: int = 0
    ino: int = 0
    uid: int = 0
    gid: int = 0
    reserved2: int = 0

    SIZE = 32
    STRUCT = _COMPACT

    def pack(self) -> bytes:
        return _COMPACT.pack(self.format, self.xattr_icount, self.mode, self.nlink, self.size, self.mtime,
                             self.u, self.ino, self.uid, self.gid, self.reserved2)

    def pack_into(self, buf: bytearray, offset: int) -> None:
        _COMPACT.pack_into(buf, offset, self.format, self.xattr_icount, self.mode, self.nlink, self.size,
                           self.mtime, self.u, self.ino, self.uid, self.gid, self.reserved2)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "InodeCompact":
        return cls(*_COMPACT.unpack_from(buf, offset))


@dataclass
class InodeExtended:
    """64-byte inode: own mtime+nsec, 32-bit ids and nlink, 64-bit size."""

    format: int = 1
    xattr_icount: int = 0
    mode: int = 0
    reserved: int = 0  # must be 0 (6.15+ reads it as start block high bits)
    size: int = 0
    u: int = 0
    ino: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    nlink: int = 1
    reserved2: bytes = b"\0" * 16

    SIZE = 64
    STRUCT = _EXTENDED

    def pack(self) -> bytes:
        return _EXTENDED.pack(self.format, self.xattr_icount, self.mode, self.reserved, self.size, self.u,
                              self.ino, self.uid, self.gid, self.mtime, self.mtime_nsec, self.nlink,
                              self.reserved2)

    def pack_into(self, buf: bytearray, offset: int) -> None:
        _EXTENDED.pack_into(buf, offset, self.format, self.xattr_icount, self.mode, self.reserved, self.size,
                            self.u, self.ino, self.uid, self.gid, self.mtime, self.mtime_nsec, self.nlink,
                            self.reserved2)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "InodeExtended":
        return cls(*_EXTENDED.unpack_from(buf, offset))


def make_format(extended: bool, layout: int) -> int:
    return (1 if extended else 0) | (layout << 1)


def xattr_isize(icount: int) -> int:
    """Bytes of inline xattr body for an ``i_xattr_icount``."""
    return 0 if icount == 0 else 12 + 4 * (icount - 1)


def encode_rdev(rdev: int) -> int:
    """Linux "new" dev_t encoding stored in i_u of device inodes."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_rdev(u: int) -> int:
    major = (u & 0xFFF00) >> 8
    minor = (u & 0xFF) | ((u >> 12) & 0xFFF00)
    return os.makedev(major, minor)


# --- directories -------------------------------------------------------------------------

_DIRENT = struct.Struct("<QHBB")
assert _DIRENT.size == 12


@dataclass
class Dirent:
    nid: int
    nameoff: int
    file_type: int
    reserved: int = 0

    SIZE = 12
    STRUCT = _DIRENT

    def pack(self) -> bytes:
        return _DIRENT.pack(self.nid, self.nameoff, self.file_type, self.reserved)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "Dirent":
        return cls(*_DIRENT.unpack_from(buf, offset))


# --- xattrs ------------------------------------------------------------------------------

_XATTR_IBODY_HEADER = struct.Struct("<IB7s")
_XATTR_ENTRY = struct.Struct("<BBH")
assert _XATTR_IBODY_HEADER.size == 12 and _XATTR_ENTRY.size == 4


@dataclass
class XattrIbodyHeader:
    name_filter: int = 0
    shared_count: int = 0
    reserved2: bytes = b"\0" * 7

    SIZE = 12
    STRUCT = _XATTR_IBODY_HEADER

    def pack(self) -> bytes:
        return _XATTR_IBODY_HEADER.pack(self.name_filter, self.shared_count, self.reserved2)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "XattrIbodyHeader":
        return cls(*_XATTR_IBODY_HEADER.unpack_from(buf, offset))


@dataclass
class XattrEntry:
    """Entry header; the name suffix and value follow, padded to 4 bytes."""

    name_len: int
    name_index: int
    value_size: int

    SIZE = 4
    STRUCT = _XATTR_ENTRY

    def pack(self) -> bytes:
        return _XATTR_ENTRY.pack(self.name_len, self.name_index, self.value_size)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "XattrEntry":
        return cls(*_XATTR_ENTRY.unpack_from(buf, offset))


def xattr_entry_bytes(index: int, suffix: bytes, value: bytes) -> bytes:
    """One complete entry (header + suffix + value) padded to a multiple of 4."""
    if len(value) > 0xFFFF:
        raise FormatError(f"xattr value too large for EROFS ({len(value)} bytes > 65535)")
    raw = _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + b"\0" * (-len(raw) % 4)


# --- chunk indexes -----------------------------------------------------------------------

_CHUNK_INDEX = struct.Struct("<HHI")
assert _CHUNK_INDEX.size == 8


@dataclass
class ChunkIndex:
    advise: int = 0
    device_id: int = 0
    blkaddr: int = NULL_ADDR

    SIZE = 8
    STRUCT = _CHUNK_INDEX

    def pack(self) -> bytes:
        return _CHUNK_INDEX.pack(self.advise, self.device_id, self.blkaddr)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "ChunkIndex":
        return cls(*_CHUNK_INDEX.unpack_from(buf, offset))


# --- compressed inodes --------------------------------------------------------------------

_ZMAP_HEADER = struct.Struct("<IHBB")
assert _ZMAP_HEADER.size == 8


@dataclass
class ZMapHeader:
    """`z_erofs_map_header`, at ALIGN(inode + xattrs, 8) of a compressed inode. `fragmentoff` is
    also {reserved1, idata_size} (ztailpacking): idata_size is its high 16 bits."""

    fragmentoff: int = 0
    advise: int = 0
    algorithmtype: int = 0  # bits 0-3: HEAD1's algorithm, 4-7: HEAD2's
    clusterbits: int = 0  # bits 0-3: lcluster bits - blkszbits; bit 7: whole file in the packed inode

    SIZE = 8
    STRUCT = _ZMAP_HEADER

    def pack(self) -> bytes:
        return _ZMAP_HEADER.pack(self.fragmentoff, self.advise, self.algorithmtype, self.clusterbits)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "ZMapHeader":
        return cls(*_ZMAP_HEADER.unpack_from(buf, offset))


def zmap_header_pos(body_end: int) -> int:
    """Where the map header of an inode whose inode + inline xattrs end at `body_end` sits."""
    return (body_end + 7) & ~7


def full_index_pos(body_end: int) -> int:
    """Start of the 8-byte lcluster indexes of a COMPRESSED_FULL inode: after the map header and
    8 reserved bytes (the legacy layout)."""
    return zmap_header_pos(body_end) + ZMapHeader.SIZE + 8


_LCLUSTER_INDEX = struct.Struct("<HHI")
assert _LCLUSTER_INDEX.size == 8


@dataclass
class LclusterIndex:
    """`z_erofs_lcluster_index` (COMPRESSED_FULL): a head's `blkaddr`, or a NONHEAD's
    delta[0] (distance back to its head; LI_D0_CBLKCNT | blocks in the first one of a big pcluster)
    and delta[1] (distance to the next head) packed as `delta0 | delta1 << 16` in `u`."""

    advise: int = 0  # bits 0-1: lcluster type; LI_PARTIAL_REF
    clusterofs: int = 0  # where the head's extent starts inside the lcluster
    u: int = 0

    SIZE = 8
    STRUCT = _LCLUSTER_INDEX

    def pack(self) -> bytes:
        return _LCLUSTER_INDEX.pack(self.advise, self.clusterofs, self.u)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "LclusterIndex":
        return cls(*_LCLUSTER_INDEX.unpack_from(buf, offset))


_LZ4_CFG = struct.Struct("<HHH10s")
assert _LZ4_CFG.size == 16


@dataclass
class Lz4Config:
    """The lz4 record of the COMPR_CFGS area (right after the superblock, 4-byte aligned): a
    16-bit length (14) then `z_erofs_lz4_cfgs`."""

    max_distance: int = LZ4_MAX_DISTANCE
    max_pclusterblks: int = 1
    reserved: bytes = b"\0" * 10

    SIZE = 16  # with the length field
    STRUCT = _LZ4_CFG

    def pack(self) -> bytes:
        return _LZ4_CFG.pack(14, self.max_distance, self.max_pclusterblks, self.reserved)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "Lz4Config":
        length, dist, blks, res = _LZ4_CFG.unpack_from(buf, offset)
        if length < 14:
            raise FormatError(f"lz4 compression config of {length} bytes (needs 14)")
        return cls(dist, blks, res)


# --- device table ------------------------------------------------------------------------

_DEVICE_SLOT = struct.Struct("<64sII56s")
assert _DEVICE_SLOT.size == 128


@dataclass
class DeviceSlot:
    """One extra device: `tag` (non-empty, <= 64 bytes), size in `blocks`, and its start
    `mapped_blkaddr` in the unified (flat) block address space."""

    tag: bytes
    blocks: int
    mapped_blkaddr: int

    SIZE = 128
    STRUCT = _DEVICE_SLOT

    def pack(self) -> bytes:
        if len(self.tag) > 64:
            raise ValueError("device tag longer than 64 bytes")
        return _DEVICE_SLOT.pack(self.tag, self.blocks, self.mapped_blkaddr, b"\0" * 56)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "DeviceSlot":
        tag, blocks, mapped, _ = _DEVICE_SLOT.unpack_from(buf, offset)
        return cls(tag.rstrip(b"\0"), blocks, mapped)
