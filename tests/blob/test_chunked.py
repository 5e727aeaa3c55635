"""Chunked blob format: round trips, determinism, spec conformance, corruption."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import struct
import subprocess

import pytest
import zstandard

from bdserver.blob.chunked import (
    DEFAULT_CHUNK_SIZE,
    MEDIA_TYPE_RAW,
    MEDIA_TYPE_ZSTD,
    annotations,
    write_chunked_raw,
    write_chunked_zstd,
)
from bdserver.blob.chunkindex import ChunkEntry, ChunkIndex, COMPRESSION_ZSTD
from bdserver.blob.reader import ChunkedBlob, decompress_frame, load_index
from bdserver.errors import FetchError, FormatError, IntegrityError

CS = 16384  # small chunks keep the tests fast; the default is exercised separately


def make_image(size: int, seed: int = 0) -> bytes:
    """Mixed content: random (incompressible), zeros and text, like a filesystem image."""
    rnd = random.Random(seed)
    parts = []
    while sum(map(len, parts)) < size:
        kind = rnd.randrange(3)
        n = rnd.randrange(1, 40000)
        if kind == 0:
            parts.append(rnd.randbytes(n))
        elif kind == 1:
            parts.append(b"\0" * n)
        else:
            parts.append((b"lorem ipsum %d " % rnd.randrange(1000)) * (n // 16 + 1))
    return b"".join(parts)[:size]


def build(data: bytes, *, raw: bool = False, chunk_size: int = CS):
    out = io.BytesIO()
    fn = write_chunked_raw if raw else write_chunked_zstd
    info = fn(io.BytesIO(data), out, chunk_size=chunk_size)
    return info, out.getvalue()


def fetcher(blob: bytes, calls: list | None = None):
    def fetch(off: int, n: int) -> bytes:
        if calls is not None:
            calls.append((off, n))
        return blob[off : off + n]

    return fetch


def open_blob(info, blob: bytes, calls: list | None = None) -> ChunkedBlob:
    idx = load_index(fetcher(blob), len(blob), annotations(info), media_type=info.media_type)
    return ChunkedBlob(idx, fetcher(blob, calls))


SIZES = [0, 1, 4095, CS - 1, CS, CS + 1, 5 * CS, 5 * CS + 123, 300_001]


@pytest.mark.parametrize("raw", [False, True], ids=["zstd", "raw"])
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_every_chunk_and_random_ranges(size: int, raw: bool) -> None:
    data = make_image(size, seed=size)
    info, blob = build(data, raw=raw)
    assert info.size == len(blob)
    assert info.uncompressed_size == size
    assert info.chunk_count == -(-size // CS)
    assert info.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    cb = open_blob(info, blob)
    assert cb.size == size
    for i in range(len(cb)):
        off, n = cb.uncompressed_span(i)
        assert cb.read_chunk(i) == data[off : off + n]
    assert cb.read(0, size) == data
    rnd = random.Random(size)
    for _ in range(60):
        o = rnd.randrange(size + 1)
        n = rnd.randrange(size - o + 1)
        assert cb.read(o, n) == data[o : o + n]
    with pytest.raises(ValueError):
        cb.read(size, 1)


def test_default_chunk_size_is_128k() -> None:
    data = make_image(3 * DEFAULT_CHUNK_SIZE + 7)
    out = io.BytesIO()
    info = write_chunked_zstd(io.BytesIO(data), out)
    assert DEFAULT_CHUNK_SIZE == 128 * 1024 and info.chunk_size == DEFAULT_CHUNK_SIZE
    assert info.chunk_count == 4
    assert open_blob(info, out.getvalue()).read(0, len(data)) == data


def test_deterministic() -> None:
    data = make_image(200_000, seed=7)
    a, ba = build(data)
    b, bb = build(data)
    assert ba == bb and a == b
    ra, rba = build(data, raw=True)
    rb, rbb = build(data, raw=True)
    assert rba == rbb and ra == rb


def test_zstd_cli_decompresses_to_the_image(tmp_path) -> None:
    zstd = shutil.which("zstd")
    if zstd is None:
        pytest.fail("zstd CLI not installed")
    for size in (0, 5 * CS + 3, 100_000):
        data = make_image(size, seed=size)
        _, blob = build(data)
        p = tmp_path / f"b{size}.zst"
        p.write_bytes(blob)
        res = subprocess.run([zstd, "-d", "-c", "-q", str(p)], capture_output=True, check=True)
        assert res.stdout == data
        # zstd's own integrity test (frame checksums) passes too
        subprocess.run([zstd, "-t", "-q", str(p)], check=True)


def test_uncompressed_digest_and_diffid() -> None:
    data = make_image(70_000)
    info, blob = build(data)
    assert info.uncompressed_digest == "sha256:" + hashlib.sha256(data).hexdigest()
    rinfo, rblob = build(data, raw=True)
    # spec §5.2: the DiffID of a raw layer is the digest of the whole blob
    assert rinfo.uncompressed_digest == rinfo.digest == "sha256:" + hashlib.sha256(rblob).hexdigest()
    assert rblob[: len(data)] == data


def spec_parse(blob: bytes, ann: dict) -> tuple[dict, list]:
    """An independent, spec-literal reader of the trailing index (no shared code)."""
    start, end = (int(x) for x in ann["org.erofs.chunk-index.range"].split(":"))
    assert end == len(blob)
    magic, fsize = struct.unpack_from("<II", blob, start)
    assert 0x184D2A50 <= magic <= 0x184D2A5F and fsize == end - start - 8
    payload = blob[start + 8 : end]
    assert "sha256:" + hashlib.sha256(payload).hexdigest() == ann["org.erofs.chunk-index.digest"]
    assert payload[:4] == bytes([0xCD, 0xE4, 0xEC, 0x67])
    hdr = dict(
        version=payload[4],
        ctype=payload[5],
        flags=struct.unpack_from("<H", payload, 6)[0],
        usize=struct.unpack_from("<Q", payload, 8)[0],
        n=struct.unpack_from("<I", payload, 16)[0],
        halgo=payload[20],
        hsize=payload[21],
        reserved=payload[22:32],
    )
    es = 16 + hdr["hsize"]
    assert len(payload) == 32 + hdr["n"] * es
    entries = [
        struct.unpack_from("<QQ", payload, 32 + k * es) + (payload[32 + k * es + 16 : 32 + (k + 1) * es],)
        for k in range(hdr["n"])
    ]
    return dict(hdr, start=start), entries


def test_layout_follows_the_spec_literally() -> None:
    data = make_image(7 * CS + 999, seed=3)
    info, blob = build(data)
    ann = annotations(info)
    assert set(ann) == {
        "org.erofs.chunk-index.range",
        "org.erofs.chunk-index.digest",
        "org.erofs.uncompressed-digest",
    }
    hdr, entries = spec_parse(blob, ann)
    assert hdr["start"] % 4 == 0  # §3.4.3 SHOULD: 4-byte aligned skippable frame
    assert (hdr["version"], hdr["ctype"], hdr["flags"], hdr["halgo"], hdr["hsize"]) == (1, 1, 0, 1, 32)
    assert hdr["reserved"] == b"\0" * 10 and hdr["usize"] == len(data) and hdr["n"] == 8
    out = []
    for k, (boff, uoff, csum) in enumerate(entries):
        bend = entries[k + 1][0] if k + 1 < len(entries) else hdr["start"]
        on_blob = blob[boff:bend]
        assert hashlib.sha256(on_blob).digest() == csum  # checksum over on-blob bytes (§3.4.2)
        assert uoff == k * CS
        # each chunk is one standalone frame, decodable by a stock decoder (pad frame skipped)
        out.append(zstandard.ZstdDecompressor().decompress(on_blob))
    assert b"".join(out) == data


def test_raw_layout_follows_the_spec_literally() -> None:
    data = make_image(3 * CS + 5, seed=4)
    info, blob = build(data, raw=True)
    ann = annotations(info)
    assert "org.erofs.uncompressed-digest" not in ann
    start, end = (int(x) for x in ann["org.erofs.chunk-index.range"].split(":"))
    assert start == len(data) and end == len(blob)
    payload = blob[start:]
    assert payload[5] == 0  # CompressionType none on raw layers (§3.2)
    assert "sha256:" + hashlib.sha256(payload).hexdigest() == ann["org.erofs.chunk-index.digest"]


def test_pad_frame_only_when_needed() -> None:
    seen = set()
    for size in range(1, 40):
        data = make_image(size * 37, seed=size)
        info, blob = build(data)
        assert info.index_range[0] % 4 == 0
        seen.add(len(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)) % 4)
    assert len(seen) > 1  # the sizes exercised both aligned and unaligned data ends


class ShortReader(io.RawIOBase):
    """A pipe-like source that returns at most 1000 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self.b = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.b.read(min(n, 1000) if n >= 0 else 1000)


