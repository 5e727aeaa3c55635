"""Read EROFS images (ours and other producers', e.g. mkfs.erofs), lz4-compressed files included.

`ErofsImage(read_at)` needs only a "read N bytes at offset" callable, so it works on a file, a
block device, or the virtual device while it is being served. Every structure read from the
image is bounds-checked and every walk is bounded, so a corrupt or hostile image raises
`FormatError` instead of looping or crashing.
"""

from __future__ import annotations

import os
import stat
import struct
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator

from bdserver.errors import FormatError
from bdserver.erofs import structs as S
from bdserver.erofs.tree import BlockMap, CompressedMap, Inode, TailedBlockMap
from bdserver.erofs.util import gc_paused
from bdserver.erofs.zdata import decode_lz4, decode_plain
from bdserver.erofs.zmap import ZMap, read_extents

__all__ = ["CompressionInfo", "ErofsImage", "EntryInfo", "KNOWN_INCOMPAT", "COMPRESSED_LAYOUTS"]

ReadAt = Callable[[int, int], bytes]

# Incompat bits we can read. ztailpacking is accepted (the image may hold no such inode); an
# inode that uses it is refused when its data is mapped.
KNOWN_INCOMPAT = (
    S.INCOMPAT_ZERO_PADDING
    | S.INCOMPAT_COMPR_CFGS
    | S.INCOMPAT_CHUNKED_FILE
    | S.INCOMPAT_DEVICE_TABLE
    | S.INCOMPAT_ZTAILPACKING
)

_MAX_DEPTH = 4096
_MAX_DIR_BYTES = 256 << 20  # ~10 million entries; bounds memory on hostile sizes
_MAX_CHUNKS = 1 << 25  # 256 MiB of chunk indexes
_MAX_OFFSET = 1 << 56  # no device is this large; bigger offsets come from corrupt fields
COMPRESSED_LAYOUTS = (S.LAYOUT_COMPRESSED_FULL, S.LAYOUT_COMPRESSED_COMPACT)


@dataclass(frozen=True)
class CompressionInfo:
    """What the superblock says about compressed files: the lz4 zero padding, the lz4 window,
    the largest pcluster (blocks) and the algorithms (bit per COMPR_*) the image may use."""

    zero_padding: bool
    max_distance: int
    max_pclusterblks: int
    algorithms: int


@dataclass
class EntryInfo:
    """One inode as stored: what `stat` and `getfattr` would show, plus layout facts."""

    nid: int
    mode: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    nlink: int
    size: int
    rdev: int
    layout: int
    extended: bool
    xattrs: dict[str, bytes] = field(default_factory=dict)
    symlink: bytes | None = None
    # layout internals
    raw_u: int = 0
    data_off: int = 0  # byte offset right after inode + xattr body
    xattr_isize: int = 0
    image: "ErofsImage | None" = field(default=None, repr=False, compare=False)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        assert self.image is not None
        return self.image.read_inode(self, offset, length)

    def extents(self) -> list[tuple[int, int, int | None]]:
        assert self.image is not None
        return self.image.extents(self)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


