"""Check an EROFS image from elsewhere before the kernel sees it: the metadata trust boundary.

A merged metadata image that was not built on this node is hostile input for the kernel's EROFS
driver, which trusts what it reads. `check_image` parses it with its own bounds-checked code
(not the reader: it must also judge what the kernel would do with each field) and refuses with
a FormatError naming the inode and the field:

* the superblock (magic, 4 KiB blocks, checksum, only features this check understands);
* the device table against the expected geometry: one slot per layer, the same blocks and
  `mapped_blkaddr`, nothing else;
* every inode reachable from the root, each parsed exactly once (a directory reached twice is a
  loop; the work is proportional to the image): format bits, mode, size, inline xattrs and the
  shared xattrs they name, and the data layout: flat plain and flat inline blocks, chunk-based
  block maps and chunk indexes with their device ids. Every data extent lies inside the device,
  inside ONE region (this image or one layer's slot) and, for an inode's data outside this image,
  inside the one layer it claims. Compressed regular files (lz4, compact or full lcluster
  indexes) are decoded with the kernel's rules (erofs/zmap.py): every extent's pcluster, no
  larger than the superblock allows, lies inside one region like any other data extent; what the
  kernel would read differently (or features such as ztailpacking and fragments) is refused;
* directories and symlinks wholly inside this image; every directory block's dirents (first
  nameoff, strictly increasing names of 1..255 bytes without '/' or NUL, in bounds, file types
  matching their inodes, valid nids, "." = itself and ".." = its parent).
"""

from __future__ import annotations

import bisect
import stat
import struct
from collections import deque
from dataclasses import dataclass
from typing import Callable, NoReturn

from bdserver.erofs import structs as S
from bdserver.erofs.reader import COMPRESSED_LAYOUTS, KNOWN_INCOMPAT
from bdserver.erofs.zmap import read_extents
from bdserver.errors import FormatError

BS = S.BLOCK_SIZE
ReadAt = Callable[[int, int], bytes]

_FT = {stat.S_IFREG: S.FT_REG, stat.S_IFDIR: S.FT_DIR, stat.S_IFCHR: S.FT_CHRDEV, stat.S_IFBLK: S.FT_BLKDEV,
       stat.S_IFIFO: S.FT_FIFO, stat.S_IFSOCK: S.FT_SOCK, stat.S_IFLNK: S.FT_SYMLINK}
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_DIRENT = struct.Struct("<QHBB")
_SLOT_HI = struct.Struct("<HH")  # blocks_hi / uniaddr_hi of 48-bit kernels: must be 0 here


@dataclass(frozen=True)
class ExpectedSlot:
    """Where a layer sits on the device: blocks [mapped_blkaddr, mapped_blkaddr + blocks)."""

    mapped_blkaddr: int
    blocks: int


@dataclass(frozen=True)
class DeviceGeometry:
    """The device the image will be mounted from: the image itself in blocks [0, meta_blocks),
    layer slot k (device id k + 1) where `slots[k]` says, `total_blocks` in all."""

    meta_blocks: int
    slots: tuple[ExpectedSlot, ...] = ()
    total_blocks: int | None = None  # default: the end of the last region

    @classmethod
    def single(cls, blocks: int) -> "DeviceGeometry":
        """A stand-alone image: every byte the kernel reads is in it."""
        return cls(meta_blocks=blocks)


@dataclass(frozen=True)
class CheckReport:
    inodes: int
    directories: int
    entries: int
    chunk_indexes: int
    compressed_extents: int = 0


class _Region:
    """The device's regions (this image, then the layer slots), sorted and disjoint."""

    def __init__(self, geo: DeviceGeometry) -> None:
        regions = [(0, geo.meta_blocks, 0)] + [(s.mapped_blkaddr, s.mapped_blkaddr + s.blocks, k + 1)
                                               for k, s in enumerate(geo.slots)]
        if geo.meta_blocks <= 0 or any(s.blocks < 0 or s.mapped_blkaddr < 0 for s in geo.slots):
            raise FormatError("device geometry: empty image or negative slot")
        regions.sort()
        for (_, end, a), (start, _, b) in zip(regions, regions[1:]):
            if start < end:
                raise FormatError(f"device geometry: region {b} overlaps region {a}")
        self.total = max(r[1] for r in regions) if geo.total_blocks is None else geo.total_blocks
        if self.total < regions[-1][1]:
            raise FormatError("device geometry: a region lies past the end of the device")
        self.starts = [r[0] for r in regions]
        self.regions = regions

    def find(self, start: int, nblocks: int) -> int | None:
        """The region (0 = this image, k = slot k) holding [start, start + nblocks), or None."""
        i = bisect.bisect_right(self.starts, start) - 1
        if i < 0:
            return None
        rs, re, k = self.regions[i]
        return k if rs <= start and start + nblocks <= re else None


