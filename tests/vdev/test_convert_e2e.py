"""A lazy image made by convert/ (tar layers -> EROFS layers + merged meta) opens as a device whose
EROFS tree, read through our reader over VirtualDevice.read, has the source files' bytes."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile

import pytest

from bdserver.cache import ChunkCache

from bdserver.convert.image import convert_image  # noqa: E402
from bdserver.erofs.reader import ErofsImage  # noqa: E402
from bdserver.oci import mediatypes as mt  # noqa: E402
from bdserver.oci.layout import OCILayout  # noqa: E402
from bdserver.oci.model import Descriptor, Manifest, canonical_json, parse_manifest  # noqa: E402
from bdserver.vdev import open_lazy_image  # noqa: E402


def _tar(files: dict[str, bytes]) -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
            t.addfile(ti, io.BytesIO(data))
    return b.getvalue()


def test_converted_image_reads_back_through_the_lazy_device(tmp_path) -> None:
    rnd = random.Random(0)
    files1 = {"a.txt": b"hello\n" * 10000, "big.bin": rnd.randbytes(700_000), "dir/x": b"x"}
    files2 = {"b.txt": b"second layer\n", "dir/y": rnd.randbytes(300_000), ".wh.a.txt": b""}
    src = OCILayout(tmp_path / "src")
    descs, diff_ids = [], []
    for files in (files1, files2):
        t = _tar(files)
        dg = "sha256:" + hashlib.sha256(t).hexdigest()
        src.put_blob(io.BytesIO(t), dg, len(t))
        descs.append(Descriptor(media_type=mt.OCI_LAYER_TAR, digest=dg, size=len(t)))
        diff_ids.append(dg)
    cfg = canonical_json({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    cd = Descriptor.for_bytes(cfg, mt.OCI_CONFIG)
    src.put_blob(io.BytesIO(cfg), cd.digest, cd.size)
    src.put_manifest(Manifest(config=cd, layers=descs).to_bytes(), mt.OCI_MANIFEST, tag="v1")
    dest = OCILayout(tmp_path / "dest")
    res = convert_image(src, "v1", dest, "lazy")
    lazy = parse_manifest(res.manifest, mt.OCI_MANIFEST)
    calls: list[tuple[str, int, int]] = []

    def fetch(digest: str, off: int, n: int) -> bytes:
        calls.append((digest, off, n))
        return dest.read_range(digest, off, n)

    with ChunkCache(str(tmp_path / "cache")) as cache:
        dev = open_lazy_image(lazy, fetch, cache)
        assert dev.size == res.device_blocks * 4096
        img = ErofsImage(dev.read)
        names = {p for p, _ in img.walk()}
        assert b"/a.txt" not in names and {b"/big.bin", b"/b.txt", b"/dir/x", b"/dir/y"} <= names
        assert img.read("big.bin") == files1["big.bin"]
        assert img.read("dir/y") == files2["dir/y"]
        assert img.read("b.txt") == files2["b.txt"]
        n = len(calls)
        assert img.read("big.bin") == files1["big.bin"]
        assert len(calls) == n  # second pass: all from the cache
        flat = tmp_path / "device.img"
        flat.write_bytes(dev.read(0, dev.size))
        dev.close()
    _kernel_check(flat, tmp_path / "mnt", files1, files2)


def _kernel_check(flat, mnt, files1: dict, files2: dict) -> None:
    """The kernel's EROFS driver mounts the device bytes as one flat device (flatdev, 6.4+)."""
    import os

    if os.geteuid() != 0:
        return
    from tests.erofs.helpers import mounted

    try:
        ctx = mounted(flat, mnt)
        root = ctx.__enter__()
    except OSError as e:
        pytest.fail(f"kernel EROFS mount unavailable: {e}")
    try:
        assert (root / "big.bin").read_bytes() == files1["big.bin"]
        assert (root / "dir" / "y").read_bytes() == files2["dir/y"]
        assert not (root / "a.txt").exists()
    finally:
        ctx.__exit__(None, None, None)
