"""A strict, streaming tar header parser (ustar, GNU, PAX, all GNU sparse flavours).

Our own parser rather than `tarfile`, because a converter of untrusted layers must bound
memory (tarfile reads a PAX or GNU long-name header of any announced size into memory), keep
nanosecond mtimes (tarfile turns them into floats), keep names as bytes, and turn every
malformation into FormatError instead of guessing.
"""

from __future__ import annotations

import base64
import stat
import struct
import urllib.parse
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Iterator

from bdserver.convert.limits import DEFAULT_LIMITS, ConvertLimits
from bdserver.convert.tarstream import TarInput
from bdserver.errors import FormatError

BLOCK = 512

# Entry kinds
REG, HARDLINK, SYMLINK, CHR, BLK, DIR, FIFO = "reg", "link", "symlink", "chr", "blk", "dir", "fifo"
_HEADER_ONLY = (b"1", b"2", b"3", b"4", b"5", b"6")
_TYPES = {b"0": REG, b"\0": REG, b"7": REG, b"1": HARDLINK, b"2": SYMLINK, b"3": CHR, b"4": BLK,
          b"5": DIR, b"6": FIFO, b"S": REG, b"D": DIR}


@dataclass
class TarEntry:
    """One member, all extension headers applied. ``sparse`` is None for dense files."""

    path: bytes
    kind: str
    mode: int  # permission bits only (07777)
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    linkpath: bytes = b""
    size: int = 0  # logical (real) file size
    stored: int = 0  # bytes of data that follow in the archive (before padding)
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None  # (offset, length) runs of real data
    sparse_map_in_data: bool = False  # PAX 1.0: the map precedes the data
    offset: int = 0  # offset of the header in the uncompressed tar (for messages)
    padded: int = 0  # bytes that follow the header(s) up to the next header


def _cstr(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def parse_number(field_: bytes, what: str) -> int:
    """Octal (NUL/space padded) or GNU base-256 (high bit set; 0xff = negative)."""
    if field_ and field_[0] & 0x80:
        if field_[0] == 0xFF:
            v = int.from_bytes(field_, "big", signed=True)
        else:
            v = int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
        return v
    s = field_.replace(b"\0", b" ").strip()
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise FormatError(f"tar header field {what} is not a number: {field_!r}") from None


def _checksum_ok(block: bytes) -> bool:
    stored = _cstr(block[148:156]).strip()
    try:
        want = int(stored, 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if want == unsigned:
        return True
    signed = sum(struct.unpack("148b", block[:148])) + 8 * 32 + sum(struct.unpack("356b", block[156:]))
    return want == signed


def parse_pax(data: bytes, offset: int, max_records: int = DEFAULT_LIMITS.max_pax_records) -> list[tuple[str, bytes]]:
    """Records ``"%d %s=%s\\n"`` in order (order matters for GNU sparse 0.0); more than
    `max_records` is FormatError."""
    out: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        if len(out) >= max_records:
            raise FormatError(f"PAX header at byte {offset} has more than {max_records} records (limit max_pax_records)")
        if data[pos] == 0:  # some writers pad with NULs
            if data[pos:].strip(b"\0"):
                raise FormatError(f"corrupt PAX header at byte {offset}")
            break
        sp = data.find(b" ", pos, pos + 24)
        if sp < 0:
            raise FormatError(f"corrupt PAX record at byte {offset}+{pos}")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise FormatError(f"corrupt PAX record length at byte {offset}+{pos}") from None
        end = pos + length
        if length <= sp - pos + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise FormatError(f"corrupt PAX record at byte {offset}+{pos}")
        rec = data[sp + 1 : end - 1]
        eq = rec.find(b"=")
        if eq <= 0:
            raise FormatError(f"corrupt PAX record (no keyword) at byte {offset}+{pos}")
        try:
            key = rec[:eq].decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"PAX keyword is not UTF-8 at byte {offset}+{pos}") from None
        out.append((key, rec[eq + 1 :]))
        pos = end
    return out


def parse_pax_time(v: bytes) -> tuple[int, int]:
    """``[-]sec[.frac]`` -> (sec, nsec) exactly (floor semantics for negative times)."""
    try:
        d = Decimal(v.decode("ascii"))
    except (InvalidOperation, UnicodeDecodeError):
        raise FormatError(f"invalid PAX time {v!r}") from None
    if not d.is_finite():
        raise FormatError(f"invalid PAX time {v!r}")
    sec = int(d.to_integral_value(rounding="ROUND_FLOOR"))
    nsec = int(((d - sec) * 1_000_000_000).to_integral_value(rounding="ROUND_FLOOR"))
    return sec, min(nsec, 999_999_999)


def _pax_int(v: bytes, what: str) -> int:
    try:
        n = int(v.decode("ascii"), 10)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"invalid PAX {what} {v!r}") from None
    if n < 0:
        raise FormatError(f"negative PAX {what} {v!r}")
    return n