class _Bytes:
    """The image, bounds-checked: every read names what it was for."""

    def __init__(self, image: bytes | bytearray | memoryview | ReadAt, size: int) -> None:
        if callable(image):
            self._read_at: ReadAt | None = image
            self.buf = b""
        else:
            self._read_at = None
            self.buf = image
            size = min(size, len(image))
        self.size = size

    def get(self, off: int, n: int, what: str) -> bytes | memoryview:
        if off < 0 or n < 0 or off + n > self.size:
            raise FormatError(f"{what}: {n} bytes at {off} lie outside the {self.size}-byte image")
        if self._read_at is None:
            return memoryview(self.buf)[off : off + n]
        data = self._read_at(off, n)
        if len(data) != n:
            raise FormatError(f"{what}: image truncated at {off}")
        return data


@dataclass
class _Inode:
    nid: int
    label: _Label  # "inode N (path)" for messages
    fmt: int  # stat.S_IFMT of the mode
    size: int
    layout: int
    u: int
    body_end: int  # byte after the inode and its inline xattrs


class _Label:
    """ "inode N (/path)", built only when a message needs it (paths cost a walk up)."""

    def __init__(self, checker: "_Checker", nid: int, parent: int, name: bytes) -> None:
        self.checker, self.nid, self.parent, self.name = checker, nid, parent, name

    def __str__(self) -> str:
        if not self.name:
            return f"root inode {self.nid}"
        path = self.checker.path(self.parent).rstrip(b"/") + b"/" + self.name
        return f"inode {self.nid} ({path.decode('utf-8', 'replace')})"


