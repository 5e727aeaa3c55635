"""Inspect and verify a chunk-indexed layer blob: `python -m bdserver.blob.inspect BLOB [--range S[:E]]`.

Without `--range` the embedded index is located from the blob's tail: a +zstd blob ends with a
skippable frame whose size field reaches exactly to the end; a raw blob ends with a payload whose
header count matches the bytes left. Prints the header, the annotations a descriptor should carry,
and (with `--verify`) checks every chunk's checksum and decompressed length.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from bdserver.digest import sha256_digest
from bdserver.blob.chunked import ANN_INDEX_DIGEST, ANN_INDEX_RANGE, MEDIA_TYPE_RAW, MEDIA_TYPE_ZSTD, SKIPPABLE_HEADER, is_skippable_magic
from bdserver.blob.chunkindex import HEADER_SIZE, MAGIC, ChunkIndexHeader
from bdserver.blob.reader import ChunkedBlob, load_index
from bdserver.errors import BdError, FormatError

_TAIL_SCAN = 64 << 20


def locate_index(read_at, size: int) -> tuple[int, str]:
    """(index section start, media type) of the embedded index, found from the tail."""
    tail_len = min(size, _TAIL_SCAN)
    tail = read_at(size - tail_len, tail_len)
    base = size - tail_len
    pos = tail.rfind(MAGIC)
    while pos >= 0:
        start = base + pos
        if start >= 8:
            magic, fsize = SKIPPABLE_HEADER.unpack(read_at(start - 8, 8))
            if is_skippable_magic(magic) and fsize == size - start:
                return start - 8, MEDIA_TYPE_ZSTD
        if size - start >= HEADER_SIZE:
            try:
                hdr = ChunkIndexHeader.unpack(read_at(start, HEADER_SIZE))
            except FormatError:
                hdr = None
            if hdr is not None and HEADER_SIZE + hdr.num_chunks * hdr.entry_size == size - start:
                return start, MEDIA_TYPE_RAW
        pos = tail.rfind(MAGIC, 0, pos)
    raise FormatError("no embedded chunk index found at the end of the blob")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("blob")
    ap.add_argument("--range", help="org.erofs.chunk-index.range (default: found from the tail)")
    ap.add_argument("--verify", action="store_true", help="check every chunk")
    args = ap.parse_args(argv)
    fd = os.open(args.blob, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size

        def read_at(off: int, n: int) -> bytes:
            return os.pread(fd, n, off)

        if args.range:
            start = int(args.range.split(":")[0])
            mt = MEDIA_TYPE_ZSTD if is_skippable_magic(SKIPPABLE_HEADER.unpack(read_at(start, 8))[0]) else MEDIA_TYPE_RAW
        else:
            start, mt = locate_index(read_at, size)
        section = read_at(start, size - start)
        payload = section[8:] if mt == MEDIA_TYPE_ZSTD else section
        ann = {ANN_INDEX_RANGE: f"{start}:{size}", ANN_INDEX_DIGEST: sha256_digest(payload)}
        index = load_index(read_at, size, ann, media_type=mt)
        h = index.header
        out = {
            "media_type": mt,
            "size": size,
            "chunks": len(index),
            "uncompressed_size": h.uncompressed_size,
            "compression": h.compression,
            "hash": index.hash_name(),
            "annotations": ann,
        }
        if args.verify:
            cb = ChunkedBlob(index, read_at, name=args.blob)
            usha = hashlib.sha256()
            for i in range(len(index)):
                usha.update(cb.read_chunk(i))
            out["uncompressed_digest"] = "sha256:" + usha.hexdigest()
            out["verified"] = True
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    except BdError as e:
        print(f"bdserver.blob.inspect: {e.user_message()}", file=sys.stderr)
        return e.exit_code
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