_ACL_TAGS = {"user": 0x01, "group": 0x04, "mask": 0x10, "other": 0x20}


def acl_text_to_xattr(text: bytes) -> bytes:
    """star/GNU tar ``SCHILY.acl.*`` text (``user::rwx,user:name:r--:1000,...``) ->
    the kernel's ``system.posix_acl_*`` value (version 2, sorted entries)."""
    entries: list[tuple[int, int, int]] = []
    for part in text.decode("utf-8", "strict").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        f = part.split(":")
        if len(f) < 3 or f[0] not in _ACL_TAGS:
            raise FormatError(f"unsupported ACL entry {part!r}")
        perm_s = f[2]
        if len(perm_s) != 3 or any(c not in "rwx-" for c in perm_s):
            raise FormatError(f"invalid ACL permissions {part!r}")
        perm = (4 if perm_s[0] == "r" else 0) | (2 if perm_s[1] == "w" else 0) | (1 if perm_s[2] == "x" else 0)
        tag = _ACL_TAGS[f[0]]
        qual = 0xFFFFFFFF
        if f[1]:
            if f[0] not in ("user", "group"):
                raise FormatError(f"ACL entry {part!r} takes no qualifier")
            tag = 0x02 if f[0] == "user" else 0x08
            num = f[3] if len(f) > 3 and f[3] else f[1]
            if not num.isdigit():
                raise FormatError(f"ACL entry {part!r} names a user/group without a numeric id")
            qual = int(num)
        entries.append((tag, qual, perm))
    entries.sort()
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, q) for t, q, p in entries)


def _xattrs_from_pax(recs: dict[str, bytes]) -> dict[str, bytes]:
    x: dict[str, bytes] = {}
    for k, v in recs.items():
        if k.startswith("SCHILY.xattr."):
            x[k[len("SCHILY.xattr.") :]] = v
        elif k.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(k[len("LIBARCHIVE.xattr.") :])
            try:
                x.setdefault(name, base64.b64decode(v + b"=" * (-len(v) % 4), validate=True))
            except ValueError:
                raise FormatError(f"invalid base64 in PAX {k}") from None
        elif k == "RHT.security.selinux":
            x.setdefault("security.selinux", v)
    for k, name in (("SCHILY.acl.access", "system.posix_acl_access"), ("SCHILY.acl.default", "system.posix_acl_default")):
        if k in recs and recs[k] and name not in x:
            x[name] = acl_text_to_xattr(recs[k])
    return x


