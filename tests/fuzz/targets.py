"""Fuzz targets: one function per parser of untrusted bytes. The contract each one checks is the
same: only a typed error (`BdError`) may escape, and nothing may allocate without bound (the
runner caps RSS). Limits are set low enough that one input runs in milliseconds.

* ``tar``        tar / tar+gzip / tar+zstd layer -> tree -> EROFS image (convert/, erofs/ writer)
* ``chunkindex`` chunk-index payloads and the zstd frames they point at (blob/)
* ``erofs``      EROFS images: the metadata check, and the reader
* ``manifest``   manifests, indexes and referrers (oci/model.py, oci/referrers.py)
* ``cdb``        SCSI CDBs (backends/scsi.py): must always answer, never raise
"""

from __future__ import annotations

import io
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable

from bdserver.errors import BdError

# bdserver packages whose code the coverage guidance instruments, per target
MODULES = {
    "tar": ["bdserver.convert", "bdserver.erofs"],
    "chunkindex": ["bdserver.blob"],
    "erofs": ["bdserver.erofs"],
    "manifest": ["bdserver.oci.model", "bdserver.oci.referrers"],
    "cdb": ["bdserver.backends.scsi"],
}


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    max_len: int  # libFuzzer -max_len


_out: io.BufferedRandom | None = None


def _scratch() -> io.BufferedRandom:
    """One real (sparse) output file per process for the writer: holes cost nothing there."""
    global _out
    if _out is None:
        _out = tempfile.TemporaryFile()  # type: ignore[assignment]
    _out.seek(0)  # type: ignore[union-attr]
    _out.truncate(0)  # type: ignore[union-attr]
    return _out  # type: ignore[return-value]


def _fix_tar_checksums(data: bytes) -> bytes:
    """Repair the header checksum of every block that carries a ustar/GNU magic: an attacker
    computes them, so mutations must get past them to reach the parser's depths."""
    if len(data) < 512 or data[:2] == b"\x1f\x8b" or data[:4] == b"\x28\xb5\x2f\xfd":
        return data
    buf = bytearray(data)
    for off in range(0, len(buf) - 511, 512):
        if buf[off + 257 : off + 262] == b"ustar":
            buf[off + 148 : off + 156] = b" " * 8
            buf[off + 148 : off + 156] = b"%06o\0 " % sum(buf[off : off + 512])
    return bytes(buf)


def fuzz_tar(data: bytes) -> None:
    from bdserver.convert.limits import ConvertLimits
    from bdserver.convert.tar import read_layer
    from bdserver.erofs.layout import LayoutLimits
    from bdserver.erofs.writer import write_image

    limits = ConvertLimits(max_entries=2000, max_pax_bytes=256 << 10, max_pax_records=4096, max_path_bytes=8192,
                           max_sparse_entries=4096, max_sparse_total=8192, max_file_size=1 << 40,
                           max_data_bytes=16 << 20, max_tar_bytes=64 << 20, max_dir_entries=2000,
                           layout=LayoutLimits(max_chunk_indexes=1 << 16, max_sparse_overhead=16 << 20))
    try:
        lt = read_layer(io.BytesIO(_fix_tar_checksums(data)), spool=io.BytesIO(), limits=limits)
        write_image(lt.root, _scratch(), limits=limits.layout)
    except BdError:
        pass


def fuzz_chunkindex(data: bytes) -> None:
    """First byte: 0 parses a chunk-index payload (then every chunk's geometry), 1 decompresses a
    chunk's zstd frame; the next 8 bytes are the data end (or the expected length)."""
    from bdserver.blob.chunkindex import ChunkIndex
    from bdserver.blob.reader import decompress_frame

    if len(data) < 9:
        return
    mode, arg, payload = data[0] & 1, struct.unpack_from("<Q", data, 1)[0], data[9:]
    try:
        if mode == 0:
            index = ChunkIndex.parse(payload, data_end=arg >> 16)
            for i in range(len(index)):
                index.blob_span(i)
                index.uncompressed_span(i)
            if index.uncompressed_size:
                index.chunk_at(index.uncompressed_size - 1)
        else:
            decompress_frame(payload, arg & ((1 << 20) - 1))
    except BdError:
        pass


