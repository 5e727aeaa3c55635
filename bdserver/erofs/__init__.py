"""EROFS on-disk format: structures, a deterministic image writer and a reader. Knows no OCI.

* `tree`     the in-memory tree contract (`Inode`, `SpooledData`, `BlockMap`, `TailedBlockMap`,
             `CompressedMap`, `CompressedData`, `whiteout`).
* `structs`  one dataclass per on-disk struct (`Superblock`, `InodeCompact`, `InodeExtended`,
             `Dirent`, `XattrIbodyHeader`, `XattrEntry`, `ChunkIndex`, `DeviceSlot`, `ZMapHeader`,
             `LclusterIndex`, `Lz4Config`), CRC32C.
* `zmap`     compressed files: lcluster indexes (full, compact) <-> extents, the kernel's rules.
* `zdata`    one pcluster's bytes: lz4 with zero padding, raw (shifted, interlaced).
* `compress` the writer's lz4 pass (`write_image(..., compress="lz4")`).
* `layout`   where every inode and data block goes (pure computation), `plan_image` (dry run).
* `writer`   `write_image(root, out, ...) -> ImageInfo`; `sink` does its positional output.
* `reader`   `ErofsImage(read_at)` / `ErofsImage.open(path)`: walk, lookup, read (lz4 files
             too), xattrs, extents, `zmap`, `to_tree(block_offset)`.
* `inspect`  `summarize()`, `verify()`, `format_summary()`; `python -m bdserver.erofs.inspect`.
* `check`    `check_image(image, DeviceGeometry)`: metadata from elsewhere, checked before the kernel
             mounts it (the trust boundary; FormatError names the inode and the field).
"""
