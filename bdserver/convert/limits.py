"""How much one tar layer may make the converter read, hold and write.

A layer is hostile input: a 2 KB tar can claim a 2**62-byte sparse file, a million PAX records
or ten million members. Every size a header announces is checked against these caps BEFORE
anything proportional to it is allocated, and exceeding one is a FormatError that names the
member and the limit. The defaults admit any image a real build produces (they are far above
what debootstrap or language runtimes make) while bounding the converter's memory to a few
hundred MiB; on-node conversion also runs under OS limits (`convert/isolated.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from bdserver.erofs.layout import LayoutLimits


@dataclass(frozen=True)
class ConvertLimits:
    max_entries: int = 2_000_000  # tar members of one layer (each costs a tree node)
    max_path_bytes: int = 64 << 10  # a member's path or link target (GNU L/K, PAX path/linkpath)
    max_depth: int = 2048  # directories in a member's path (what PATH_MAX allows; readers stop at 4096)
    max_pax_bytes: int = 8 << 20  # extended header bytes pending for one member, and global ones kept
    max_pax_records: int = 1 << 18  # extended header records pending for one member
    max_sparse_entries: int = 1 << 18  # data runs in one sparse file's map
    max_sparse_total: int = 1 << 21  # data runs in all sparse files of a layer
    max_file_size: int = 1 << 44  # logical size of one file (16 TiB, the largest EROFS layer)
    max_data_bytes: int = 1 << 40  # file data bytes stored by a layer (spooled or referenced)
    max_tar_bytes: int = 1 << 42  # uncompressed tar stream, trailing bytes included
    max_dir_entries: int = 1 << 20  # entries of one directory
    max_xattr_bytes: int = 256 << 10  # names + values of one member's xattrs (EROFS holds ~256 KiB)
    layout: LayoutLimits = LayoutLimits()  # what sparse files may make the EROFS image allocate


DEFAULT_LIMITS = ConvertLimits()