def _own_geometry(data: bytes):  # type: ignore[no-untyped-def]
    """The geometry an image's own device table describes (so the check goes past the table)."""
    from bdserver.erofs import structs as S
    from bdserver.erofs.check import DeviceGeometry, ExpectedSlot

    blocks = max(1, (len(data) + 4095) // 4096)
    if len(data) < 1152:
        return DeviceGeometry.single(blocks)
    sb = S.Superblock.unpack(data, S.SB_OFFSET)
    n = sb.extra_devices if sb.feature_incompat & S.INCOMPAT_DEVICE_TABLE else 0
    start = sb.devt_slotoff * 128
    if not 0 < n <= 16 or start + 128 * n > len(data):
        return DeviceGeometry.single(blocks)
    slots = [S.DeviceSlot.unpack(data, start + 128 * k) for k in range(n)]
    return DeviceGeometry(blocks, tuple(ExpectedSlot(s.mapped_blkaddr, s.blocks) for s in slots))


def fuzz_erofs(data: bytes) -> None:
    """The superblock checksum is repaired first (an attacker computes it), so mutations reach
    the inodes and directories."""
    from bdserver.erofs import structs as S
    from bdserver.erofs.check import check_image
    from bdserver.erofs.reader import ErofsImage

    if len(data) >= S.BLOCK_SIZE:
        buf = bytearray(data)
        struct.pack_into("<I", buf, S.SB_OFFSET + 4, S.sb_checksum(buf))
        data = bytes(buf)
    try:
        check_image(data, _own_geometry(data))
    except BdError:
        pass
    # the reader reads layers from elsewhere too (merged metadata built on the node)
    try:
        img = ErofsImage(lambda off, n: data[off : off + n])
        for _, info in img.walk(max_entries=20_000):
            if info.is_reg:
                info.read(0, 1 << 20)
        img.to_tree(inline_tails=True)
    except BdError:
        pass


_FIELDS = ("schemaVersion", "mediaType", "config", "layers", "manifests", "digest", "size", "annotations",
           "platform", "os", "architecture", "variant", "os.version", "os.features", "urls", "data", "subject",
           "artifactType", "org.opencontainers.image.created")
_WORDS = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
          "application/vnd.docker.distribution.manifest.v2+json", "sha256:" + "0" * 64, "sha512:" + "1" * 128,
          "linux", "amd64", "arm64", "v8", "", "2024-01-01T00:00:00Z", "not a date", "\u0000")
_NUMBERS = (0, 1, 2, -1, 1 << 63, 1 << 70, 0.5, float("1e308"))


