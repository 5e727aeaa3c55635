"""Merge layer trees (overlay/OCI semantics) into the flattened metadata tree and write it.

Input layers are trees whose regular files are `BlockMap`s (or, for files EROFS compressed,
`CompressedMap`s) at *layer-local* block addresses (`ErofsImage.to_tree()` of each layer image), so the same code serves tar conversions and
EROFS-native images whose merged metadata is built on the node.

Semantics, applied bottom to top: a whiteout (char 0:0) deletes the lower entry; an opaque
directory (``trusted.overlay.opaque=y``) hides the lower directory's children; a directory
over a directory merges (the upper attributes win, except for directories a tar never named,
which keep the lower attributes as ``tar -x`` would); anything else replaces the lower entry,
subtree and all. Hardlinks inside a layer stay one inode; the output holds no whiteouts and
no ``trusted.overlay.*`` xattrs.

Layout of the device: ``[merged meta (M blocks) | layer 1 | ... | layer N]``. M depends only
on the tree's shape, never on block addresses, so it is computed first with `plan_image` on a
merge with zero offsets, then the layers are placed at M, M+blocks_1, ... and the real merge
is written (two passes, deterministic).
"""

from __future__ import annotations

import dataclasses
import hashlib
import stat
from dataclasses import dataclass
from typing import BinaryIO, Sequence

from bdserver.erofs.structs import DeviceSlot
from bdserver.erofs.tree import OVERLAY_OPAQUE, BlockMap, CompressedMap, Inode, TailedBlockMap, is_whiteout
from bdserver.erofs.writer import plan_image, write_image


@dataclass
class MergeLayer:
    """A layer for merging. ``root``'s `BlockMap`s use layer-local block addresses."""

    root: Inode
    blocks: int  # size of the layer image in 4 KiB blocks
    tag: bytes  # device-table tag (1..64 bytes)
    implicit: frozenset[bytes] = frozenset()  # directories not named by the source tar


@dataclass
class MergedMeta:
    blocks: int  # M: size of the merged metadata image in blocks
    size: int
    inodes: int
    devices: list[DeviceSlot]  # one per layer, mapped_blkaddr = its offset in the device
    device_blocks: int  # total blocks of the virtual device


def _clean_xattrs(x: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in x.items() if not k.startswith("trusted.overlay.")}


def _opaque(d: Inode) -> bool:
    return d.xattrs.get(OVERLAY_OPAQUE) == b"y"


def _copy_attrs(dst: Inode, src: Inode) -> None:
    dst.mode = stat.S_IFDIR | (src.mode & 0o7777)
    dst.uid, dst.gid, dst.mtime, dst.mtime_nsec = src.uid, src.gid, src.mtime, src.mtime_nsec
    dst.xattrs = _clean_xattrs(src.xattrs)


class _Merger:
    def __init__(self, layer: MergeLayer, offset: int) -> None:
        self.layer = layer
        self.offset = offset
        self.links: dict[int, Inode] = {}  # id(layer inode) -> merged inode: hardlinks stay one

    def leaf(self, src: Inode) -> Inode:
        got = self.links.get(id(src))
        if got is not None:
            return got
        data = src.data
        if isinstance(data, BlockMap) and self.offset:
            data = BlockMap(size=data.size, chunk_bits=data.chunk_bits,
                            blocks=[None if b is None else b + self.offset for b in data.blocks])
        elif isinstance(data, TailedBlockMap) and self.offset:
            data = TailedBlockMap(size=data.size, tail=data.tail,
                                  blocks=[None if b is None else b + self.offset for b in data.blocks])
        elif isinstance(data, CompressedMap) and self.offset:
            data = dataclasses.replace(data, block_offset=data.block_offset + self.offset)
        node = Inode(mode=src.mode, uid=src.uid, gid=src.gid, mtime=src.mtime, mtime_nsec=src.mtime_nsec,
                     xattrs=_clean_xattrs(src.xattrs), rdev=src.rdev, symlink=src.symlink, data=data)
        self.links[id(src)] = node
        return node

    def apply_dir(self, dst: Inode, src: Inode, path: bytes, fresh: bool) -> None:
        """Apply the layer directory ``src`` onto ``dst``, subdirectories included (a work
        list, not recursion: trees may be deeper than Python's recursion limit)."""
        todo = [(dst, src, path, fresh)]
        while todo:
            dst, src, path, fresh = todo.pop()
            if fresh or path not in self.layer.implicit:
                _copy_attrs(dst, src)
            assert dst.children is not None and src.children is not None
            if _opaque(src):
                dst.children.clear()
            for name in sorted(src.children):
                c = src.children[name]
                cpath = (b"" if path == b"/" else path) + b"/" + name
                if is_whiteout(c):
                    dst.children.pop(name, None)
                    continue
                old = dst.children.get(name)
                if c.is_dir:
                    if old is not None and old.is_dir:
                        todo.append((old, c, cpath, False))
                    else:
                        nd = Inode.directory(0o755)
                        dst.children[name] = nd
                        todo.append((nd, c, cpath, True))
                else:
                    dst.children[name] = self.leaf(c)


def merge_layers(layers: Sequence[MergeLayer], offsets: Sequence[int] | None = None) -> Inode:
    """The flattened tree of ``layers`` (bottom first). ``offsets[k]`` is added to layer k's
    block addresses (its mapped_blkaddr); default 0 (sizing pass)."""
    root = Inode.directory(0o755)
    for k, layer in enumerate(layers):
        off = offsets[k] if offsets is not None else 0
        if not layer.root.is_dir:
            raise ValueError("a layer root must be a directory")
        _Merger(layer, off).apply_dir(root, layer.root, b"/", fresh=(k == 0))
    return root


def merged_uuid(tags: Sequence[bytes]) -> bytes:
    u = bytearray(hashlib.sha256(b"bdserver merged meta\0" + b"\0".join(tags)).digest()[:16])
    u[6] = (u[6] & 0x0F) | 0x50
    u[8] = (u[8] & 0x3F) | 0x80
    return bytes(u)


def build_merged_meta(layers: Sequence[MergeLayer], out: BinaryIO, *, build_time: int = 0) -> MergedMeta:
    """Write the merged metadata image of ``layers`` to ``out`` and return where each layer
    sits on the virtual device. Deterministic for the same layers and tags."""
    for l in layers:
        if not l.tag or len(l.tag) > 64:
            raise ValueError("device tags must be 1..64 bytes")
    dummy = [DeviceSlot(l.tag, l.blocks, 0) for l in layers]
    m = plan_image(merge_layers(layers), build_time=build_time, devices=dummy).blocks
    offsets: list[int] = []
    pos = m
    for l in layers:
        offsets.append(pos)
        pos += l.blocks
    slots = [DeviceSlot(l.tag, l.blocks, off) for l, off in zip(layers, offsets)]
    root = merge_layers(layers, offsets)
    info = write_image(root, out, build_time=build_time, uuid=merged_uuid([l.tag for l in layers]),
                       devices=slots, meta_only=True)
    if info.blocks != m:  # the writer's plan and its output disagree: never ship that
        raise AssertionError(f"merged meta size changed between passes ({m} -> {info.blocks} blocks)")
    out.flush()
    return MergedMeta(blocks=m, size=info.size, inodes=info.inodes, devices=slots, device_blocks=pos)


def device_tag(digest: str) -> bytes:
    """erofs-image-spec §8.1 (12): the hex of the device blob's digest, at most 64 bytes."""
    return digest.split(":", 1)[-1].encode()[:64]
