"""Summaries of EROFS images for `bdserver inspect` (text for people, dicts for --json)."""

from __future__ import annotations

import stat
from typing import Any

from bdserver.erofs import structs as S
from bdserver.erofs.reader import COMPRESSED_LAYOUTS, ErofsImage

_KINDS = {
    stat.S_IFREG: "regular",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def _bits(value: int, names: dict[int, str]) -> list[str]:
    return [names.get(1 << b, f"bit{b}") for b in range(32) if value >> b & 1]


def _window(windows: list[tuple[str, int, int]], addr: int, nblocks: int) -> str:
    """Which block window (primary image or device) holds [addr, addr+nblocks) entirely.
    Devices are checked first: in a flat merged image they follow the primary's blocks."""
    for name, start, end in reversed(windows):
        if start <= addr and addr + nblocks <= end:
            return name
    return "outside"


def summarize(img: ErofsImage, *, walk: bool = True) -> dict[str, Any]:
    """Superblock, device table and (with `walk`) inode/data counts of an image. JSON-safe."""
    sb = img.sb
    out: dict[str, Any] = {
        "superblock": {
            "block_size": img.block_size,
            "blocks": sb.blocks,
            "root_nid": sb.root_nid,
            "inodes": sb.inos,
            "build_time": sb.build_time,
            "build_time_nsec": sb.build_time_nsec,
            "meta_blkaddr": sb.meta_blkaddr,
            "xattr_blkaddr": sb.xattr_blkaddr,
            "uuid": sb.uuid.hex(),
            "volume_name": sb.volume_name.rstrip(b"\0").decode("utf-8", "replace"),
            "checksum": f"{sb.checksum:#010x}",
            "feature_compat": _bits(sb.feature_compat, S.COMPAT_NAMES),
            "feature_incompat": _bits(sb.feature_incompat, S.INCOMPAT_NAMES),
        },
        "devices": [
            {
                "id": i + 1,
                "tag": d.tag.decode("utf-8", "replace"),
                "blocks": d.blocks,
                "mapped_blkaddr": d.mapped_blkaddr,
            }
            for i, d in enumerate(img.devices)
        ],
    }
    if walk:
        # block windows: the primary image, then each extra device in the unified space
        windows = [("primary", 0, sb.blocks)] + [
            (str(i + 1), d.mapped_blkaddr, d.mapped_blkaddr + d.blocks) for i, d in enumerate(img.devices)
        ]
        refs: dict[str, int] = {}
        kinds: dict[str, int] = {}
        layouts: dict[str, int] = {}
        seen: set[int] = set()
        entries = 0
        file_bytes = 0
        inline_files = 0
        xattr_inodes = 0
        for _, info in img.walk():
            entries += 1
            if info.nid in seen:
                continue
            seen.add(info.nid)
            kind = _KINDS.get(stat.S_IFMT(info.mode), "unknown")
            kinds[kind] = kinds.get(kind, 0) + 1
            lname = S.LAYOUT_NAMES.get(info.layout, str(info.layout))
            layouts[lname] = layouts.get(lname, 0) + 1
            if info.xattrs:
                xattr_inodes += 1
            if info.is_reg:
                file_bytes += info.size
                if info.layout == S.LAYOUT_FLAT_INLINE:
                    inline_files += 1
                if info.layout in COMPRESSED_LAYOUTS:
                    runs = [(e.blkaddr, e.blocks) for e in img.zmap(info).extents]
                else:
                    bs = img.block_size
                    runs = [(addr, (ln + bs - 1) // bs) for _, ln, addr in img.layout_map(info)[0] if addr is not None]
                for addr, nblocks in runs:
                    where = _window(windows, addr, nblocks)
                    refs[where] = refs.get(where, 0) + nblocks
        out["tree"] = {
            "entries": entries,
            "inodes": len(seen),
            "kinds": dict(sorted(kinds.items())),
            "layouts": dict(sorted(layouts.items())),
            "regular_file_bytes": file_bytes,
            "regular_files_with_inline_tail": inline_files,
            "inodes_with_xattrs": xattr_inodes,
            # file data blocks referenced per window; "outside" means no window holds them
            "data_blocks_by_device": dict(sorted(refs.items())),
        }
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable text of `summarize()`."""
    sb = summary["superblock"]
    lines = [
        f"EROFS image: {sb['blocks']} blocks of {sb['block_size']} B, {sb['inodes']} inodes, root nid {sb['root_nid']}",
        f"  uuid {sb['uuid']}  label {sb['volume_name']!r}  build_time {sb['build_time']}.{sb['build_time_nsec']:09d}",
        f"  compat: {', '.join(sb['feature_compat']) or '-'}   incompat: {', '.join(sb['feature_incompat']) or '-'}",
        f"  meta_blkaddr {sb['meta_blkaddr']}  xattr_blkaddr {sb['xattr_blkaddr']}  checksum {sb['checksum']}",
    ]
    if summary["devices"]:
        lines.append(f"  devices ({len(summary['devices'])}):")
        for d in summary["devices"]:
            lines.append(f"    #{d['id']}: {d['blocks']} blocks at {d['mapped_blkaddr']}  tag {d['tag']}")
    tree = summary.get("tree")
    if tree:
        kinds = ", ".join(f"{k} {v}" for k, v in tree["kinds"].items())
        layouts = ", ".join(f"{k} {v}" for k, v in tree["layouts"].items())
        lines.append(f"  tree: {tree['entries']} entries, {tree['inodes']} inodes ({kinds})")
        lines.append(f"  layouts: {layouts}; {tree['regular_file_bytes']} bytes in regular files")
        refs = tree["data_blocks_by_device"]
        if refs:
            lines.append("  data blocks referenced: " + ", ".join(f"{k} {v}" for k, v in refs.items()))
        if refs.get("outside"):
            lines.append(f"  WARNING: {refs['outside']} data blocks lie outside the image and its devices")
        if tree["regular_files_with_inline_tail"]:
            lines.append(f"  {tree['regular_files_with_inline_tail']} regular files have inline tails (not block-addressable)")
    return "\n".join(lines)


def verify(img: ErofsImage, *, read_data: bool = True, chunk: int = 1 << 20) -> dict[str, int]:
    """Parse every inode, directory and xattr and (with `read_data`) read every file byte, so
    that a truncated or corrupt image fails here with FormatError instead of at mount time.
    Memory stays bounded: data are read `chunk` bytes at a time."""
    seen: set[int] = set()
    counts = {"entries": 0, "inodes": 0, "bytes_read": 0}
    for _, info in img.walk():
        counts["entries"] += 1
        if info.nid in seen:
            continue
        seen.add(info.nid)
        counts["inodes"] += 1
        if info.is_reg and read_data and info.layout in COMPRESSED_LAYOUTS:
            for off in range(0, info.size, chunk):  # decoded extent by extent
                counts["bytes_read"] += len(info.read(off, min(chunk, info.size - off)))
        elif info.is_reg and read_data:
            ext, tail = img.layout_map(info)
            for fo, ln, addr in ext:
                if addr is None:
                    continue  # hole
                for off in range(fo, fo + ln, chunk):
                    counts["bytes_read"] += len(info.read(off, min(chunk, fo + ln - off)))
            if tail:
                counts["bytes_read"] += len(info.read(info.size - tail, tail))
    return counts


def inspect_path(path: str, *, walk: bool = True) -> dict[str, Any]:
    with ErofsImage.open(path) as img:
        return summarize(img, walk=walk)


def main(argv: list[str] | None = None) -> int:
    """`python -m bdserver.erofs.inspect IMAGE [--json] [--verify]`."""
    import argparse
    import json
    import sys

    from bdserver.errors import FormatError

    ap = argparse.ArgumentParser(prog="python -m bdserver.erofs.inspect")
    ap.add_argument("image")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--verify", action="store_true", help="also read every file byte")
    args = ap.parse_args(argv)
    try:
        with ErofsImage.open(args.image) as img:
            summary = summarize(img)
            if args.verify:
                summary["verify"] = verify(img)
    except (FormatError, OSError) as e:
        print(f"error: {args.image}: {e}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if args.verify and not args.json:
        v = summary["verify"]
        print(f"  verify: ok, {v['inodes']} inodes, {v['bytes_read']} data bytes read")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
