"""One tar layer -> one EROFS layer image, deterministically.

The same tar bytes always give the same image bytes: the tree is laid out in sorted order by
the writer, the build time is fixed (``build_time``, default 0) and the UUID is derived from
the layer's diff_id, so registries store a converted layer once and nodes cache it once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import BinaryIO

from bdserver.convert.limits import DEFAULT_LIMITS, ConvertLimits
from bdserver.convert.tar import LayerTree, read_layer
from bdserver.erofs.tree import Inode
from bdserver.erofs.writer import write_image


@dataclass
class LayerResult:
    """What converting one layer produced. ``tree`` is metadata only: its `SpooledData`
    pointed at a spool that is closed once `convert_layer` returns."""

    diff_id: str  # sha256 of the uncompressed source tar
    tar_size: int  # uncompressed tar bytes
    compression: str  # of the source: none | gzip | zstd
    blocks: int  # EROFS image size in 4 KiB blocks
    size: int  # EROFS image size in bytes
    inodes: int
    uuid: bytes
    tree: Inode
    implicit: frozenset[bytes]  # directories the tar never named (see convert/tar.py)


def layer_uuid(diff_id: str) -> bytes:
    """A stable 16-byte UUID (RFC 4122 v5-shaped) from the source diff_id."""
    u = bytearray(hashlib.sha256(b"bdserver erofs layer " + diff_id.encode()).digest()[:16])
    u[6] = (u[6] & 0x0F) | 0x50
    u[8] = (u[8] & 0x3F) | 0x80
    return bytes(u)


def implicit_paths(lt: LayerTree) -> frozenset[bytes]:
    out = []
    for path, inode in lt.root.walk():
        if inode.is_dir and lt.is_implicit(inode):
            out.append(path)
    return frozenset(out)


def convert_layer(stream: BinaryIO, out_image: BinaryIO, *, build_time: int = 0,
                  tmpdir: str | None = None, limits: ConvertLimits = DEFAULT_LIMITS,
                  compress: str = "none") -> LayerResult:
    """Read a tar / tar+gzip / tar+zstd layer from ``stream`` and write its EROFS image to
    the seekable ``out_image`` (at its current position). FormatError on a bad layer; in that
    case ``out_image`` may hold partial bytes and should be discarded by the caller. `limits`
    bound what the layer may make the converter hold or write; ``compress="lz4"`` stores file data
    lz4-compressed by EROFS."""
    lt = read_layer(stream, tmpdir=tmpdir, limits=limits)
    try:
        uuid = layer_uuid(lt.diff_id)
        info = write_image(lt.root, out_image, build_time=build_time, uuid=uuid, limits=limits.layout,
                           compress=compress, tmpdir=tmpdir)
        out_image.flush()
        return LayerResult(diff_id=lt.diff_id, tar_size=lt.tar_size, compression=lt.compression,
                           blocks=info.blocks, size=info.size, inodes=info.inodes, uuid=uuid,
                           tree=lt.root, implicit=implicit_paths(lt))
    finally:
        lt.close()
