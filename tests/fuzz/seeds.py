"""``python -m tests.fuzz.seeds``: (re)generate the seed corpora in tests/fuzz/corpus/ from real
inputs: tars of every dialect (our writer, GNU tar in each format, compressed), images from the
EROFS writer and mkfs.erofs, chunk indexes and frames from the blob writer, manifests and indexes
from a real conversion, and one CDB per SCSI command the disk answers. Seeds are named by their
SHA-1, so regenerating adds what changed and keeps what is equal."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import stat
import struct
import subprocess
import tempfile
from pathlib import Path

import zstandard

from tests.fuzz.run import CORPUS
from tests.fuzz.targets import TARGETS

T0 = 1_700_000_000


def _save(target: str, data: bytes) -> None:
    if len(data) > TARGETS[target].max_len:
        return
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def _staged(root: Path) -> list[str]:
    """A small tree with every kind of member GNU tar writes."""
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"hello\n")
    (root / "d" / "sub" / ("long" * 30)).write_bytes(b"a long name\n")
    os.symlink("f", root / "d" / "link")
    os.link(root / "d" / "f", root / "d" / "hard")
    os.mkfifo(root / "d" / "fifo")
    os.mknod(root / "d" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with open(root / "d" / "sparse", "wb") as f:
        f.truncate(64 << 10)
        f.seek(32 << 10)
        f.write(b"s" * 4096)
    os.setxattr(root / "d" / "f", "user.seed", b"value")
    for p in root.rglob("*"):
        os.utime(p, (T0, T0), follow_symlinks=False)
    return ["d"]


def tar_seeds() -> None:
    from tests.fixtures.layers import bomb_tars, hostile_tars
    from tests.fixtures.tarwriter import TarWriter

    for fmt in ("pax", "gnu", "ustar"):
        w = TarWriter(fmt=fmt)
        w.add("./", b"5")
        w.add("a/", b"5", mtime=6)
        w.add("a/f", b"0", b"hello", pax={"mtime": b"1.5", "SCHILY.xattr.user.x": b"y"} if fmt == "pax" else None)
        w.add("a/" + "x" * 120 + "/y", b"0", b"long")
        w.add("a/l", b"2", link="t" * (100 if fmt == "ustar" else 200))
        w.add("a/.wh.gone", b"0")
        w.add("a/.wh..wh..opq", b"0")
        w.add("a/h", b"1", link="a/f")
        raw = w.close()
        _save("tar", raw)
        _save("tar", gzip.compress(raw, mtime=0))
        _save("tar", zstandard.ZstdCompressor().compress(raw))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        root.mkdir()
        members = _staged(root)
        for fmt, extra in (("gnu", []), ("oldgnu", []), ("posix", []), ("posix", ["--sparse-version=0.0"]),
                           ("posix", ["--sparse-version=0.1"]), ("ustar", []), ("v7", [])):
            out = Path(tmp) / "out.tar"
            opts = ["--xattrs", "--pax-option=delete=atime,delete=ctime"] if fmt == "posix" else []
            r = subprocess.run(["tar", "--numeric-owner", "--sort=name", f"--format={fmt}", "--sparse", *opts, *extra,
                                "-cf", str(out), "-C", str(root), *members], capture_output=True)
            if out.exists():  # v7/ustar refuse some members (long names, sparse): what they wrote is a seed
                _save("tar", out.read_bytes())
            del r
    for raw in hostile_tars().values():
        _save("tar", raw)
    for raw, _, _ in bomb_tars().values():
        _save("tar", raw)


def chunkindex_seeds() -> None:
    from bdserver.blob.chunked import write_chunked_raw, write_chunked_zstd
    from bdserver.blob.reader import parse_range

    rnd = random.Random(3)
    for size, cs in ((20_000, 4096), (4096, 4096), (70_000, 16384)):
        img = rnd.randbytes(size // 2) + bytes(size - size // 2)
        for write in (write_chunked_zstd, write_chunked_raw):
            out = io.BytesIO()
            info = write(io.BytesIO(img), out, chunk_size=cs)
            blob = out.getvalue()
            from bdserver.blob.chunked import annotations

            start, _ = parse_range(annotations(info)["org.erofs.chunk-index.range"], len(blob))
            section = blob[start:]
            payload = section[8:] if write is write_chunked_zstd else section
            _save("chunkindex", b"\0" + struct.pack("<Q", start << 16) + payload)
            if write is write_chunked_zstd:
                end = struct.unpack_from("<Q", payload, 32 + 48)[0] if len(payload) > 32 + 48 + 8 else start
                _save("chunkindex", b"\1" + struct.pack("<Q", min(cs, size)) + blob[:end])
    for content_size in (True, False):
        frame = zstandard.ZstdCompressor(write_content_size=content_size).compress(b"z" * 5000)
        _save("chunkindex", b"\1" + struct.pack("<Q", 5000) + frame)


def erofs_seeds() -> None:
    from bdserver.convert.image import convert_tar_layers
    from bdserver.erofs.tree import Inode, Segment, SpooledData, whiteout
    from bdserver.erofs.writer import write_image
    from tests.fixtures.tarwriter import TarWriter

    src = io.BytesIO(random.Random(5).randbytes(20_000))
    root = Inode.directory(xattrs={"trusted.overlay.opaque": b"y"})
    kids = root.children
    assert kids is not None
    sub = Inode.directory(mtime=7)
    kids[b"sub"] = sub
    f = Inode(mode=stat.S_IFREG | 0o644, data=SpooledData.dense(src, 0, 5000), xattrs={"user.a": b"1"})
    kids[b"f"] = f
    sub.children[b"hard"] = f  # type: ignore[index]
    kids[b"sparse"] = Inode(mode=stat.S_IFREG | 0o644, data=SpooledData(src, 1 << 20, [Segment(8192, 100, 0)]))
    for i in range(4):
        kids[b"cap%d" % i] = Inode(mode=stat.S_IFREG | 0o755, xattrs={"security.capability": b"c" * 20})
    kids[b"link"] = Inode(mode=stat.S_IFLNK | 0o777, symlink=b"sub/hard")
    kids[b"dev"] = Inode(mode=stat.S_IFCHR | 0o600, rdev=os.makedev(1, 3))
    kids[b"wh"] = whiteout()
    kids[b"fifo"] = Inode(mode=stat.S_IFIFO | 0o600, mtime=-5)
    out = io.BytesIO()
    write_image(root, out)
    _save("erofs", out.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        tars = []
        for i, files in enumerate(({"a/x": b"x" * 5000, "a/b/y": b"y"}, {"a/z": b"z" * 9000, "a/.wh.x": b""})):
            w = TarWriter()
            for name, data in files.items():
                w.add(name, b"0", data)
            (t / f"{i}.tar").write_bytes(w.close())
            tars.append(t / f"{i}.tar")
        dev = convert_tar_layers([lambda p=p: open(p, "rb") for p in tars], t / "out")
        _save("erofs", dev.meta_path.read_bytes())
        for p in dev.layer_paths:
            _save("erofs", p.read_bytes())
        src_dir = t / "src"
        src_dir.mkdir()
        _staged(src_dir)
        for opts in ([], ["-Enoinline_data"], ["--chunksize=4096"], ["--chunksize=4096", "-Eforce-chunk-indexes"],
                     ["-zlz4hc"]):
            img = t / "mkfs.img"
            subprocess.run(["mkfs.erofs", "--quiet", "-T0", *opts, str(img), str(src_dir)], check=True)
            _save("erofs", img.read_bytes())


def manifest_seeds() -> None:
    from bdserver.convert.image import convert_image
    from bdserver.oci import mediatypes as mt
    from bdserver.oci.layout import OCILayout
    from bdserver.oci.model import Descriptor, Index, Platform
    from tests.fixtures.layers import build_oci_layout
    from tests.fixtures.tarwriter import TarWriter

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        w = TarWriter()
        w.add("etc/hostname", b"0", b"seed\n")
        (t / "0.tar").write_bytes(w.close())
        src = OCILayout(build_oci_layout([t / "0.tar"], t / "src"))
        res = convert_image(src, "latest", OCILayout(t / "dest"), "lazy")
        data, _ = src.get_manifest("latest")
        _save("manifest", data)
        _save("manifest", res.manifest)
        d = res.descriptor
        idx = Index(manifests=[Descriptor(mt.OCI_MANIFEST, d.digest, d.size, artifact_type=mt.LAZY_ARTIFACT_TYPE,
                                          annotations={"org.opencontainers.image.created": "2024-01-01T00:00:00Z"}),
                               Descriptor(mt.OCI_MANIFEST, res.subject.digest, res.subject.size,
                                          platform=Platform(architecture="amd64", os="linux"))])
        _save("manifest", idx.to_bytes())
        _save("manifest", data.replace(mt.OCI_MANIFEST.encode(), mt.DOCKER_MANIFEST.encode()))
        _save("manifest", idx.to_bytes().replace(mt.OCI_INDEX.encode(), mt.DOCKER_MANIFEST_LIST.encode()))
    _save("manifest", b'{"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}')
    rnd = random.Random(11)
    for n in (8, 32, 128):  # inputs of the structure-aware mode (see targets.fuzz_manifest)
        _save("manifest", b"\0" + bytes([7]) + rnd.randbytes(n))


def cdb_seeds() -> None:
    from bdserver.backends import scsi

    cdbs = [
        bytes([scsi.TEST_UNIT_READY, 0, 0, 0, 0, 0]),
        bytes([scsi.INQUIRY, 0, 0, 0, 96, 0]),
        *(bytes([scsi.INQUIRY, 1, page, 0, 255, 0]) for page in scsi.VPD_PAGES),
        bytes([scsi.READ_6, 0, 0, 1, 8, 0]),
        struct.pack(">BBIBHB", scsi.READ_10, 0, 10, 0, 8, 0),
        struct.pack(">BBIIBB", scsi.READ_12, 0, 10, 8, 0, 0),
        struct.pack(">BBQIBB", scsi.READ_16, 0, 10, 8, 0, 0),
        struct.pack(">BBIBHB", 0x2A, 0, 10, 0, 8, 0),  # WRITE(10)
        bytes([scsi.READ_CAPACITY_10]) + bytes(9),
        struct.pack(">BBQIBB", scsi.SERVICE_ACTION_IN_16, scsi.SAI_READ_CAPACITY_16, 0, 32, 0, 0),
        bytes([scsi.MODE_SENSE_6, 0, 0x3F, 0, 255, 0]),
        struct.pack(">BBBBBBBHB", scsi.MODE_SENSE_10, 0, 0x08, 0, 0, 0, 0, 512, 0),
        bytes([scsi.REQUEST_SENSE, 0, 0, 0, 18, 0]),
        bytes([scsi.SYNCHRONIZE_CACHE_10]) + bytes(9),
    ]
    for c in cdbs:
        _save("cdb", c)


def main() -> None:
    for name in TARGETS:
        shutil.rmtree(CORPUS / name, ignore_errors=True)
    tar_seeds()
    chunkindex_seeds()
    erofs_seeds()
    manifest_seeds()
    cdb_seeds()
    for name in TARGETS:
        files = list((CORPUS / name).iterdir())
        print(f"{name}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")


if __name__ == "__main__":
    main()