class _Draw:
    """Turns fuzz bytes into choices (zeros once they run out)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def __call__(self, n: int) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b % n


def _json_value(draw: _Draw, depth: int = 0) -> object:
    """Any JSON value: scalars of every type, lists, objects keyed by manifest field names."""
    kind = draw(6 if depth < 4 else 4)
    if kind == 0:
        return (None, True, False)[draw(3)]
    if kind == 1:
        return _NUMBERS[draw(len(_NUMBERS))]
    if kind in (2, 3):
        return _WORDS[draw(len(_WORDS))]
    if kind == 4:
        return [_json_value(draw, depth + 1) for _ in range(draw(4))]
    return {_FIELDS[draw(len(_FIELDS))]: _json_value(draw, depth + 1) for _ in range(draw(5))}


def _or_any(draw: _Draw, valid: Callable[[], object]) -> object:
    """Mostly the valid value, one time in four any JSON value in its place."""
    return _json_value(draw, 2) if draw(4) == 0 else valid()


def _platform(draw: _Draw) -> dict[str, object]:
    p: dict[str, object] = {"os": _or_any(draw, lambda: "linux"), "architecture": _or_any(draw, lambda: "amd64")}
    for key, valid in (("variant", "v8"), ("os.version", "10.0"), ("os.features", ["erofs"])):
        if draw(3) == 0:
            p[key] = _or_any(draw, lambda v=valid: v)  # type: ignore[misc]
    return p


def _descriptor(draw: _Draw, depth: int) -> dict[str, object]:
    d: dict[str, object] = {"mediaType": _or_any(draw, lambda: _WORDS[draw(3)]),
                            "digest": _or_any(draw, lambda: _WORDS[3 + draw(2)]),
                            "size": _or_any(draw, lambda: _NUMBERS[draw(4)])}
    optional = (("annotations", lambda: {"org.opencontainers.image.created": _WORDS[10 + draw(2)]}),
                ("platform", lambda: _platform(draw)), ("urls", lambda: ["https://x"]), ("data", lambda: "AAAA"),
                ("artifactType", lambda: _WORDS[draw(3)]))
    for key, valid in optional:
        if draw(3) == 0:
            d[key] = _or_any(draw, valid)
    return d


def _document(draw: _Draw) -> dict[str, object]:
    """A manifest or an index whose every field is, now and then, of the wrong type."""
    doc: dict[str, object] = {"schemaVersion": _or_any(draw, lambda: 2)}
    if draw(2):
        doc["mediaType"] = _or_any(draw, lambda: _WORDS[0])
        doc["config"] = _or_any(draw, lambda: _descriptor(draw, 1))
        doc["layers"] = _or_any(draw, lambda: [_descriptor(draw, 1) for _ in range(draw(3))])
    else:
        doc["mediaType"] = _or_any(draw, lambda: _WORDS[1])
        doc["manifests"] = _or_any(draw, lambda: [_descriptor(draw, 1) for _ in range(draw(4))])
    for key, valid in (("subject", lambda: _descriptor(draw, 1)), ("artifactType", lambda: _WORDS[draw(3)]),
                       ("annotations", lambda: {"a": "b"})):
        if draw(3) == 0:
            doc[key] = _or_any(draw, valid)
    return doc


def fuzz_manifest(data: bytes) -> None:
    """A first byte 0 makes the rest drive a JSON generator (structure-aware), anything else is
    parsed as it is; the length picks the media type hint."""
    import json

    from bdserver.oci import mediatypes as mt
    from bdserver.oci.model import Index, Manifest, parse_manifest
    from bdserver.oci.referrers import newest_first, referrer_descriptor

    hint = (mt.OCI_MANIFEST, mt.OCI_INDEX, mt.DOCKER_MANIFEST, None)[len(data) & 3]
    if data[:1] == b"\0":
        data = json.dumps(_document(_Draw(data[1:]))).encode()
    try:
        m = parse_manifest(data, hint)
        again = parse_manifest(m.to_bytes(), m.media_type)  # what we write, we read back the same
        if again.to_bytes() != m.to_bytes():
            raise AssertionError("manifest does not round-trip")
        if isinstance(m, Index):
            newest_first(list(m.manifests))
            if m.manifests:
                m.select_platform()
        elif isinstance(m, Manifest):
            m.descriptor()
        referrer_descriptor(data, m.media_type)
    except BdError:
        pass


_disk = None


def fuzz_cdb(data: bytes) -> None:
    """Any CDB gets a reply (never an exception); a read stays inside the disk."""
    from bdserver.backends.scsi import ReadRequest, Reply, ScsiDisk

    global _disk
    if _disk is None:
        _disk = ScsiDisk(size=(64 << 20) + 100, serial="fuzz")
    r = _disk.handle(data)
    if isinstance(r, ReadRequest):
        if r.offset + r.length > _disk.blocks * _disk.block_size or r.length <= 0:
            raise AssertionError(f"read outside the disk: {r}")
        _disk.read_reply(r, b"")
    elif not isinstance(r, Reply):
        raise AssertionError(f"not a reply: {r!r}")


TARGETS = {
    t.name: t
    for t in (
        Target("tar", fuzz_tar, 1 << 16),
        Target("chunkindex", fuzz_chunkindex, 1 << 14),
        Target("erofs", fuzz_erofs, 1 << 16),
        Target("manifest", fuzz_manifest, 1 << 13),
        Target("cdb", fuzz_cdb, 64),
    )
}