def test_streaming_source_with_short_reads() -> None:
    data = make_image(4 * CS + 17)
    out = io.BytesIO()
    info = write_chunked_zstd(ShortReader(data), out, chunk_size=CS)
    assert out.getvalue() == build(data)[1]
    assert open_blob(info, out.getvalue()).read(0, len(data)) == data


def test_adjacent_chunks_take_one_request() -> None:
    data = make_image(6 * CS)
    info, blob = build(data)
    calls: list = []
    cb = open_blob(info, blob, calls)
    got = cb.read_chunks(1, 4)
    assert b"".join(got) == data[CS : 5 * CS]
    assert len(calls) == 1


def test_corrupt_frame_raises_integrity_error() -> None:
    data = make_image(4 * CS, seed=9)
    info, blob = build(data)
    idx = load_index(fetcher(blob), len(blob), annotations(info))
    off, n = idx.blob_span(2)
    bad = bytearray(blob)
    bad[off + n // 2] ^= 0x01
    cb = ChunkedBlob(idx, fetcher(bytes(bad)))
    with pytest.raises(IntegrityError):
        cb.read_chunk(2)
    with pytest.raises(IntegrityError):
        cb.read(0, len(data))
    assert cb.read_chunk(1) == data[CS : 2 * CS]


def test_fetch_failures_become_fetch_errors() -> None:
    data = make_image(2 * CS)
    info, blob = build(data)
    idx = load_index(fetcher(blob), len(blob), annotations(info))

    def boom(off: int, n: int) -> bytes:
        raise ConnectionResetError("peer went away")

    with pytest.raises(FetchError):
        ChunkedBlob(idx, boom).read_chunk(0)
    with pytest.raises(FetchError):
        ChunkedBlob(idx, lambda o, n: blob[o : o + n - 1]).read_chunk(0)


def test_index_digest_mismatch_is_integrity_error() -> None:
    data = make_image(3 * CS)
    info, blob = build(data)
    bad = bytearray(blob)
    bad[info.index_range[0] + 8 + 40] ^= 0xFF
    with pytest.raises(IntegrityError):
        load_index(fetcher(bytes(bad)), len(bad), annotations(info))


def _reframe(info, blob: bytes, payload: bytes):
    """Replace the index payload and re-sign it, so only the parser stands between us and garbage."""
    start = info.index_range[0]
    nb = blob[:start] + struct.pack("<II", 0x184D2A50, len(payload)) + payload
    ann = annotations(info)
    ann["org.erofs.chunk-index.range"] = f"{start}:{len(nb)}"
    ann["org.erofs.chunk-index.digest"] = "sha256:" + hashlib.sha256(payload).hexdigest()
    return nb, ann


def _mutations(payload: bytes):
    def setb(off: int, val: bytes) -> bytes:
        return payload[:off] + val + payload[off + len(val) :]

    n = struct.unpack_from("<I", payload, 16)[0]
    e1 = 32 + 48
    yield "magic", setb(0, b"XXXX")
    yield "version", setb(4, b"\x02")
    yield "ctype", setb(5, b"\x07")
    yield "flags", setb(6, b"\x01\x00")
    yield "usize-short", setb(8, struct.pack("<Q", 100))
    yield "count-more", setb(16, struct.pack("<I", n + 1))
    yield "count-less", setb(16, struct.pack("<I", n - 1))
    yield "halgo", setb(20, b"\x05")
    yield "hsize", setb(21, b"\x10")
    yield "reserved", setb(25, b"\x01")
    yield "truncated", payload[:-1]
    yield "extra", payload + b"\0"
    yield "first-uoff", setb(32 + 8, struct.pack("<Q", 1))
    yield "uoff-order", setb(e1 + 8, struct.pack("<Q", 0))
    yield "boff-order", setb(e1, struct.pack("<Q", 0))
    yield "boff-past-end", setb(32 + 48 * (n - 1), struct.pack("<Q", 10**9))
    yield "header-only", payload[:31]


def test_index_corruption_is_format_error() -> None:
    data = make_image(5 * CS, seed=11)
    info, blob = build(data)
    payload = blob[info.index_range[0] + 8 :]
    for name, bad in _mutations(payload):
        nb, ann = _reframe(info, blob, bad)
        with pytest.raises(FormatError):
            load_index(fetcher(nb), len(nb), ann)
            pytest.fail(f"mutation {name} was accepted")


def test_size_lie_is_caught_when_the_chunk_is_read() -> None:
    data = make_image(3 * CS, seed=12)
    info, blob = build(data)
    payload = blob[info.index_range[0] + 8 :]
    payload = payload[:8] + struct.pack("<Q", 5 * CS) + payload[16:]  # last chunk claims 3*CS
    nb, ann = _reframe(info, blob, payload)
    cb = ChunkedBlob(load_index(fetcher(nb), len(nb), ann), fetcher(nb))
    assert cb.read_chunk(0) == data[:CS]
    with pytest.raises(FormatError):
        cb.read_chunk(2)


def test_annotation_problems_are_format_errors() -> None:
    data = make_image(2 * CS)
    info, blob = build(data)
    ann = annotations(info)
    f = fetcher(blob)
    for key, val in [
        ("org.erofs.chunk-index.range", "abc"),
        ("org.erofs.chunk-index.range", f"{len(blob)}"),
        ("org.erofs.chunk-index.range", f"{info.index_range[0]}:{len(blob) + 1}"),
        ("org.erofs.chunk-index.range", f"{info.index_range[0] - 4}:{len(blob) - 4}"),
        ("org.erofs.chunk-index.digest", "sha256:xyz"),
        ("org.erofs.chunk-index.mediaType", "application/vnd.erofs.chunk-index.v9"),
    ]:
        bad = dict(ann, **{key: val})
        with pytest.raises(FormatError):
            load_index(f, len(blob), bad)
    no_digest = {k: v for k, v in ann.items() if k != "org.erofs.chunk-index.digest"}
    with pytest.raises(FormatError):
        load_index(f, len(blob), no_digest)
    assert len(load_index(f, len(blob), no_digest, require_digest=False)) == 2
    with pytest.raises(FormatError):  # +zstd index declared on a raw layer
        load_index(f, len(blob), ann, media_type=MEDIA_TYPE_RAW)
    rinfo, rblob = build(data, raw=True)
    with pytest.raises(FormatError):
        load_index(fetcher(rblob), len(rblob), annotations(rinfo), media_type=MEDIA_TYPE_ZSTD)


def test_variable_chunk_sizes_from_other_producers() -> None:
    """The spec prescribes no chunking strategy: consume uneven chunks (e.g. file-aligned)."""
    data = make_image(50_000, seed=5)
    cuts = [0, 1, 4096, 10_000, 33_333, 50_000]
    cctx = zstandard.ZstdCompressor(level=1)
    blob = b""
    entries = []
    for a, b in zip(cuts, cuts[1:]):
        frame = cctx.compress(data[a:b])
        entries.append(ChunkEntry(len(blob), a, hashlib.sha256(frame).digest()))
        blob += frame
    idx = ChunkIndex.build(
        compression=COMPRESSION_ZSTD, uncompressed_size=len(data), entries=entries, data_end=len(blob)
    )
    cb = ChunkedBlob(idx, fetcher(blob))
    assert idx.chunk_at(0) == 0 and idx.chunk_at(1) == 1 and idx.chunk_at(33_333) == 4
    rnd = random.Random(2)
    for _ in range(50):
        o = rnd.randrange(len(data))
        n = rnd.randrange(len(data) - o + 1)
        assert cb.read(o, n) == data[o : o + n]


def test_index_without_checksums_is_refused_for_lazy_reads() -> None:
    idx = ChunkIndex.build(
        compression=COMPRESSION_ZSTD,
        uncompressed_size=10,
        entries=[ChunkEntry(0, 0, b"")],
        data_end=20,
        hash_size=0,
    )
    with pytest.raises(FormatError):
        ChunkedBlob(idx, lambda o, n: b"")


def test_decompress_frame_is_strict() -> None:
    c = zstandard.ZstdCompressor(level=1)
    f = c.compress(b"x" * 1000)
    assert decompress_frame(f, 1000) == b"x" * 1000
    with pytest.raises(FormatError):
        decompress_frame(f, 999)
    with pytest.raises(FormatError):
        decompress_frame(f + f, 1000)  # a second data frame hiding in one chunk
    with pytest.raises(FormatError):
        decompress_frame(f[:-3], 1000)
    with pytest.raises(FormatError):
        decompress_frame(b"not zstd at all", 10)
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 10_000_000)
    with pytest.raises(FormatError):
        decompress_frame(bomb, 1000)
    assert decompress_frame(f + struct.pack("<II", 0x184D2A5F, 2) + b"\0\0", 1000) == b"x" * 1000


