"""EROFS-native layers as layer images for the one merge tar conversions use.

A native image's layers already are EROFS images (oci/nativeimage.py says which and how they
are wrapped); nothing is converted, but every layer is hostile input: it is checked
(erofs/check.py: bounds, extents inside the layer, lcluster indexes of compressed files,
features the kernel reads differently) before its metadata reaches the merge and the merged
metadata reaches the kernel. `merge_layer` is that step for a layer read from anywhere (a file
here, a lazily fetched layer in images/native.py); `fetch_layer_image` brings a layer whole,
verified against its digest (and its DiffID when the manifest or config gives one).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Callable

import zstandard

from bdserver.blob.reader import parse_range
from bdserver.convert.limits import DEFAULT_LIMITS, ConvertLimits
from bdserver.convert.merge import MergeLayer
from bdserver.erofs.check import DeviceGeometry, check_image
from bdserver.erofs.reader import ErofsImage
from bdserver.errors import FormatError, IntegrityError
from bdserver.oci import mediatypes as mt
from bdserver.oci.nativeimage import NativeLayer

ReadAt = Callable[[int, int], bytes]
_COPY = 1 << 20


def merge_layer(read_at: ReadAt, nbytes: int, tag: bytes, *, name: str,
                limits: ConvertLimits = DEFAULT_LIMITS) -> MergeLayer:
    """Check the EROFS image behind `read_at` (`nbytes` of image data) and turn its metadata
    into a layer of the merge; only metadata is read. FormatError names the layer, inode and
    field of the first problem."""
    blocks = -(-nbytes // 4096)
    if blocks == 0:
        raise FormatError(f"{name}: the layer holds no EROFS image")
    check_image(lambda off, n: read_at(off, n), DeviceGeometry.single(blocks), name=name)
    try:
        img = ErofsImage(read_at)
        root = img.to_tree(inline_tails=True, max_entries=limits.max_entries)
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None
    return MergeLayer(root=root, blocks=blocks, tag=tag)


def fetch_layer_image(open_blob: Callable[[], BinaryIO], layer: NativeLayer, out: Path, *,
                      limits: ConvertLimits = DEFAULT_LIMITS) -> int:
    """Write the EROFS image data of `layer` to `out` from its whole blob (`open_blob()` verifies the
    blob digest as it is read: IntegrityError at its end); returns its size. A +zstd blob is
    decompressed (skippable frames, such as an embedded chunk index, are skipped); a raw one ends
    where its embedded chunk index starts."""
    name = f"layer {layer.digest}"
    sha = hashlib.sha256()
    total = 0
    with open_blob() as blob, open(out, "wb") as f:
        if layer.zstd:
            reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True, closefd=False)
            try:
                while chunk := reader.read(_COPY):
                    total += len(chunk)
                    if total > limits.max_tar_bytes:
                        raise FormatError(f"{name}: decompresses to more than {limits.max_tar_bytes} bytes "
                                          "(limit max_tar_bytes)")
                    sha.update(chunk)
                    f.write(chunk)
            except zstandard.ZstdError as e:
                raise FormatError(f"{name}: the zstd stream does not decompress: {e}") from None
        else:
            end = layer.desc.size
            if layer.embedded_index:
                end, _ = parse_range(layer.desc.annotations[mt.ANN_CHUNK_INDEX_RANGE], layer.desc.size)
            while total < end and (chunk := blob.read(min(_COPY, end - total))):
                total += len(chunk)
                f.write(chunk)
        while blob.read(_COPY):  # to the end: that is where the blob digest is checked
            pass
    if layer.zstd and layer.diff_id is not None and "sha256:" + sha.hexdigest() != layer.diff_id:
        out.unlink()
        raise IntegrityError(f"{name}: its image data has digest sha256:{sha.hexdigest()}, the image says "
                             f"{layer.diff_id}")
    return total


def file_reader(path: Path) -> tuple[ReadAt, Callable[[], None]]:
    """(read_at, close) over a local file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return (lambda off, n: os.pread(fd, n, off)), (lambda: os.close(fd))


__all__ = ["fetch_layer_image", "file_reader", "merge_layer"]
