"""One tar layer -> an `Inode` tree (overlayfs whiteouts) + a spool file with the file data.

Semantics (OCI image-spec layer.md + erofs-image-spec §9):

* paths: ``./`` and empty components are dropped; absolute paths, ``..`` components, NUL
  bytes and names over 255 bytes are FormatError (nothing is ever resolved outside the tree);
* duplicates: the later entry wins, as with ``tar -x``; a directory over a directory only
  updates its attributes (children stay); anything else replaces the old entry, subtree and all;
* parents missing from the tar are created as 0755 root-owned directories with mtime 0 and
  remembered as *implicit* (merge keeps a lower layer's attributes for them, like ``tar -x``);
  a parent that exists as a non-directory in the same layer is FormatError;
* hardlinks: to an earlier non-directory entry of the same layer (the same `Inode` object);
  to a missing, later, directory or whiteout target: FormatError;
* whiteouts: ``.wh.NAME`` -> overlayfs whiteout (char 0:0, mode 0, the marker's mtime) named
  NAME unless the layer itself has an entry NAME (a whiteout hides lower layers only; a
  directory of the same layer becomes opaque instead); ``.wh..wh..opq`` -> ``trusted.overlay.opaque=y``
  on its directory; other ``.wh..wh.*`` names (AUFS bookkeeping) are dropped. A directory that
  holds whiteouts also gets an empty ``trusted.overlay.origin`` (what ``mkfs.erofs --aufs``
  does; it stops overlayfs from iterating such a directory directly and showing the whiteouts);
* xattrs: ``SCHILY.xattr.*``, ``LIBARCHIVE.xattr.*``, ``RHT.security.selinux`` and
  ``SCHILY.acl.access/default`` (converted to ``system.posix_acl_*``). ``trusted.overlay.*``
  xattrs from the tar are dropped: in a layer image they would be read as overlay markers.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass, field
from typing import BinaryIO

from bdserver.convert.limits import DEFAULT_LIMITS, ConvertLimits
from bdserver.convert.tarheader import (
    BLK, CHR, DIR, FIFO, HARDLINK, REG, SYMLINK, TarEntry, entry_mode, iter_entries, skip_data,
)
from bdserver.convert.tarstream import TarInput
from bdserver.erofs.tree import OVERLAY_OPAQUE, OVERLAY_ORIGIN, Inode, Segment, SpooledData, is_whiteout, whiteout
from bdserver.errors import FormatError

WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"
_XATTR_PREFIXES = ("user.", "trusted.", "security.")
_SYSTEM_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
MAX_NAME = 255
MAX_SYMLINK = 4095


@dataclass
class LayerTree:
    """A parsed layer. ``spool`` holds the file bytes the tree's `SpooledData` point at."""

    root: Inode
    spool: BinaryIO
    diff_id: str  # sha256 of the uncompressed tar
    tar_size: int  # uncompressed bytes
    compression: str  # none | gzip | zstd
    entries: int
    implicit: dict[int, Inode] = field(default_factory=dict)  # id -> dirs the tar never named

    def is_implicit(self, inode: Inode) -> bool:
        return self.implicit.get(id(inode)) is inode

    def close(self) -> None:
        self.spool.close()


def split_path(path: bytes, what: str = "path", max_depth: int = DEFAULT_LIMITS.max_depth) -> list[bytes]:
    """Normalise a member path into components, refusing anything that could escape (or is
    more than `max_depth` components deep)."""
    if not path:
        raise FormatError(f"tar member with an empty {what}")
    if b"\0" in path:
        raise FormatError(f"tar {what} {path!r} contains a NUL byte")
    if path.startswith(b"/"):
        raise FormatError(f"tar {what} {path!r} is absolute; layer paths must be relative")
    comps = [c for c in path.split(b"/") if c not in (b"", b".")]
    for c in comps:
        if c == b"..":
            raise FormatError(f"tar {what} {path!r} contains '..'; it would escape the layer root")
        if len(c) > MAX_NAME:
            raise FormatError(f"tar {what} {path[:80]!r}... has a name of {len(c)} bytes (limit {MAX_NAME})")
    if len(comps) > max_depth:
        raise FormatError(f"tar {what} {path[:80]!r}... is {len(comps)} levels deep (limit max_depth={max_depth})")
    return comps