def test_large_random_image_round_trip() -> None:
    data = os.urandom(3 * DEFAULT_CHUNK_SIZE + 4096)
    out = io.BytesIO()
    info = write_chunked_zstd(io.BytesIO(data), out)
    cb = open_blob(info, out.getvalue())
    assert cb.read(DEFAULT_CHUNK_SIZE - 10, 20) == data[DEFAULT_CHUNK_SIZE - 10 : DEFAULT_CHUNK_SIZE + 10]


def test_fuzzed_indexes_fail_only_with_typed_errors() -> None:
    """Random byte flips, truncations and extensions of a (re-signed) index: the parser and the
    reader either work on what they accept or raise FormatError / IntegrityError, nothing else."""
    data = make_image(6 * CS + 77, seed=13)
    info, blob = build(data)
    payload = blob[info.index_range[0] + 8 :]
    rnd = random.Random(99)
    accepted = 0
    for _ in range(1500):
        bad = bytearray(payload)
        kind = rnd.randrange(4)
        if kind == 0:
            for _ in range(rnd.randrange(1, 4)):
                bad[rnd.randrange(len(bad))] = rnd.randrange(256)
        elif kind == 1:
            del bad[rnd.randrange(len(bad)) :]
        elif kind == 2:
            bad += rnd.randbytes(rnd.randrange(1, 60))
        else:
            pos = rnd.randrange(32, len(bad) - 8)
            bad[pos : pos + 8] = struct.pack("<Q", rnd.choice([0, 1, 2**63, 2**64 - 1, rnd.randrange(10**6)]))
        nb, ann = _reframe(info, blob, bytes(bad))
        try:
            idx = load_index(fetcher(nb), len(nb), ann)
        except FormatError:
            continue
        accepted += 1
        cb = ChunkedBlob(idx, fetcher(nb))
        for i in range(len(idx)):
            try:
                cb.read_chunk(i)
            except (FormatError, IntegrityError):
                pass
    assert accepted < 1500



@pytest.mark.parametrize("raw", [False, True], ids=["zstd", "raw"])
def test_inspect_finds_the_index_and_verifies(tmp_path, capsys, raw: bool) -> None:
    import json

    from bdserver.blob.inspect import locate_index, main

    data = make_image(5 * CS + 3, seed=21)
    info, blob = build(data, raw=raw)
    assert locate_index(lambda o, n: blob[o : o + n], len(blob)) == (info.index_range[0], info.media_type)
    p = tmp_path / "blob"
    p.write_bytes(blob)
    assert main([str(p), "--verify"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["annotations"] == {k: v for k, v in annotations(info).items() if "chunk-index" in k}
    assert out["uncompressed_digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    bad = bytearray(blob)
    bad[10] ^= 1
    p.write_bytes(bytes(bad))
    assert main([str(p), "--verify"]) == 4  # IntegrityError's exit code
