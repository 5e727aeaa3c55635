"""Where the bytes of a file compressed by EROFS itself are: lcluster indexes <-> extents.

EROFS compresses with fixed-size output: a file is cut into logical clusters (lclusters, one
block here); an *extent* (the bytes one physical cluster decompresses to) starts at a HEAD
lcluster (at `clusterofs` inside it) and runs to the next head or the end of the file; its
pcluster is `blocks` blocks from `blkaddr`, big pclusters giving their block count in the first
NONHEAD lcluster after the head (delta[0] = D0_CBLKCNT | blocks). Producers store the indexes
FULL (8 bytes per lcluster) or COMPACT (2 or 4 bits-packed bytes per lcluster, a block address
per pack).

`read_extents` decodes either form into `ZExtent`s with the kernel's own rules (fs/erofs/zmap.c:
the head a NONHEAD looks back to, the pcluster size of a head, the pack arithmetic of compact
indexes), so a file means here what it means to the kernel; whatever the kernel would not read
the same way, or that this module could not write back exactly, is a FormatError naming the
inode and the feature. `encode_full` writes extents as FULL indexes, the one form bdserver
writes: position independent (compact indexes depend on where the inode sits), so merged
metadata can carry a layer's extents with the block addresses moved by the layer's place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Sequence

from bdserver.erofs import structs as S
from bdserver.errors import FormatError

ReadAt = Callable[[int, int], bytes]

MAX_EXTENT_LCLUSTERS = S.LI_D0_CBLKCNT - 1  # delta[0] must stay below the CBLKCNT bit
MAX_LCLUSTERS = 1 << 25  # 128 GiB of 4 KiB lclusters: a hostile i_size is refused before any allocation
# advise bits kept when a layer's extents are written into other metadata (all FULL there)
CARRIED_ADVISE = S.Z_ADVISE_BIG_PCLUSTER_1 | S.Z_ADVISE_BIG_PCLUSTER_2 | S.Z_ADVISE_INTERLACED_PCLUSTER
_REFUSED_ADVISE = {
    S.Z_ADVISE_INLINE_PCLUSTER: "ztailpacking (an inline tail pcluster; build the layer without -Eztailpacking)",
    S.Z_ADVISE_FRAGMENT_PCLUSTER: "fragments (data in the packed inode; build the layer without -Efragments)",
}
_U32 = struct.Struct("<I")
_INDEX = S.LclusterIndex.STRUCT  # FULL indexes: read and written in bulk with the struct's table
_VCNT = {4: 2, 2: 16}  # lclusters per pack of compact indexes with 4 and 2 bytes per lcluster


@dataclass(frozen=True)
class ZExtent:
    """File bytes [lstart, next extent's lstart or i_size) are what the pcluster of `blocks`
    blocks at `blkaddr` decodes to: raw (`head` LCLUSTER_PLAIN) or by the algorithm of HEAD1 /
    HEAD2."""

    lstart: int
    head: int
    blkaddr: int
    blocks: int


@dataclass(frozen=True)
class ZMap:
    """A compressed inode's map: its header fields and extents in file order."""

    size: int
    advise: int
    algorithmtype: int
    extents: tuple[ZExtent, ...]

    def algorithm(self, head: int) -> int | None:
        """The algorithm of extents with this head type (None: stored raw)."""
        if head == S.LCLUSTER_PLAIN:
            return None
        return self.algorithmtype & 0xF if head == S.LCLUSTER_HEAD1 else self.algorithmtype >> 4

    def spans(self) -> list[tuple[int, int, ZExtent]]:
        """(start, end, extent) of each extent in the file."""
        ext = self.extents
        return [(e.lstart, ext[k + 1].lstart if k + 1 < len(ext) else self.size, e) for k, e in enumerate(ext)]

    @property
    def blocks(self) -> int:
        return sum(e.blocks for e in self.extents)


@dataclass
class _Lcluster:
    """One lcluster index as the kernel loads it: type, a head's clusterofs and pblk, a NONHEAD's
    delta[0] (1 when it carries a block count) and that count (0: none)."""

    type: int
    clusterofs: int = 0
    pblk: int = 0
    delta0: int = 0
    cblocks: int = 0
    partial: bool = False


def read_extents(read: ReadAt, body_end: int, size: int, layout: int, *, what: str,
                 blkszbits: int = S.BLKSZBITS) -> ZMap:
    """The extents of a compressed inode whose inode + inline xattrs end at byte `body_end`;
    `read(offset, length)` reads the image (bounds-checked by the caller)."""
    bs = 1 << blkszbits
    h = S.ZMapHeader.unpack(read(S.zmap_header_pos(body_end), S.ZMapHeader.SIZE))
    if h.clusterbits & S.Z_FRAGMENT_INODE_BIT:
        raise FormatError(f"{what}: the whole file is a fragment in the packed inode (fragments are not supported)")
    if h.clusterbits & 0x7F:
        raise FormatError(f"{what}: lcluster of 2^{blkszbits + (h.clusterbits & 0xF)} bytes (only one block is "
                          "supported)")
    advise = h.advise
    if layout == S.LAYOUT_COMPRESSED_FULL and advise & S.Z_ADVISE_COMPACTED_2B:
        raise FormatError(f"{what}: encoded extents (FULL indexes with advise bit 0, kernels 6.15+) are not supported")
    for bit, name in _REFUSED_ADVISE.items():
        if advise & bit:
            raise FormatError(f"{what}: {name} is not supported")
    unknown = advise & ~(S.Z_ADVISE_COMPACTED_2B | CARRIED_ADVISE)
    if unknown:
        raise FormatError(f"{what}: unknown compression advise bits {unknown:#x}")
    n = (size + bs - 1) >> blkszbits
    if n > MAX_LCLUSTERS:
        raise FormatError(f"{what}: i_size {size} needs {n} lclusters, more than this reader accepts")
    if layout == S.LAYOUT_COMPRESSED_FULL:
        table = _full(read, S.full_index_pos(body_end), n, advise, what)
    else:
        big1, big2 = bool(advise & S.Z_ADVISE_BIG_PCLUSTER_1), bool(advise & S.Z_ADVISE_BIG_PCLUSTER_2)
        if big1 != big2:
            raise FormatError(f"{what}: compact indexes with big pcluster for one head type only")
        table = _compact(read, S.zmap_header_pos(body_end) + S.ZMapHeader.SIZE, n, advise, what)
    zm = ZMap(size, advise, h.algorithmtype, _extents(table, size, advise, what, bs))
    for e in zm.extents:
        alg = zm.algorithm(e.head)
        if alg is not None and alg != S.COMPR_LZ4:
            raise FormatError(f"{what}: compression algorithm {S.COMPR_NAMES.get(alg, alg)} is not supported (lz4 only)")
    return zm


def _full(read: ReadAt, start: int, n: int, advise: int, what: str) -> list[_Lcluster]:
    big = advise & (S.Z_ADVISE_BIG_PCLUSTER_1 | S.Z_ADVISE_BIG_PCLUSTER_2)
    out = []
    for lcn, (adv, ofs, u) in enumerate(_INDEX.iter_unpack(read(start, _INDEX.size * n))):
        t = adv & 3
        if t == S.LCLUSTER_NONHEAD:
            d0 = u & 0xFFFF
            if d0 & S.LI_D0_CBLKCNT:
                if not big:
                    raise FormatError(f"{what}: lcluster {lcn} has a block count without big pclusters")
                out.append(_Lcluster(t, delta0=1, cblocks=d0 & ~S.LI_D0_CBLKCNT))
            else:
                out.append(_Lcluster(t, delta0=d0))
        else:
            out.append(_Lcluster(t, clusterofs=ofs, pblk=u, partial=bool(adv & S.LI_PARTIAL_REF)))
    return out


def _compact(read: ReadAt, ebase: int, n: int, advise: int, what: str) -> list[_Lcluster]:
    """Compact indexes: 4-byte-per-lcluster packs (2 lclusters) up to a 32-byte boundary, then
    (COMPACTED_2B) 2-byte packs of 16 for whole groups of 16, then 4-byte packs; each pack ends
    with the block address its heads count from."""
    initial = ((32 - ebase % 32) // 4) & 7
    two_b = (n - initial) // 16 * 16 if advise & S.Z_ADVISE_COMPACTED_2B and initial < n else 0
    regions: list[tuple[int, int, int]] = []  # (first lcn, lclusters, bytes per lcluster)
    first = 0
    for count, unit in ((min(initial, n), 4), (two_b, 2), (max(0, n - initial - two_b), 4)):
        if count:
            regions.append((first, count, unit))
            first += count
    size = sum(-(-count // _VCNT[unit]) * _VCNT[unit] * unit for _, count, unit in regions)
    raw = read(ebase, size)
    big = bool(advise & S.Z_ADVISE_BIG_PCLUSTER_1)
    out: list[_Lcluster] = []
    off = 0
    for first, count, unit in regions:
        vcnt = _VCNT[unit]
        packbytes = vcnt * unit
        encodebits = (packbytes - 4) * 8 // vcnt
        for pstart in range(0, count, vcnt):
            pack = raw[off : off + packbytes]
            off += packbytes
            fields = []
            for i in range(vcnt):
                bit = encodebits * i
                v = int.from_bytes(pack[bit // 8 : bit // 8 + 4], "little") >> (bit & 7)
                fields.append((v & 0xFFF, (v >> 12) & 3))
            base = _U32.unpack_from(pack, packbytes - 4)[0]
            for i in range(min(vcnt, count - pstart)):
                out.append(_compact_one(fields, i, vcnt, base, big, what, first + pstart + i))
    return out


def _compact_one(fields: list[tuple[int, int]], i: int, vcnt: int, base: int, big: bool, what: str,
                 lcn: int) -> _Lcluster:
    """Lcluster `i` of a pack as the kernel's compact loader sees it."""
    lo, t = fields[i]
    if t == S.LCLUSTER_NONHEAD:
        if lo & S.LI_D0_CBLKCNT:
            if not big:
                raise FormatError(f"{what}: lcluster {lcn} has a block count without big pclusters")
            return _Lcluster(t, delta0=1, cblocks=lo & ~S.LI_D0_CBLKCNT)
        if i + 1 != vcnt:
            return _Lcluster(t, delta0=lo)
        plo, pt = fields[i - 1]  # the pack's last lcluster stores delta[1]: delta[0] comes from its neighbour
        prev = 0 if pt != S.LCLUSTER_NONHEAD else 1 if plo & S.LI_D0_CBLKCNT else plo
        return _Lcluster(t, delta0=prev + 1)
    # a head: its pcluster follows those of the heads before it in this pack
    nblk = 0 if big else 1
    j = i
    while j > 0:
        j -= 1
        plo, pt = fields[j]
        if pt == S.LCLUSTER_NONHEAD:
            if big:
                if plo & S.LI_D0_CBLKCNT:
                    j -= 1
                    nblk += plo & ~S.LI_D0_CBLKCNT
                    continue
                if plo <= 1:
                    raise FormatError(f"{what}: lcluster {lcn}: a big-pcluster pack has a plain delta of {plo}")
                j -= plo - 2
                continue
            j -= plo
            if j >= 0:
                nblk += 1
        else:
            nblk += 1
    return _Lcluster(t, clusterofs=lo, pblk=base + nblk)


def _extents(table: Sequence[_Lcluster], size: int, advise: int, what: str, bs: int) -> tuple[ZExtent, ...]:
    n = len(table)
    if not n:
        return ()
    if table[0].type == S.LCLUSTER_NONHEAD or table[0].clusterofs:
        raise FormatError(f"{what}: lcluster 0 is not the head of an extent starting at byte 0")
    big1, big2 = bool(advise & S.Z_ADVISE_BIG_PCLUSTER_1), bool(advise & S.Z_ADVISE_BIG_PCLUSTER_2)
    out: list[ZExtent] = []
    head = 0
    for lcn, lc in enumerate(table):
        if lc.type == S.LCLUSTER_NONHEAD:
            if not 1 <= lc.delta0 <= lcn - head:  # the kernel's look-back must land on this extent
                raise FormatError(f"{what}: lcluster {lcn}: delta[0] {lc.delta0} does not lead back to its head "
                                  f"lcluster {head}")
            if lcn - head > MAX_EXTENT_LCLUSTERS:
                raise FormatError(f"{what}: an extent of more than {MAX_EXTENT_LCLUSTERS} lclusters")
            continue
        if lc.clusterofs >= bs:
            raise FormatError(f"{what}: lcluster {lcn}: clusterofs {lc.clusterofs} is not inside the lcluster")
        lstart = lcn * bs + lc.clusterofs
        if lstart >= size:  # a sentinel head at EOF (mkfs writes one): no extent starts there
            continue
        if lc.partial:
            raise FormatError(f"{what}: lcluster {lcn}: a partially referenced pcluster (dedupe) is not supported")
        head = lcn
        bigp = big1 if lc.type == S.LCLUSTER_HEAD1 else big2
        blocks = 1
        if bigp and (lcn + 1) * bs < size:
            nxt = table[lcn + 1]
            if nxt.type == S.LCLUSTER_NONHEAD:
                if nxt.delta0 != 1:
                    raise FormatError(f"{what}: lcluster {lcn + 1}: no block count after a big-pcluster head")
                blocks = nxt.cblocks or 1
        if lc.pblk + blocks > S.NULL_ADDR or blocks * bs > S.PCLUSTER_MAX_SIZE:
            raise FormatError(f"{what}: lcluster {lcn}: pcluster of {blocks} blocks at {lc.pblk} is out of range")
        out.append(ZExtent(lstart, lc.type, lc.pblk, blocks))
    for k, e in enumerate(out):
        end = out[k + 1].lstart if k + 1 < len(out) else size
        if e.head == S.LCLUSTER_PLAIN and end - e.lstart > bs:  # the kernel copies raw extents of one block
            raise FormatError(f"{what}: a raw extent of {end - e.lstart} bytes (more than one block)")
    return tuple(out)


def encode_full(zm: ZMap, block_offset: int = 0, blkszbits: int = S.BLKSZBITS) -> bytes:
    """FULL lcluster indexes for `zm`'s extents, their block addresses moved by
    `block_offset`, plus one zero index after the last (readers of old erofs-utils look one
    lcluster past a big-pcluster head). FormatError when the extents cannot be written so that
    the kernel reads them back the same.

    Like mkfs.erofs, a file whose end is inside an lcluster that no extent starts in gets a
    sentinel head there at the end of the file: the kernel then knows where the last extent
    ends (a raw extent that seemed to run to the end of that lcluster would be longer than its
    block, which the kernel refuses). Not when that lcluster must say how big the last
    pcluster is."""
    bs = 1 << blkszbits
    n = (zm.size + bs - 1) >> blkszbits
    big1, big2 = bool(zm.advise & S.Z_ADVISE_BIG_PCLUSTER_1), bool(zm.advise & S.Z_ADVISE_BIG_PCLUSTER_2)
    out = bytearray(8 * (n + 1))
    spans = zm.spans()
    heads = [s >> blkszbits for s, _, _ in spans]
    for k, (start, end, e) in enumerate(spans):
        j = heads[k]
        if end <= start or (k and heads[k - 1] == j):
            raise FormatError(f"extent at byte {start}: two extents cannot start in one lcluster")
        addr = e.blkaddr + block_offset
        if not 0 <= addr or addr + e.blocks > S.NULL_ADDR:
            raise FormatError(f"extent at byte {start}: block address {addr} does not fit 32 bits")
        if e.head == S.LCLUSTER_PLAIN and (e.blocks != 1 or end - start > bs):
            raise FormatError(f"extent at byte {start}: a raw extent must be one block")
        _INDEX.pack_into(out, 8 * j, e.head, start - (j << blkszbits), addr)
        nxt = heads[k + 1] if k + 1 < len(heads) else n
        if nxt - j - 1 > MAX_EXTENT_LCLUSTERS:
            raise FormatError(f"extent at byte {start}: more than {MAX_EXTENT_LCLUSTERS} lclusters long")
        bigp = big1 if e.head == S.LCLUSTER_HEAD1 else big2
        if e.blocks > 1 and not (bigp and nxt > j + 1):
            raise FormatError(f"extent at byte {start}: a {e.blocks}-block pcluster needs big pclusters and a "
                              "second lcluster")
        sentinel = (k + 1 == len(spans) and zm.size % bs and nxt - 1 > j
                    and not (bigp and e.blocks > 1 and nxt - 1 == j + 1))
        for i in range(j + 1, nxt):
            if sentinel and i == n - 1:
                _INDEX.pack_into(out, 8 * i, S.LCLUSTER_PLAIN, zm.size % bs, 0)
                break
            d0 = S.LI_D0_CBLKCNT | e.blocks if i == j + 1 and bigp else i - j
            _INDEX.pack_into(out, 8 * i, S.LCLUSTER_NONHEAD, 0, d0 | (nxt - i) << 16)
    return bytes(out)


__all__ = ["CARRIED_ADVISE", "ZExtent", "ZMap", "encode_full", "read_extents"]