def _clean_xattrs(e: TarEntry, max_bytes: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if sum(len(k) + len(v) for k, v in e.xattrs.items()) > max_bytes:
        raise FormatError(f"{e.path!r}: xattrs of more than {max_bytes} bytes (limit max_xattr_bytes)")
    for k, v in e.xattrs.items():
        if k.startswith("trusted.overlay."):
            continue
        if not (k.startswith(_XATTR_PREFIXES) or k in _SYSTEM_XATTRS):
            raise FormatError(f"{e.path!r}: xattr {k!r} has a namespace EROFS cannot store")
        if len(k.encode()) - k.index(".") - 1 > 255 or not k[k.index(".") + 1 :]:
            raise FormatError(f"{e.path!r}: xattr name {k[:80]!r} is empty or longer than 255 bytes")
        if len(v) > 65535:
            raise FormatError(f"{e.path!r}: xattr {k!r} value is {len(v)} bytes (limit 65535)")
        out[k] = v
    return out


class _Builder:
    def __init__(self, spool: BinaryIO, limits: ConvertLimits) -> None:
        self.root = Inode.directory(0o755)
        self.spool = spool
        self.limits = limits
        self.implicit: dict[int, Inode] = {id(self.root): self.root}  # until "./" is seen
        self.data_bytes = 0  # file data stored so far (limits.max_data_bytes)
        self.sparse_runs = 0  # sparse map entries so far (limits.max_sparse_total)

    def _link(self, parent: Inode, name: bytes, node: Inode) -> None:
        """Enter ``node`` as ``name`` in ``parent`` (limits.max_dir_entries)."""
        assert parent.children is not None
        if name not in parent.children and len(parent.children) >= self.limits.max_dir_entries:
            raise FormatError(f"a directory with more than {self.limits.max_dir_entries} entries (at {name!r}; "
                              "limit max_dir_entries)")
        parent.children[name] = node

    def _forget(self, inode: Inode | None) -> None:
        if inode is not None and inode.is_dir:
            self.implicit.pop(id(inode), None)

    def parent(self, comps: list[bytes], path: bytes) -> Inode:
        d = self.root
        for c in comps:
            assert d.children is not None
            nxt = d.children.get(c)
            if nxt is None or is_whiteout(nxt):
                nxt = Inode.directory(0o755)
                if d.children.get(c) is not None:  # a whiteout of the same layer: lower dir hidden
                    nxt.xattrs[OVERLAY_OPAQUE] = b"y"
                self._link(d, c, nxt)
                self.implicit[id(nxt)] = nxt
            elif not nxt.is_dir:
                raise FormatError(f"tar member {path!r}: parent {c!r} is not a directory in this layer")
            d = nxt
        return d

    def lookup(self, comps: list[bytes]) -> Inode | None:
        d: Inode | None = self.root
        for c in comps:
            if d is None or not d.is_dir:
                return None
            assert d.children is not None
            d = d.children.get(c)
        return d

    def add(self, inp: TarInput, e: TarEntry) -> None:
        comps = split_path(e.path, max_depth=self.limits.max_depth)
        if not comps:  # "./": the root directory itself
            if e.kind != DIR:
                raise FormatError(f"tar member {e.path!r} names the root but is not a directory")
            self._set_dir_attrs(self.root, e)
            skip_data(inp, e)
            return
        name = comps[-1]
        for c in comps[:-1]:
            if c.startswith(b".wh..wh."):  # inside AUFS bookkeeping (.wh..wh.plnk/...): not content
                skip_data(inp, e)
                return
            if c.startswith(WH_PREFIX):
                raise FormatError(f"tar member {e.path!r}: a whiteout name {c!r} is used as a directory")
        parent = self.parent(comps[:-1], e.path)
        assert parent.children is not None
        if name.startswith(WH_PREFIX):
            skip_data(inp, e)
            self._whiteout(parent, name, e)
            return
        old = parent.children.get(name)
        if e.kind == HARDLINK:
            skip_data(inp, e)
            tcomps = split_path(e.linkpath, "hardlink target", self.limits.max_depth)
            target = self.lookup(tcomps)
            if target is None:
                raise FormatError(f"hardlink {e.path!r} -> {e.linkpath!r}: target is not an earlier entry of this layer")
            if target.is_dir or is_whiteout(target):
                raise FormatError(f"hardlink {e.path!r} -> {e.linkpath!r}: target is a directory or a whiteout")
            if tcomps == comps:
                return
            self._forget(old)
            self._link(parent, name, target)
            return
        if e.kind == DIR:
            skip_data(inp, e)
            if old is not None and old.is_dir:
                self._set_dir_attrs(old, e)
                return
            d = Inode.directory(0o755)
            self._set_dir_attrs(d, e)
            if old is not None and is_whiteout(old):
                d.xattrs[OVERLAY_OPAQUE] = b"y"
            self._forget(old)
            self._link(parent, name, d)
            return
        inode = Inode(mode=entry_mode(e), uid=e.uid, gid=e.gid, mtime=e.mtime, mtime_nsec=e.mtime_nsec,
                      xattrs=_clean_xattrs(e, self.limits.max_xattr_bytes))
        if e.kind == REG:
            inode.data = self._spool(inp, e)
        else:
            skip_data(inp, e)
            if e.kind == SYMLINK:
                if not e.linkpath or len(e.linkpath) > MAX_SYMLINK or b"\0" in e.linkpath:
                    raise FormatError(f"symlink {e.path!r}: target is empty, has a NUL or is over {MAX_SYMLINK} bytes")
                inode.symlink = e.linkpath
                inode.mode = stat.S_IFLNK | 0o777  # what every Linux filesystem (and tar -x) gives a symlink
            elif e.kind in (CHR, BLK):
                try:
                    inode.rdev = os.makedev(e.devmajor, e.devminor)
                except (OverflowError, ValueError):
                    raise FormatError(f"device {e.path!r}: major/minor {e.devmajor}:{e.devminor} out of range") from None
            else:
                assert e.kind == FIFO
        self._forget(old)
        self._link(parent, name, inode)

    def _set_dir_attrs(self, d: Inode, e: TarEntry) -> None:
        keep = {k: v for k, v in d.xattrs.items() if k in (OVERLAY_OPAQUE, OVERLAY_ORIGIN)}
        d.mode = stat.S_IFDIR | e.mode
        d.uid, d.gid, d.mtime, d.mtime_nsec = e.uid, e.gid, e.mtime, e.mtime_nsec
        d.xattrs = _clean_xattrs(e, self.limits.max_xattr_bytes)
        d.xattrs.update(keep)
        self._forget(d)

    def _whiteout(self, parent: Inode, name: bytes, e: TarEntry) -> None:
        assert parent.children is not None
        if name == WH_OPAQUE:
            parent.xattrs[OVERLAY_OPAQUE] = b"y"
            return
        if name.startswith(b".wh..wh."):
            return  # AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs, ...): not content
        target = name[len(WH_PREFIX):]
        if target in (b"", b".", b".."):
            raise FormatError(f"whiteout {e.path!r} names no file")
        old = parent.children.get(target)
        if old is not None and not is_whiteout(old):
            # The same layer has the entry: it already replaces whatever is below.
            if old.is_dir:
                old.xattrs[OVERLAY_OPAQUE] = b"y"
            return
        self._link(parent, target, whiteout(mtime=e.mtime))

    def _spool(self, inp: TarInput, e: TarEntry) -> SpooledData | None:
        what = f"data of {e.path!r}"
        self.data_bytes += e.stored
        if self.data_bytes > self.limits.max_data_bytes:
            raise FormatError(f"{e.path!r}: the layer stores more than {self.limits.max_data_bytes} bytes of file "
                              "data (limit max_data_bytes)")
        if e.sparse is not None:
            self.sparse_runs += len(e.sparse)
            if self.sparse_runs > self.limits.max_sparse_total:
                raise FormatError(f"{e.path!r}: the layer's sparse files have more than {self.limits.max_sparse_total} "
                                  "data runs (limit max_sparse_total)")
        if inp.direct is not None:  # plain tar in a file: point at its bytes, copy nothing
            base = inp.direct_base + inp.pos
            segs = []
            if e.sparse is None:
                segs = [Segment(0, e.stored, base)] if e.stored else []
            else:
                o = base
                for off, n in e.sparse:
                    segs.append(Segment(off, n, o))
                    o += n
            inp.skip(e.padded, what)
            return SpooledData(inp.direct, e.size, segs) if e.size else None
        pos = self.spool.tell()
        if e.sparse is None:
            inp.copy_to(self.spool, e.stored, what)
            segs = [Segment(0, e.stored, pos)] if e.stored else []
        else:
            segs = []
            for off, n in e.sparse:
                segs.append(Segment(off, n, self.spool.tell()))
                inp.copy_to(self.spool, n, what)
        inp.skip(e.padded - e.stored, what)
        if e.size == 0:
            return None
        return SpooledData(self.spool, e.size, segs)

    def finish(self) -> None:
        """Mark directories that hold whiteouts (see module doc)."""
        stack = [self.root]
        while stack:
            d = stack.pop()
            assert d.children is not None
            has_wh = False
            for c in d.children.values():
                if c.is_dir:
                    stack.append(c)
                elif is_whiteout(c):
                    has_wh = True
            if has_wh:
                d.xattrs[OVERLAY_ORIGIN] = b""


def read_layer(stream: BinaryIO, *, spool: BinaryIO | None = None, tmpdir: str | None = None,
               limits: ConvertLimits = DEFAULT_LIMITS) -> LayerTree:
    """Parse a layer (tar, tar+gzip or tar+zstd, detected by magic) into a `LayerTree`.

    An uncompressed tar in a seekable OS file is described in place (the tree points into
    ``stream``, which must then stay open while the tree is written). Otherwise file data goes to ``spool`` (default: an anonymous temp file in ``tmpdir``); memory use
    grows with the number of entries, not with their sizes. Raises FormatError on anything
    malformed or hostile, or over one of `limits`.
    """
    own = spool is None
    sp: BinaryIO = spool if spool is not None else tempfile.TemporaryFile(dir=tmpdir)  # type: ignore[assignment]
    inp: TarInput | None = None
    try:
        inp = TarInput(stream, max_bytes=limits.max_tar_bytes)
        b = _Builder(sp, limits)
        n = 0
        for e in iter_entries(inp, limits):
            n += 1
            if n > limits.max_entries:
                raise FormatError(f"tar member {e.path!r}: the layer has more than {limits.max_entries} members "
                                  "(limit max_entries)")
            b.add(inp, e)
        inp.drain()
        b.finish()
        sp.flush()
        return LayerTree(root=b.root, spool=sp, diff_id=inp.diff_id(), tar_size=inp.pos,
                         compression=inp.compression, entries=n, implicit=b.implicit)
    except BaseException:
        if own:
            sp.close()
        raise
    finally:
        if inp is not None:
            inp.close()