class _Checker:
    def __init__(self, image: bytes | bytearray | memoryview | ReadAt, geo: DeviceGeometry, name: str) -> None:
        self.name = name
        self.dots = 0  # "." and ".." entries seen in the directory being checked
        self.region = _Region(geo)
        self.geo = geo
        self.img = _Bytes(image, geo.meta_blocks * BS)
        if not callable(image) and len(image) > geo.meta_blocks * BS:
            self.fail(f"the image is {len(image)} bytes, the device gives it {geo.meta_blocks} blocks")
        self.types: dict[int, int] = {}  # nid -> S_IFMT of every inode parsed so far
        self.dirs: dict[int, tuple[int, bytes]] = {}  # dir nid -> (parent nid, name): paths for messages
        self.entries = 0
        self.chunk_indexes = 0
        self.extents = 0

    def fail(self, msg: str) -> NoReturn:
        raise FormatError(f"{self.name}: {msg}")

    # -- superblock and device table -------------------------------------------------------

    def superblock(self) -> None:
        raw = self.img.get(S.SB_OFFSET, S.Superblock.SIZE, "superblock")
        sb = self.sb = S.Superblock.unpack(raw)
        if sb.magic != S.MAGIC:
            self.fail(f"superblock magic {sb.magic:#010x} is not EROFS")
        if sb.blkszbits != S.BLKSZBITS:
            self.fail(f"superblock blkszbits {sb.blkszbits}: the device uses 4 KiB blocks")
        if sb.feature_compat & S.COMPAT_SB_CHKSUM:
            got = S.sb_checksum(bytes(self.img.get(0, BS, "superblock checksum range")))
            if got != sb.checksum:
                self.fail(f"superblock checksum {sb.checksum:#010x} does not match the contents ({got:#010x})")
        extra = sb.feature_incompat & ~KNOWN_INCOMPAT
        if extra:
            names = [S.INCOMPAT_NAMES.get(1 << b, hex(1 << b)) for b in range(32) if extra >> b & 1]
            self.fail(f"superblock feature_incompat has unsupported features: {', '.join(names)}")
        for field, value in (("sb_extslots", sb.sb_extslots), ("dirblkbits", sb.dirblkbits),
                             ("packed_nid", sb.packed_nid), ("xattr_prefix_count", sb.xattr_prefix_count)):
            if value:
                self.fail(f"superblock {field} is {value}; it must be 0")
        if sb.blocks > self.geo.meta_blocks:
            self.fail(f"superblock blocks {sb.blocks} exceeds the image's {self.geo.meta_blocks} blocks")
        self.compression()
        self.meta_base = sb.meta_blkaddr * BS
        self.xattr_base = sb.xattr_blkaddr * BS
        if self.meta_base >= self.img.size or self.xattr_base > self.img.size:
            self.fail("superblock meta_blkaddr or xattr_blkaddr lies outside the image")

    def compression(self) -> None:
        """The lz4 settings: with COMPR_CFGS an lz4 record (and no other algorithm) right after the
        superblock, before the device table; without it the superblock's lz4 window."""
        sb = self.sb
        self.zero_padding = bool(sb.feature_incompat & S.INCOMPAT_ZERO_PADDING)
        self.max_pclusterblks = 1
        self.cfg_end = S.SB_OFFSET + S.Superblock.SIZE
        if not sb.feature_incompat & S.INCOMPAT_COMPR_CFGS:
            return
        if sb.u1 & ~(1 << S.COMPR_LZ4):
            self.fail(f"superblock available_compr_algs {sb.u1:#x}: only lz4 is supported")
        if sb.u1:
            raw = self.img.get(self.cfg_end, S.Lz4Config.SIZE, "lz4 compression config")
            length = _U16.unpack_from(raw)[0]
            if length != S.Lz4Config.SIZE - 2:
                self.fail(f"lz4 compression config of {length} bytes (14 expected)")
            cfg = S.Lz4Config.unpack(raw)
            if not 1 <= cfg.max_pclusterblks <= S.PCLUSTER_MAX_SIZE // BS:
                self.fail(f"lz4 max_pclusterblks {cfg.max_pclusterblks} is out of range")
            self.max_pclusterblks = cfg.max_pclusterblks
            self.cfg_end += S.Lz4Config.SIZE

    def device_table(self) -> None:
        sb = self.sb
        n = sb.extra_devices if sb.feature_incompat & S.INCOMPAT_DEVICE_TABLE else 0
        want = self.geo.slots
        if n != len(want):
            self.fail(f"device table has {n} devices, the layer plan has {len(want)}")
        self.devmask = (1 << n.bit_length()) - 1 if n else 0  # roundup_pow_of_two(n + 1) - 1
        if not n:
            return
        start = sb.devt_slotoff * S.DeviceSlot.SIZE
        if start < self.cfg_end:
            self.fail(f"device table at byte {start} overlaps the superblock or its compression config")
        raw = self.img.get(start, n * S.DeviceSlot.SIZE, "device table")
        for k, w in enumerate(want):
            slot = S.DeviceSlot.unpack(raw, k * S.DeviceSlot.SIZE)
            hi = _SLOT_HI.unpack_from(raw, k * S.DeviceSlot.SIZE + 72)
            if not slot.tag:
                self.fail(f"device {k + 1}: empty tag (kernels 6.4-6.5 refuse it)")
            if (slot.blocks, slot.mapped_blkaddr) != (w.blocks, w.mapped_blkaddr) or any(hi):
                self.fail(f"device {k + 1}: blocks {slot.blocks} at mapped_blkaddr {slot.mapped_blkaddr}, the layer "
                          f"plan has {w.blocks} at {w.mapped_blkaddr}")

    # -- inodes ----------------------------------------------------------------------------

    def path(self, dir_nid: int) -> bytes:
        parts = []
        seen = 0
        while dir_nid in self.dirs and seen <= len(self.dirs):
            parent, name = self.dirs[dir_nid]
            if parent == dir_nid:
                break
            parts.append(name)
            dir_nid = parent
            seen += 1
        return b"/" + b"/".join(reversed(parts))

    def inode(self, nid: int, label: _Label) -> _Inode:
        if nid > self.img.size >> S.ISLOT_BITS:
            self.fail(f"{label}: nid {nid} lies outside the image")
        pos = self.meta_base + (nid << S.ISLOT_BITS)
        if pos < self.cfg_end:
            self.fail(f"{label}: nid {nid} overlaps the superblock")
        head = self.img.get(pos, 32, label)
        fmt = _U16.unpack_from(head)[0]
        if fmt & ~0xF:
            self.fail(f"{label}: i_format {fmt:#x} has unknown bits")
        layout = (fmt >> 1) & 7
        if layout > S.LAYOUT_CHUNK_BASED:
            self.fail(f"{label}: i_format data layout {layout} is invalid")
        if fmt & 1:
            r = S.InodeExtended.unpack(self.img.get(pos, 64, label))
            isize = 64
            if r.reserved or any(r.reserved2):
                self.fail(f"{label}: reserved fields of the extended inode are not 0")
        else:
            r = S.InodeCompact.unpack(head)  # type: ignore[assignment]
            isize = 32
        ftype = stat.S_IFMT(r.mode)
        if ftype not in _FT:
            self.fail(f"{label}: i_mode {r.mode:o} has no valid file type")
        if r.size >= 1 << 63:
            self.fail(f"{label}: i_size {r.size} is negative to the kernel")
        if r.xattr_icount == 1:
            self.fail(f"{label}: i_xattr_icount 1 is invalid")
        xisize = S.xattr_isize(r.xattr_icount)
        if xisize:
            self.xattrs(label, pos + isize, xisize)
        ino = _Inode(nid, label, ftype, r.size, layout, r.u, pos + isize + xisize)
        self.types[nid] = ftype
        if layout in COMPRESSED_LAYOUTS and ftype != stat.S_IFREG:
            self.fail(f"{label}: a compressed directory, symlink or special file is not supported")
        if ftype == stat.S_IFREG:
            self.data(ino, in_image=False)
        elif ftype == stat.S_IFLNK:
            if not 0 < r.size < BS:
                self.fail(f"{label}: symlink i_size {r.size} is not 1..4095")
            self.data(ino, in_image=True)
        elif ftype != stat.S_IFDIR and r.size:
            self.fail(f"{label}: i_size {r.size} of a device, fifo or socket must be 0")
        return ino

    def xattrs(self, label: _Label, off: int, isize: int) -> None:
        body = self.img.get(off, isize, f"{label}: xattrs")
        shared = body[4]
        p = 12 + 4 * shared
        if p > isize:
            self.fail(f"{label}: xattr h_shared_count {shared} overflows the {isize}-byte xattr body")
        for i in range(shared):
            xid = _U32.unpack_from(body, 12 + 4 * i)[0]
            at = self.xattr_base + 4 * xid
            e = S.XattrEntry.unpack(self.img.get(at, 4, f"{label}: shared xattr {xid}"))
            self.xattr_name(label, e.name_index)
            self.img.get(at + 4, e.name_len + e.value_size, f"{label}: shared xattr {xid}")
        while p < isize:
            if p + 4 > isize:
                self.fail(f"{label}: xattr entry at +{p} is truncated")
            e = S.XattrEntry.unpack(body, p)
            self.xattr_name(label, e.name_index)
            p = (p + 4 + e.name_len + e.value_size + 3) & ~3
            if p > isize:
                self.fail(f"{label}: xattr entry runs past the {isize}-byte xattr body")

    def xattr_name(self, label: _Label, index: int) -> None:
        if index not in S.XATTR_PREFIXES:
            self.fail(f"{label}: xattr name index {index} is unknown (long prefixes are not supported)")

    # -- data ------------------------------------------------------------------------------

    def data(self, ino: _Inode, *, in_image: bool) -> None:
        """Check where the inode's bytes are. `in_image`: they must all be in this image
        (directories and symlinks: they are read while the image is checked or mounted)."""
        size, layout = ino.size, ino.layout
        if layout in COMPRESSED_LAYOUTS:
            self.compressed(ino)
            return
        if layout == S.LAYOUT_CHUNK_BASED:
            if in_image:
                self.fail(f"{ino.label}: a directory or symlink cannot be chunk-based here")
            self.chunks(ino)
            return
        full = size // BS if layout == S.LAYOUT_FLAT_INLINE else (size + BS - 1) // BS
        if layout == S.LAYOUT_FLAT_INLINE:
            tail = size % BS
            if not tail:
                self.fail(f"{ino.label}: flat inline data with a block-aligned i_size {size}")
            if ino.body_end % BS + tail > BS:
                self.fail(f"{ino.label}: {tail} bytes of inline data cross a block boundary")
            self.img.get(ino.body_end, tail, f"{ino.label}: inline data")
        if full:
            self.extent(ino, "i_u (raw_blkaddr)", ino.u, full, 0, in_image)

    def extent(self, ino: _Inode, field: str, unified: int, nblocks: int, claim: int, in_image: bool) -> int:
        """Region of [unified, unified + nblocks); it must be one region, this image when
        `in_image`, else this image or the layer `claim` (0: whichever it is in first)."""
        k = self.region.find(unified, nblocks) if unified + nblocks <= self.region.total else None
        if k is None:
            self.fail(f"{ino.label}: {field}: blocks [{unified}, {unified + nblocks}) are not inside one region "
                      f"of the {self.region.total}-block device")
        if in_image and k != 0:
            self.fail(f"{ino.label}: {field}: blocks [{unified}, {unified + nblocks}) lie outside this image")
        if claim and k and k != claim:
            self.fail(f"{ino.label}: {field}: blocks [{unified}, {unified + nblocks}) lie in layer {k}, the inode's "
                      f"other data in layer {claim}")
        return k

    def compressed(self, ino: _Inode) -> None:
        if (ino.size >> S.BLKSZBITS) * 2 > self.img.size:  # compact indexes take 2 bytes an lcluster at least
            self.fail(f"{ino.label}: i_size {ino.size} needs more lcluster indexes than the image holds")
        try:
            zm = read_extents(lambda off, n: bytes(self.img.get(off, n, f"{ino.label}: compression map")),
                              ino.body_end, ino.size, ino.layout, what=str(ino.label))
        except FormatError as e:
            self.fail(str(e))
        claim = 0
        for e in zm.extents:
            if e.head != S.LCLUSTER_PLAIN and not self.zero_padding:
                self.fail(f"{ino.label}: lz4 data without the zero_padding feature is not supported")
            if e.blocks > self.max_pclusterblks:
                self.fail(f"{ino.label}: a pcluster of {e.blocks} blocks, the superblock allows {self.max_pclusterblks}")
            k = self.extent(ino, f"pcluster of the extent at byte {e.lstart}", e.blkaddr, e.blocks, claim, False)
            claim = claim or k
        self.extents += len(zm.extents)

    def chunks(self, ino: _Inode) -> None:
        cfmt = ino.u & 0xFFFF
        if cfmt & ~(S.CHUNK_FORMAT_BLKBITS_MASK | S.CHUNK_FORMAT_INDEXES) or ino.u >> 16:
            self.fail(f"{ino.label}: chunk format {ino.u:#x} has unsupported bits")
        bits = S.BLKSZBITS + (cfmt & S.CHUNK_FORMAT_BLKBITS_MASK)
        cs = 1 << bits
        n = (ino.size + cs - 1) >> bits
        unit = 8 if cfmt & S.CHUNK_FORMAT_INDEXES else 4
        start = (ino.body_end + unit - 1) & ~(unit - 1)
        if n * unit > self.img.size:
            self.fail(f"{ino.label}: i_size {ino.size} needs {n} chunk indexes, more than the image holds")
        raw = self.img.get(start, n * unit, f"{ino.label}: chunk indexes")
        self.chunk_indexes += n
        claim = 0
        full = cs >> S.BLKSZBITS
        last = (((ino.size - (n - 1) * cs) + BS - 1) >> S.BLKSZBITS) if n else 0
        if unit == 4:
            entries = ((0, 0, b) for (b,) in struct.iter_unpack("<I", raw))
        else:
            entries = struct.iter_unpack("<HHI", raw)  # type: ignore[assignment]
        for i, (advise, dev, blk) in enumerate(entries):
            if blk == S.NULL_ADDR:
                continue
            nb = full if i + 1 < n else last
            if advise:
                self.fail(f"{ino.label}: chunk {i}: reserved advise field {advise:#x} is not 0")
            dev &= self.devmask
            if dev:
                if dev > len(self.geo.slots):
                    self.fail(f"{ino.label}: chunk {i}: device_id {dev}, the image has {len(self.geo.slots)} devices")
                slot = self.geo.slots[dev - 1]
                if blk + nb > slot.blocks:
                    self.fail(f"{ino.label}: chunk {i}: device {dev} blocks [{blk}, {blk + nb}) lie outside its "
                              f"{slot.blocks} blocks")
                blk += slot.mapped_blkaddr
            k = self.extent(ino, f"chunk {i}", blk, nb, claim, False)
            claim = claim or k

    # -- directories -----------------------------------------------------------------------

    def directory(self, d: _Inode, parent: int) -> list[tuple[_Inode, bytes]]:
        """Check the directory's blocks; return its subdirectories, each parsed once."""
        if not 0 < d.size <= self.img.size:
            self.fail(f"{d.label}: directory i_size {d.size} is empty or larger than the image")
        self.data(d, in_image=True)
        if d.layout == S.LAYOUT_FLAT_INLINE:
            full = d.size // BS
            tail = self.img.get(d.body_end, d.size % BS, f"{d.label}: inline data")
        else:
            full = (d.size + BS - 1) // BS
            tail = b""
        subdirs: list[tuple[_Inode, bytes]] = []
        prev: bytes | None = None
        self.dots = 0
        for b in range(full + (1 if tail else 0)):
            if b < full:
                blk = self.img.get((d.u + b) * BS, min(BS, d.size - b * BS), f"{d.label}: directory block {b}")
            else:
                blk = tail
            prev = self.dirblock(d, b, blk, parent, prev, subdirs)
        if prev is None or self.dots != 2:
            self.fail(f"{d.label}: the '.' or '..' entry is missing")
        return subdirs

    def dirblock(self, d: _Inode, b: int, blk: bytes | memoryview, parent: int, prev: bytes | None,
                 subdirs: list[tuple[_Inode, bytes]]) -> bytes | None:
        maxsize = len(blk)
        where = f"{d.label}: directory block {b}"
        if maxsize < 12:
            self.fail(f"{where}: {maxsize} bytes cannot hold a dirent")
        nameoff0 = _U16.unpack_from(blk, 8)[0]
        if nameoff0 < 12 or nameoff0 % 12 or nameoff0 >= maxsize:
            self.fail(f"{where}: first nameoff {nameoff0} is invalid")
        ents = list(_DIRENT.iter_unpack(blk[:nameoff0]))
        for i, (nid, noff, ftype, _) in enumerate(ents):
            if i + 1 < len(ents):
                nend = ents[i + 1][1]
            else:
                rest = bytes(blk[noff:maxsize]) if noff < maxsize else b""
                z = rest.find(b"\0")
                nend = maxsize if z < 0 else noff + z
            if not nameoff0 <= noff < nend <= maxsize or nend - noff > S.NAME_MAX:
                self.fail(f"{where}: dirent {i} name at [{noff}, {nend}) is out of order or out of bounds")
            name = bytes(blk[noff:nend])
            if b"/" in name or b"\0" in name:
                self.fail(f"{where}: dirent {i} name {name[:64]!r} contains '/' or NUL")
            if prev is not None and name <= prev:
                self.fail(f"{where}: dirent {name[:64]!r} is not after {prev[:64]!r} (names must be sorted and unique)")
            prev = name
            self.entries += 1
            if name in (b".", b".."):
                want = d.nid if name == b"." else parent
                if nid != want or ftype != S.FT_DIR:
                    self.fail(f"{where}: {name.decode()!r} names nid {nid}, not directory {want}")
                self.dots += 1
                continue
            ftype_of = self.types.get(nid)
            label = _Label(self, nid, d.nid, name)
            if ftype_of is None:
                child = self.inode(nid, label)
                ftype_of = child.fmt
                if ftype_of == stat.S_IFDIR:
                    subdirs.append((child, name))
            elif ftype_of == stat.S_IFDIR:
                self.fail(f"{where}: {label} is a directory reached twice (a directory loop or hardlink)")
            if ftype != _FT[ftype_of]:
                self.fail(f"{where}: dirent {name[:64]!r} file_type {ftype} does not match {label}")
        return prev

    def run(self) -> CheckReport:
        self.superblock()
        self.device_table()
        root_nid = self.sb.root_nid
        root = self.inode(root_nid, _Label(self, root_nid, root_nid, b""))
        if root.fmt != stat.S_IFDIR:
            self.fail(f"root inode {root_nid} is not a directory")
        self.dirs[root_nid] = (root_nid, b"")
        todo: deque[tuple[_Inode, int]] = deque([(root, root_nid)])
        ndirs = 0
        while todo:
            d, parent = todo.popleft()
            ndirs += 1
            for sub, name in self.directory(d, parent):
                self.dirs[sub.nid] = (d.nid, name)
                todo.append((sub, d.nid))
        return CheckReport(inodes=len(self.types), directories=ndirs, entries=self.entries,
                           chunk_indexes=self.chunk_indexes, compressed_extents=self.extents)


def check_image(image: bytes | bytearray | memoryview | ReadAt, geometry: DeviceGeometry | None = None, *,
                name: str = "EROFS image") -> CheckReport:
    """Check `image` (its bytes, or a ``read_at(offset, length)`` of the device's first
    `geometry.meta_blocks` blocks) for mounting on a device laid out as `geometry` (default: the
    image alone). FormatError names the inode and the field of the first problem found."""
    if geometry is None:
        if callable(image):
            raise ValueError("a read_at image needs its geometry")
        geometry = DeviceGeometry.single((len(image) + BS - 1) // BS)
    return _Checker(image, geometry, name).run()


__all__ = ["CheckReport", "DeviceGeometry", "ExpectedSlot", "check_image"]