def _sparse_from_old_gnu(block: bytes, inp: TarInput, max_entries: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []

    def take(area: bytes, n: int) -> None:
        for i in range(n):
            e = area[i * 24 : i * 24 + 24]
            if not e[:12].strip(b"\0"):
                break
            runs.append((parse_number(e[:12], "sparse offset"), parse_number(e[12:], "sparse numbytes")))

    take(block[386:482], 4)
    ext = block[482]
    while ext:
        blk = inp.read_exact(BLOCK, "GNU sparse extension header")
        take(blk[:504], 21)
        ext = blk[504]
        if len(runs) > max_entries:
            raise FormatError(f"GNU sparse map has more than {max_entries} entries (limit max_sparse_entries)")
    return runs


def _read_sparse_map_1_0(inp: TarInput, stored: int, max_entries: int) -> tuple[list[tuple[int, int]], int]:
    """PAX 1.0: decimal numbers, one per line, at the start of the data, padded to a block."""
    nums: list[int] = []
    buf = b""
    consumed = 0
    count = -1
    while count < 0 or len(nums) < 2 * count + 1:
        if consumed >= stored:
            raise FormatError("GNU sparse 1.0 map runs past the member data")
        blk = inp.read_exact(BLOCK, "GNU sparse 1.0 map")
        consumed += BLOCK
        buf += blk
        *lines, buf = buf.split(b"\n")
        for ln in lines:
            if count >= 0 and len(nums) >= 2 * count + 1:
                break
            try:
                nums.append(int(ln.decode("ascii"), 10))
            except (ValueError, UnicodeDecodeError):
                raise FormatError("corrupt GNU sparse 1.0 map") from None
            if count < 0:
                count = nums[0]
                if count < 0:
                    raise FormatError("GNU sparse 1.0 map has an invalid entry count")
                if count > max_entries:
                    raise FormatError(f"GNU sparse 1.0 map has {count} entries (limit max_sparse_entries={max_entries})")
        if (count < 0 or len(nums) < 2 * count + 1) and len(buf) > 64:
            raise FormatError("corrupt GNU sparse 1.0 map")
    runs = [(nums[1 + 2 * i], nums[2 + 2 * i]) for i in range(count)]
    return runs, consumed


def _check_sparse(runs: list[tuple[int, int]], size: int, stored: int, path: bytes) -> list[tuple[int, int]]:
    end = 0
    total = 0
    for off, n in runs:
        if off < 0 or n < 0 or off < end or off + n > size:
            raise FormatError(f"{path!r}: sparse map is out of order or past the file size")
        end = off + n
        total += n
    if total != stored:
        raise FormatError(f"{path!r}: sparse map covers {total} bytes but the member stores {stored}")
    return [(o, n) for o, n in runs if n]


@dataclass
class _Extensions:
    """Extension headers read so far: GNU long names and PAX records for the next member, and
    the global PAX records for all later members."""

    longname: bytes | None = None
    longlink: bytes | None = None
    pax: list[tuple[str, bytes]] | None = None
    pax_bytes: int = 0  # extended header bytes read for the next member
    global_pax: dict[str, bytes] = field(default_factory=dict)

    def pending(self) -> bool:
        return self.longname is not None or self.longlink is not None or self.pax is not None

    def member_done(self) -> None:
        self.longname = self.longlink = self.pax = None
        self.pax_bytes = 0


def iter_entries(inp: TarInput, limits: ConvertLimits = DEFAULT_LIMITS) -> Iterator[TarEntry]:
    """Yield members with extension headers applied. The caller MUST consume the member's
    data (``read_data`` / ``skip_data``) before asking for the next one. Sizes are checked
    against `limits` before anything is read into memory.

    Per header: read it (or the end of the archive), read it as an extension header if it is
    one, else merge the PAX records that apply, build the member, and read its sparse map."""
    ext = _Extensions()
    while True:
        start = inp.pos
        block = _read_header(inp, ext, start)
        if block is None:
            return
        tflag = block[156:157]
        size = parse_number(block[124:136], "size")
        if size < 0:
            raise FormatError(f"negative member size at byte {start}")
        if _read_extension(inp, ext, tflag, size, start, limits):
            continue
        if tflag in (b"M", b"N"):
            raise FormatError(f"unsupported tar member type {tflag!r} (multi-volume / old GNU long names) at byte {start}")
        recs, sparse_00 = _merge_pax(ext)
        e = _build_member(block, tflag, size, recs, ext, start, limits)
        ext.member_done()
        _read_sparse_map(inp, e, block, tflag, recs, sparse_00, limits)
        if e.size > limits.max_file_size:
            raise FormatError(f"{e.path!r}: a file of {e.size} bytes (limit max_file_size={limits.max_file_size})")
        yield e


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _read_header(inp: TarInput, ext: _Extensions, start: int) -> bytes | None:
    """The next header block with a valid checksum, or None at the end of the archive."""
    block = inp.read(BLOCK)
    if not block:
        if ext.pending():
            raise FormatError("tar ends after an extension header, without its member")
        return None  # no end-of-archive marker: accepted, as GNU tar does
    if len(block) < BLOCK:
        raise FormatError(f"tar is truncated in a header at byte {start}")
    if not any(block):
        if ext.pending():
            raise FormatError("tar ends after an extension header, without its member")
        nxt = inp.read(BLOCK)
        if nxt and any(nxt):
            # Python and GNU tar stop at a lone zero block, Go (containerd) fails: refuse.
            raise FormatError(f"tar has a lone zero block at byte {start} followed by more members")
        return None  # end-of-archive marker (the rest is drained by the caller)
    if not _checksum_ok(block):
        raise FormatError(f"tar header checksum mismatch at byte {start} (corrupt or not a tar)")
    return block


def _read_extension(inp: TarInput, ext: _Extensions, tflag: bytes, size: int, start: int,
                    limits: ConvertLimits) -> bool:
    """Read a GNU long name (L/K), PAX (x/X/g) or volume (V) header into `ext`; False for a
    header that describes a member."""
    padded = _padded(size)
    if tflag in (b"L", b"K"):
        if size > limits.max_path_bytes:
            raise FormatError(f"GNU long name of {size} bytes at byte {start} (limit max_path_bytes={limits.max_path_bytes})")
        data = _cstr(inp.read_exact(padded, "GNU long name")[:size])
        if tflag == b"L":
            ext.longname = data
        else:
            ext.longlink = data
        return True
    if tflag in (b"x", b"g", b"X"):
        held = size if tflag == b"g" else ext.pax_bytes + size
        if held > limits.max_pax_bytes:
            raise FormatError(f"PAX headers of {held} bytes at byte {start} (limit max_pax_bytes={limits.max_pax_bytes})")
        recs = parse_pax(inp.read_exact(padded, "PAX header")[:size], start, limits.max_pax_records)
        if tflag == b"g":
            _merge_global(ext.global_pax, recs, start, limits)
        else:
            ext.pax_bytes = held
            ext.pax = (ext.pax or []) + recs
            if len(ext.pax) > limits.max_pax_records:
                raise FormatError(f"more than {limits.max_pax_records} PAX records for the member at byte {start} "
                                  "(limit max_pax_records)")
        return True
    if tflag in (b"V",):  # volume label: not a file
        inp.skip(padded, "volume header")
        return True
    return False


def _merge_global(global_pax: dict[str, bytes], recs: list[tuple[str, bytes]], start: int,
                  limits: ConvertLimits) -> None:
    for k, v in recs:
        if k in ("path", "linkpath", "size") or k.startswith("GNU.sparse."):
            continue  # per-file by nature: a global value would rename/resize every member
        if v:
            global_pax[k] = v
        else:
            global_pax.pop(k, None)
    if sum(len(k) + len(v) for k, v in global_pax.items()) > limits.max_pax_bytes:
        raise FormatError(f"global PAX records at byte {start} exceed {limits.max_pax_bytes} bytes "
                          "(limit max_pax_bytes)")


def _merge_pax(ext: _Extensions) -> tuple[dict[str, bytes], list[int]]:
    """The records that apply to the member (global, then its own; an empty record cancels),
    and the GNU sparse 0.0 offset/numbytes values in their order."""
    recs: dict[str, bytes] = dict(ext.global_pax)
    sparse_00: list[int] = []
    for k, v in ext.pax or []:
        if k in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
            sparse_00.append(_pax_int(v, k))
        if v:
            recs[k] = v
        else:
            recs.pop(k, None)  # an empty record cancels the global / header value
    return recs, sparse_00


def _build_member(block: bytes, tflag: bytes, size: int, recs: dict[str, bytes], ext: _Extensions, start: int,
                  limits: ConvertLimits) -> TarEntry:
    """The member from its header fields, overridden by long names and PAX records."""
    magic = block[257:263]
    name = _cstr(block[0:100])
    if magic == b"ustar\x00":
        prefix = _cstr(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    if ext.longname is not None:
        name = ext.longname
    if "path" in recs:
        name = recs["path"]
    link = _cstr(block[157:257])
    if ext.longlink is not None:
        link = ext.longlink
    if "linkpath" in recs:
        link = recs["linkpath"]
    if len(name) > limits.max_path_bytes or len(link) > limits.max_path_bytes:
        raise FormatError(f"tar member at byte {start}: path or link target over {limits.max_path_bytes} bytes "
                          "(limit max_path_bytes)")

    kind = _TYPES.get(tflag, REG)  # POSIX: unknown types are regular files
    if tflag in (b"0", b"\0") and name.endswith(b"/"):
        kind = DIR  # pre-POSIX directories
    mode = parse_number(block[100:108], "mode") & 0o7777
    uid = _pax_int(recs["uid"], "uid") if "uid" in recs else parse_number(block[108:116], "uid")
    gid = _pax_int(recs["gid"], "gid") if "gid" in recs else parse_number(block[116:124], "gid")
    if uid < 0 or gid < 0 or uid > 0xFFFFFFFF or gid > 0xFFFFFFFF:
        raise FormatError(f"{name!r}: uid/gid out of range")
    if "mtime" in recs:
        mtime, nsec = parse_pax_time(recs["mtime"])
    else:
        mtime, nsec = parse_number(block[136:148], "mtime"), 0
    if "size" in recs:
        size = _pax_int(recs["size"], "size")
    if size and (tflag in _HEADER_ONLY or (kind == DIR and tflag != b"D")):
        # GNU tar skips data after symlinks/devices/fifos but not after dirs/hardlinks; Go
        # (containerd) and Python skip none: the next "header" differs between extractors.
        raise FormatError(f"tar member {name!r} of type {tflag!r} declares {size} data bytes; "
                          "extractors disagree on such archives")
    e = TarEntry(path=name, kind=kind, mode=mode, uid=uid, gid=gid, mtime=mtime, mtime_nsec=nsec,
                 linkpath=link, size=size, stored=size, offset=start, padded=_padded(size))
    if kind in (CHR, BLK):
        e.devmajor = (_pax_int(recs["SCHILY.devmajor"], "devmajor") if "SCHILY.devmajor" in recs
                      else parse_number(block[329:337], "devmajor"))
        e.devminor = (_pax_int(recs["SCHILY.devminor"], "devminor") if "SCHILY.devminor" in recs
                      else parse_number(block[337:345], "devminor"))
    e.xattrs = _xattrs_from_pax(recs)
    return e


def _read_sparse_map(inp: TarInput, e: TarEntry, block: bytes, tflag: bytes, recs: dict[str, bytes],
                     sparse_00: list[int], limits: ConvertLimits) -> None:
    """A sparse member's real size and data runs, in any GNU flavour: old GNU (type S, map in
    the header and extension blocks), PAX 0.0 (offset/numbytes records), 0.1 (one map record)
    and 1.0 (map at the start of the data, which it then no longer counts)."""
    if tflag == b"S":
        e.size = parse_number(block[483:495], "GNU sparse realsize")
        runs = _sparse_from_old_gnu(block, inp, limits.max_sparse_entries)
        e.sparse = _check_sparse(runs, e.size, e.stored, e.path)
        return
    if not ("GNU.sparse.major" in recs or "GNU.sparse.map" in recs or sparse_00):
        return
    major = recs.get("GNU.sparse.major", b"0")
    if "GNU.sparse.name" in recs:
        e.path = recs["GNU.sparse.name"]
    if major == b"1":
        if recs.get("GNU.sparse.minor", b"0") != b"0":
            raise FormatError(f"{e.path!r}: unsupported GNU sparse version 1.{recs['GNU.sparse.minor']!r}")
        e.size = _pax_int(recs.get("GNU.sparse.realsize", b""), "GNU.sparse.realsize")
        runs, used = _read_sparse_map_1_0(inp, e.stored, limits.max_sparse_entries)
        e.stored -= used
        e.padded -= used
    elif major == b"0":
        e.size = _pax_int(recs.get("GNU.sparse.size", b""), "GNU.sparse.size")
        if "GNU.sparse.map" in recs:
            if recs["GNU.sparse.map"].count(b",") >= 2 * limits.max_sparse_entries:
                raise FormatError(f"{e.path!r}: GNU sparse map has more than {limits.max_sparse_entries} "
                                  "entries (limit max_sparse_entries)")
            try:
                nums = [int(x) for x in recs["GNU.sparse.map"].split(b",")] if recs["GNU.sparse.map"] else []
            except ValueError:
                raise FormatError(f"{e.path!r}: corrupt GNU.sparse.map") from None
        else:
            nums = sparse_00
        if len(nums) > 2 * limits.max_sparse_entries:
            raise FormatError(f"{e.path!r}: GNU sparse map has more than {limits.max_sparse_entries} "
                              "entries (limit max_sparse_entries)")
        if len(nums) % 2:
            raise FormatError(f"{e.path!r}: odd number of values in the GNU sparse map")
        runs = [(nums[i], nums[i + 1]) for i in range(0, len(nums), 2)]
    else:
        raise FormatError(f"{e.path!r}: unsupported GNU sparse version {major!r}")
    e.sparse = _check_sparse(runs, e.size, e.stored, e.path)
    e.kind = REG


def skip_data(inp: TarInput, e: TarEntry) -> None:
    inp.skip(e.padded, f"data of {e.path!r}")


def entry_mode(e: TarEntry) -> int:
    return {REG: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHR: stat.S_IFCHR,
            BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}[e.kind] | e.mode