class ErofsImage:
    """An EROFS image behind `read_at(offset, length) -> bytes`."""

    def __init__(self, read_at: ReadAt, *, verify_checksum: bool = True) -> None:
        self._read_at = read_at
        head = self._read(0, S.SB_OFFSET + 128)
        sb = S.Superblock.unpack(head, S.SB_OFFSET)
        if sb.magic != S.MAGIC:
            raise FormatError(f"not an EROFS image (magic {sb.magic:#010x} at byte 1024)")
        if not 9 <= sb.blkszbits <= 16:
            raise FormatError(f"unsupported EROFS block size 2^{sb.blkszbits}")
        self.sb = sb
        self.block_size = 1 << sb.blkszbits
        self.blkszbits = sb.blkszbits
        if sb.feature_incompat & ~KNOWN_INCOMPAT:
            unknown = sb.feature_incompat & ~KNOWN_INCOMPAT
            names = [S.INCOMPAT_NAMES.get(1 << b, hex(1 << b)) for b in range(32) if unknown >> b & 1]
            raise FormatError(f"EROFS image uses unsupported features: {', '.join(names)}")
        if sb.sb_extslots:
            raise FormatError("EROFS superblock extension slots are not supported")
        if sb.dirblkbits:
            raise FormatError("EROFS dirblkbits != 0 is not supported")
        if sb.feature_compat & S.COMPAT_SB_CHKSUM and verify_checksum:
            end = self.block_size if self.block_size > S.SB_OFFSET else S.SB_OFFSET + self.block_size
            got = S.sb_checksum(self._read(0, end), self.block_size)
            if got != sb.checksum:
                raise FormatError(f"EROFS superblock checksum mismatch (stored {sb.checksum:#x}, computed {got:#x})")
        self.devices: list[S.DeviceSlot] = []
        if sb.feature_incompat & S.INCOMPAT_DEVICE_TABLE and sb.extra_devices:
            raw = self._read(sb.devt_slotoff * 128, 128 * sb.extra_devices)
            self.devices = [S.DeviceSlot.unpack(raw, 128 * i) for i in range(sb.extra_devices)]
        self.compression = self._compression_info(sb)
        n = len(self.devices)
        self._devmask = (1 << n.bit_length()) - 1 if n else 0  # roundup_pow2(n+1) - 1
        self._meta_base = sb.meta_blkaddr << sb.blkszbits
        self.root_nid = sb.root_nid
        self._inode_cache = lru_cache(maxsize=4096)(self._load_inode)
        self._dir_cache = lru_cache(maxsize=1024)(self._load_dir)
        root = self.inode(self.root_nid)
        if not root.is_dir:
            raise FormatError("EROFS root inode is not a directory")

    def _compression_info(self, sb: S.Superblock) -> CompressionInfo:
        """The lz4 settings: the record of the COMPR_CFGS area (one per algorithm the image may use,
        each a 16-bit length and its bytes, 4-byte aligned, from the end of the superblock), or the
        superblock's lz4 window without that feature."""
        zero = bool(sb.feature_incompat & S.INCOMPAT_ZERO_PADDING)
        if not sb.feature_incompat & S.INCOMPAT_COMPR_CFGS:
            return CompressionInfo(zero, sb.u1, 1, 1 << S.COMPR_LZ4)
        algs = sb.u1
        if algs >> 4:
            raise FormatError(f"EROFS superblock names unknown compression algorithms {algs:#x}")
        pos = S.SB_OFFSET + 128
        lz4 = S.Lz4Config(max_distance=0, max_pclusterblks=1)
        for alg in range(4):
            if not algs >> alg & 1:
                continue
            pos = (pos + 3) & ~3
            length = struct.unpack("<H", self._read(pos, 2))[0]
            if not length or pos + 2 + length > self.block_size:
                raise FormatError(f"EROFS compression config {alg} of {length} bytes is out of range")
            if alg == S.COMPR_LZ4:
                lz4 = S.Lz4Config.unpack(self._read(pos, 2 + length).ljust(S.Lz4Config.SIZE, b"\0"))
            pos += 2 + length
        return CompressionInfo(zero, lz4.max_distance, max(1, lz4.max_pclusterblks), algs)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify_checksum: bool = True) -> "ErofsImage":
        """Open an image file (the fd stays open for the object's life)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            img = cls(lambda off, n: os.pread(fd, n, off), verify_checksum=verify_checksum)
        except BaseException:
            os.close(fd)
            raise
        img._fd = fd  # type: ignore[attr-defined]
        img._finalizer = weakref.finalize(img, os.close, fd)  # type: ignore[attr-defined]
        return img

    def close(self) -> None:
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()  # closes the fd once
            self._fd = None  # type: ignore[attr-defined]

    def __enter__(self) -> "ErofsImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw access -----------------------------------------------------------------------

    def _read(self, off: int, n: int) -> bytes:
        if off < 0 or n < 0 or off + n > _MAX_OFFSET:
            raise FormatError(f"EROFS structure out of range: {n} bytes at {off}")
        if n == 0:
            return b""
        data = self._read_at(off, n)
        if type(data) is not bytes:
            data = bytes(data)
        if len(data) != n:
            raise FormatError(f"EROFS image truncated: wanted {n} bytes at {off}, got {len(data)}")
        return data

    # -- inodes ---------------------------------------------------------------------------

    @property
    def root(self) -> EntryInfo:
        return self.inode(self.root_nid)

    def inode(self, nid: int) -> EntryInfo:
        return self._inode_cache(nid)

    def _load_inode(self, nid: int) -> EntryInfo:
        pos = self._meta_base + (nid << S.ISLOT_BITS)
        head = self._read(pos, 32)
        fmt = struct.unpack_from("<H", head)[0]
        if fmt & ~0xF:
            raise FormatError(f"inode {nid}: unsupported i_format {fmt:#x}")
        extended = bool(fmt & 1)
        layout = (fmt >> 1) & 7
        if layout > S.LAYOUT_CHUNK_BASED:
            raise FormatError(f"inode {nid}: invalid data layout {layout}")
        if extended:
            r = S.InodeExtended.unpack(head + self._read(pos + 32, 32))
            isize = 64
            size, mtime, nsec, nlink = r.size, r.mtime, r.mtime_nsec, r.nlink
        else:
            r = S.InodeCompact.unpack(head)  # type: ignore[assignment]
            isize = 32
            # Kernels >= 6.15 read the old i_reserved as seconds after the superblock's epoch
            # (build_time); older producers write 0 there, so both readings agree.
            size, nlink = r.size, r.nlink
            mtime, nsec = self.sb.build_time + r.mtime, self.sb.build_time_nsec
        mode = r.mode
        ftype = stat.S_IFMT(mode)
        if ftype not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                         stat.S_IFIFO, stat.S_IFSOCK):  # fmt: skip
            raise FormatError(f"inode {nid}: bogus mode {mode:o}")
        xisize = S.xattr_isize(r.xattr_icount)
        if r.xattr_icount == 1:
            raise FormatError(f"inode {nid}: xattr_icount 1 is invalid")
        info = EntryInfo(
            nid=nid, mode=mode, uid=r.uid, gid=r.gid, mtime=mtime, mtime_nsec=nsec, nlink=nlink,
            size=size, rdev=0, layout=layout, extended=extended, raw_u=r.u,
            data_off=pos + isize + xisize, xattr_isize=xisize, image=self,
        )  # fmt: skip
        if ftype in (stat.S_IFCHR, stat.S_IFBLK):
            info.rdev = S.decode_rdev(r.u)
        if xisize:
            info.xattrs = self._parse_xattrs(nid, pos + isize, xisize)
        if ftype == stat.S_IFLNK:
            if size > 4096 * 4:
                raise FormatError(f"inode {nid}: symlink of {size} bytes")
            info.symlink = self.read_inode(info, 0, size)
        elif ftype in (stat.S_IFDIR, stat.S_IFREG):
            pass
        elif size:
            raise FormatError(f"inode {nid}: special file with size {size}")
        return info

    def _parse_xattrs(self, nid: int, off: int, isize: int) -> dict[str, bytes]:
        body = self._read(off, isize)
        hdr = S.XattrIbodyHeader.unpack(body)
        out: dict[str, bytes] = {}
        p = 12 + 4 * hdr.shared_count
        if p > isize:
            raise FormatError(f"inode {nid}: xattr shared count overflows the xattr body")
        while p < isize:
            if p + 4 > isize:
                raise FormatError(f"inode {nid}: truncated xattr entry")
            e = S.XattrEntry.unpack(body, p)
            end = p + 4 + e.name_len + e.value_size
            if end > isize:
                raise FormatError(f"inode {nid}: xattr entry crosses the xattr body")
            name = self._xattr_name(e.name_index, body[p + 4 : p + 4 + e.name_len])
            out[name] = body[p + 4 + e.name_len : end]
            p = (end + 3) & ~3
        xbase = self.sb.xattr_blkaddr << self.blkszbits
        for i in range(hdr.shared_count):
            xid = struct.unpack_from("<I", body, 12 + 4 * i)[0]
            at = xbase + 4 * xid
            e = S.XattrEntry.unpack(self._read(at, 4))
            rest = self._read(at + 4, e.name_len + e.value_size)
            name = self._xattr_name(e.name_index, rest[: e.name_len])
            out.setdefault(name, rest[e.name_len :])
        return out

    @staticmethod
    def _xattr_name(index: int, suffix: bytes) -> str:
        if index & 0x80:
            raise FormatError("long xattr name prefixes are not supported")
        return S.join_xattr_name(index, suffix)

    # -- data mapping ---------------------------------------------------------------------

    def _chunk_table(self, info: EntryInfo) -> tuple[int, list[tuple[int, int | None]]]:
        """(chunk_bits, [(device_id, blkaddr|None)]) of a CHUNK_BASED inode."""
        cfmt = info.raw_u & 0xFFFF
        if cfmt & ~(S.CHUNK_FORMAT_BLKBITS_MASK | S.CHUNK_FORMAT_INDEXES):
            raise FormatError(f"inode {info.nid}: unsupported chunk format {cfmt:#x}")
        bits = self.blkszbits + (cfmt & S.CHUNK_FORMAT_BLKBITS_MASK)
        n = (info.size + (1 << bits) - 1) >> bits
        if n > _MAX_CHUNKS:
            raise FormatError(f"inode {info.nid}: {n} chunks is more than this reader accepts")
        out: list[tuple[int, int | None]] = []
        if cfmt & S.CHUNK_FORMAT_INDEXES:
            start = (info.data_off + 7) & ~7
            raw = self._read(start, 8 * n)
            for adv, dev, blk in struct.iter_unpack("<HHI", raw):
                out.append((dev & self._devmask, None if blk == S.NULL_ADDR else blk))
        else:
            start = (info.data_off + 3) & ~3
            raw = self._read(start, 4 * n)
            for (blk,) in struct.iter_unpack("<I", raw):
                out.append((0, None if blk == S.NULL_ADDR else blk))
        return bits, out

    def _unified(self, nid: int, dev: int, blk: int) -> int:
        if dev == 0:
            return blk
        if dev > len(self.devices):
            raise FormatError(f"inode {nid}: chunk on device {dev}, image has {len(self.devices)}")
        return self.devices[dev - 1].mapped_blkaddr + blk

    def layout_map(self, info: EntryInfo) -> tuple[list[tuple[int, int, int | None]], int]:
        """([(file_offset, length, unified_blkaddr|None)], inline_tail_length): the extents
        before the inline tail, and how many bytes at the end of the file are inline."""
        bs = self.block_size
        size = info.size
        if info.layout in COMPRESSED_LAYOUTS:
            raise FormatError(f"inode {info.nid}: the data is compressed: it has extents, not a block map")
        if size == 0:
            return [], 0
        if info.layout == S.LAYOUT_FLAT_PLAIN:
            return [(0, size, info.raw_u)], 0
        if info.layout == S.LAYOUT_FLAT_INLINE:
            tail = size % bs
            full = size - tail
            if tail == 0:
                raise FormatError(f"inode {info.nid}: FLAT_INLINE with a block-aligned size")
            if (info.data_off % bs) + tail > bs:
                raise FormatError(f"inode {info.nid}: inline data crosses a block boundary")
            ext = [(0, full, info.raw_u)] if full else []
            return ext, tail
        bits, table = self._chunk_table(info)
        cs = 1 << bits
        ext: list[tuple[int, int, int | None]] = []
        for i, (dev, blk) in enumerate(table):
            fo = i * cs
            ln = min(cs, size - fo)
            addr = None if blk is None else self._unified(info.nid, dev, blk)
            if ext:
                pfo, pln, paddr = ext[-1]
                if (addr is None and paddr is None) or (
                    addr is not None and paddr is not None and paddr + (pln >> self.blkszbits) == addr
                    and pln % bs == 0
                ):
                    ext[-1] = (pfo, pln + ln, paddr)
                    continue
            ext.append((fo, ln, addr))
        return ext, 0

    def extents(self, info: EntryInfo) -> list[tuple[int, int, int | None]]:
        """Where the file's bytes are: (file_offset, length, unified block address | None=hole).
        FormatError when part of the file is inline in the metadata (not block-addressable)."""
        ext, tail = self.layout_map(info)
        if tail:
            raise FormatError(f"inode {info.nid}: the last {tail} bytes are inline (build with -E^inline_data)")
        return ext

    def read_inode(self, info: EntryInfo, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes [offset, offset+length) of a file, directory or symlink."""
        size = info.size
        if length is None:
            length = size - offset
        offset = max(0, offset)
        end = min(size, offset + max(0, length))
        if end <= offset:
            return b""
        if info.layout in COMPRESSED_LAYOUTS:
            return self._read_compressed(info, offset, end)
        ext, tail = self.layout_map(info)
        parts: list[bytes] = []
        bs = self.block_size
        for fo, ln, addr in ext:
            a, b = max(fo, offset), min(fo + ln, end)
            if a >= b:
                continue
            if addr is None:
                parts.append(bytes(b - a))
            else:
                parts.append(self._read(addr * bs + (a - fo), b - a))
        if tail:
            fo = size - tail
            a, b = max(fo, offset), min(size, end)
            if a < b:
                parts.append(self._read(info.data_off + (a - fo), b - a))
        data = b"".join(parts)
        if len(data) != end - offset:
            raise FormatError(f"inode {info.nid}: data map does not cover the file")
        return data

    def zmap(self, info: EntryInfo) -> ZMap:
        """The extents of a compressed regular file (FormatError for anything this reader cannot
        decode the way the kernel does)."""
        if info.layout not in COMPRESSED_LAYOUTS or not info.is_reg:
            raise FormatError(f"inode {info.nid} is not a compressed regular file")
        zm = read_extents(self._read, info.data_off, info.size,
                          info.layout, what=f"inode {info.nid}", blkszbits=self.blkszbits)
        comp = self.compression
        for e in zm.extents:
            if e.head != S.LCLUSTER_PLAIN and not comp.zero_padding:
                raise FormatError(f"inode {info.nid}: lz4 without the zero_padding feature (erofs-utils before 1.0) "
                                  "is not supported")
            if e.blocks > comp.max_pclusterblks:
                raise FormatError(f"inode {info.nid}: a pcluster of {e.blocks} blocks, the superblock allows "
                                  f"{comp.max_pclusterblks}")
        return zm

    def _read_compressed(self, info: EntryInfo, offset: int, end: int) -> bytes:
        zm = self.zmap(info)
        bs = self.block_size
        interlaced = bool(zm.advise & S.Z_ADVISE_INTERLACED_PCLUSTER)
        parts = []
        for start, stop, e in zm.spans():
            if stop <= offset or start >= end:
                continue
            pcluster = self._read(e.blkaddr * bs, e.blocks * bs)
            if e.head == S.LCLUSTER_PLAIN:
                data = decode_plain(pcluster, start, stop - start, bs, interlaced=interlaced)
            else:
                data = decode_lz4(pcluster, stop - start, bs, what=f"inode {info.nid} extent at {start}")
            parts.append(data[max(0, offset - start) : min(stop, end) - start])
        out = b"".join(parts)
        if len(out) != end - offset:
            raise FormatError(f"inode {info.nid}: the extents do not cover the file")
        return out

    def read(self, path: bytes | str, offset: int = 0, length: int | None = None) -> bytes:
        return self.read_inode(self.lookup(path), offset, length)

    # -- directories ----------------------------------------------------------------------

    def _load_dir(self, nid: int) -> tuple[tuple[bytes, int, int], ...]:
        info = self.inode(nid)
        if not info.is_dir:
            raise FormatError(f"inode {nid} is not a directory")
        bs = self.block_size
        if info.size > _MAX_DIR_BYTES:
            raise FormatError(f"directory {nid} too large ({info.size} bytes)")
        data = self.read_inode(info)
        out: list[tuple[bytes, int, int]] = []
        prev: bytes | None = None
        for bstart in range(0, len(data), bs):
            blk = data[bstart : bstart + bs]
            maxsize = len(blk)
            if maxsize < 12:
                raise FormatError(f"directory {nid}: truncated block")
            nameoff0 = struct.unpack_from("<H", blk, 8)[0]
            if nameoff0 < 12 or nameoff0 % 12 or nameoff0 > maxsize:
                raise FormatError(f"directory {nid}: invalid first nameoff {nameoff0}")
            n = nameoff0 // 12
            ents = list(struct.iter_unpack("<QHBB", blk[:nameoff0]))
            for i, (cnid, noff, ftype, _) in enumerate(ents):
                if i + 1 < n:
                    nend = ents[i + 1][1]
                else:
                    z = blk.find(b"\0", noff, maxsize)
                    nend = maxsize if z < 0 else z
                if not nameoff0 <= noff < nend <= maxsize or nend - noff > S.NAME_MAX:
                    raise FormatError(f"directory {nid}: bogus dirent name offsets")
                name = blk[noff:nend]
                if prev is not None and name <= prev:
                    raise FormatError(f"directory {nid}: entries not in strictly increasing order")
                prev = name
                out.append((name, cnid, ftype))
        return tuple(out)

    def listdir(self, info: EntryInfo | int) -> list[tuple[bytes, int, int]]:
        """[(name, nid, file_type)] in on-disk order, including "." and ".."."""
        nid = info if isinstance(info, int) else info.nid
        return list(self._dir_cache(nid))

    def children(self, info: EntryInfo | int) -> list[tuple[bytes, int]]:
        return [(n, c) for n, c, _ in self.listdir(info) if n not in (b".", b"..")]

    def lookup(self, path: bytes | str) -> EntryInfo:
        """Resolve an absolute path (no symlink following)."""
        if isinstance(path, str):
            path = os.fsencode(path)
        cur = self.root
        for comp in path.split(b"/"):
            if not comp or comp == b".":
                continue
            if not cur.is_dir:
                raise NotADirectoryError(os.fsdecode(path))
            ents = self._dir_cache(cur.nid)
            nid = _bsearch(ents, comp)
            if nid is None:
                raise FileNotFoundError(os.fsdecode(path))
            cur = self.inode(nid)
        return cur

    def walk(self, *, max_entries: int = 50_000_000) -> Iterator[tuple[bytes, EntryInfo]]:
        """Yield ``(path, EntryInfo)``, the root first as b"/": a directory's entries in
        on-disk (name) order, then the contents of its subdirectories, depth first; hardlinked
        files appear under each name. A directory reachable twice (a cycle) and more than
        `max_entries` entries raise FormatError."""
        seen_dirs = {self.root_nid}
        count = 0
        stack: list[tuple[bytes, int, int]] = [(b"", self.root_nid, 0)]
        yield b"/", self.root
        while stack:
            prefix, nid, depth = stack.pop()
            if depth > _MAX_DEPTH:
                raise FormatError("EROFS directory tree too deep")
            kids = self.children(nid)
            subdirs: list[tuple[bytes, int, int]] = []
            for name, cnid in kids:
                count += 1
                if count > max_entries:
                    raise FormatError("EROFS tree has more entries than allowed")
                info = self.inode(cnid)
                path = prefix + b"/" + name
                yield path, info
                if info.is_dir:
                    if cnid in seen_dirs:
                        raise FormatError(f"EROFS directory cycle at {path!r}")
                    seen_dirs.add(cnid)
                    subdirs.append((path, cnid, depth + 1))
            # Yield subdirectory contents after their parent's entries, in name order.
            stack.extend(reversed(subdirs))

    # -- tree -----------------------------------------------------------------------------

    def to_tree(self, block_offset: int = 0, *, inline_tails: bool = False, max_entries: int = 50_000_000) -> Inode:
        """The image as a `tree.Inode` tree; regular files become `BlockMap`s at this image's
        unified block addresses + `block_offset` (data are not read). A file whose tail is
        inline (mkfs.erofs without -Enoinline_data) is a FormatError, or with `inline_tails` a
        `TailedBlockMap` carrying the tail bytes. Compressed files become `CompressedMap`s (their
        extents, no data read). FormatError too if blocks are not 4 KiB, or beyond `max_entries`."""
        if self.block_size != S.BLOCK_SIZE:
            raise FormatError("only 4 KiB-block images can be turned into block maps")
        with gc_paused():
            return self._to_tree(block_offset, inline_tails, max_entries)

    def _to_tree(self, block_offset: int, inline_tails: bool, max_entries: int) -> Inode:
        by_nid: dict[int, Inode] = {}

        def make(info: EntryInfo) -> Inode:
            node = Inode(
                mode=info.mode, uid=info.uid, gid=info.gid, mtime=info.mtime, mtime_nsec=info.mtime_nsec,
                xattrs=dict(info.xattrs), rdev=info.rdev,
            )  # fmt: skip
            if info.is_dir:
                node.children = {}
            elif stat.S_ISLNK(info.mode):
                node.symlink = info.symlink or b""
            elif info.is_reg and info.size:
                node.data = self._blockmap(info, block_offset, inline_tails)
            return node

        root = make(self.root)
        by_nid[self.root_nid] = root
        nodes: dict[bytes, Inode] = {b"/": root}
        for path, info in self.walk(max_entries=max_entries):
            if path == b"/":
                continue
            parent_path, _, name = path.rpartition(b"/")
            parent = nodes[parent_path or b"/"]
            node = by_nid.get(info.nid)
            if node is None:
                node = make(info)
                by_nid[info.nid] = node
            assert parent.children is not None
            parent.children[name] = node
            if info.is_dir:
                nodes[path] = node
        return root

    def _blockmap(self, info: EntryInfo, block_offset: int,
                  inline_tails: bool) -> BlockMap | TailedBlockMap | CompressedMap:
        if info.layout in COMPRESSED_LAYOUTS:
            return CompressedMap(self.zmap(info), block_offset, self.compression.max_distance or S.LZ4_MAX_DISTANCE)
        ext, tail = self.layout_map(info)
        if tail:
            if not inline_tails:
                raise FormatError(f"inode {info.nid}: data tail is inline; cannot point at it")
            full = info.size >> self.blkszbits
            return TailedBlockMap(
                size=info.size,
                blocks=[info.raw_u + i + block_offset for i in range(full)],
                tail=self.read_inode(info, full << self.blkszbits, tail),
            )
        if info.layout == S.LAYOUT_FLAT_PLAIN:
            bits = max(self.blkszbits, (info.size - 1).bit_length())
            return BlockMap(size=info.size, chunk_bits=bits, blocks=[info.raw_u + block_offset])
        bits, table = self._chunk_table(info)
        blocks = [None if b is None else self._unified(info.nid, d, b) + block_offset for d, b in table]
        return BlockMap(size=info.size, chunk_bits=bits, blocks=blocks)


def _bsearch(ents: tuple[tuple[bytes, int, int], ...], name: bytes) -> int | None:
    lo, hi = 0, len(ents)
    while lo < hi:
        mid = (lo + hi) // 2
        n = ents[mid][0]
        if n == name:
            return ents[mid][1]
        if n < name:
            lo = mid + 1
        else:
            hi = mid
    return None
