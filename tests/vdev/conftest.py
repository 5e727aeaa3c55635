"""Lazy images for vdev tests: a synthetic one served by a fake registry (a dict of blobs behind a
fetch function, with hooks to park, fail or corrupt fetches), and real ones made by convert/ from
tar layers into an OCI layout."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from bdserver.blob.chunked import annotations, write_chunked_zstd
from bdserver.cache import ChunkCache
from bdserver.vdev import FetchPools

BS = 4096
CS = 16384  # 4 blocks per chunk: many chunks from small images
WAIT = 60  # generous bound on waits that must end ("never hangs"); never a speed assertion


def wait_until(pred: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll `pred` until it holds (True) or `timeout` passes (False): for states that other
    threads reach, such as a reader having joined an in-flight fetch."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


def joined(src, n: int, timeout: float = 20) -> bool:
    """Wait until `n` readers of the lazy source `src` have joined another thread's fetch."""
    return wait_until(lambda: src.stats.snapshot()["joined"] >= n, timeout)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeRegistry:
    """Blobs by digest; counts range requests; hooks to park, fail or corrupt fetches."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    calls: list[tuple[str, int, int]] = field(default_factory=list)
    hook: Callable[[str, int, int], None] | None = None
    fail: Exception | None = None
    corrupt: dict[str, bytes] = field(default_factory=dict)  # digest -> served (altered) bytes
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fetch(self, digest: str, offset: int, length: int) -> bytes:
        with self.lock:
            self.calls.append((digest, offset, length))
        if self.hook is not None:
            self.hook(digest, offset, length)
        if self.fail is not None:
            raise self.fail
        blob = self.corrupt.get(digest, self.blobs[digest])
        return blob[offset : offset + length]

    def calls_for(self, digest: str) -> list[tuple[str, int, int]]:
        with self.lock:
            return [c for c in self.calls if c[0] == digest]


@dataclass
class LazyImage:
    manifest: dict
    registry: FakeRegistry
    expected: bytes  # the whole device as it must read
    meta: bytes
    layers: list[tuple[str, bytes, int]]  # (blob digest, image bytes, start block)


def _image(rnd: random.Random, blocks: int, tail: int = 0) -> bytes:
    out = bytearray()
    for _ in range(blocks):
        kind = rnd.randrange(3)
        out += rnd.randbytes(BS) if kind == 0 else bytes(BS) if kind == 1 else (b"block%d" % rnd.randrange(99)) * (BS // 7) + b"x" * (BS % 7)
    return bytes(out) + rnd.randbytes(tail)


def _merged_meta(layer_blocks: list[int], gap_blocks: int) -> tuple[bytes, list[int]]:
    """A real merged metadata image (the device checks it before serving it): one file per layer
    pointing at the layer's blocks; (image, start block of each layer)."""
    from bdserver.erofs.structs import DeviceSlot
    from bdserver.erofs.tree import BlockMap, Inode
    from bdserver.erofs.writer import plan_image, write_image

    def tree(starts: list[int]) -> Inode:
        root = Inode.directory()
        for i in range(200):  # a few blocks of metadata, as a real image has
            root.children[b"empty%03d" % i] = Inode(mode=0o100644)
        for k, (start, nb) in enumerate(zip(starts, layer_blocks)):
            root.children[b"layer%d" % k] = Inode(mode=0o100644, data=BlockMap(nb * BS, (nb * BS - 1).bit_length(), [start]))
        return root

    slots = [DeviceSlot(b"layer%d" % k, nb, 0) for k, nb in enumerate(layer_blocks)]
    meta_blocks = plan_image(tree([0] * len(layer_blocks)), devices=slots).blocks
    starts, pos = [], meta_blocks + gap_blocks
    for nb in layer_blocks:
        starts.append(pos)
        pos += nb + gap_blocks
    out = io.BytesIO()
    write_image(tree(starts), out, devices=[DeviceSlot(d.tag, d.blocks, st) for d, st in zip(slots, starts)],
                meta_only=True)
    return out.getvalue(), starts


def build_lazy_image(seed: int = 0, layer_blocks=(40, 9, 1), gap_blocks: int = 2) -> LazyImage:
    """[merged meta | gap | layer 1 | gap | layer 2 | ...], layers chunked at CS."""
    rnd = random.Random(seed)
    reg = FakeRegistry()
    imgs = [_image(rnd, nb, tail=100 if k == 0 else 0) for k, nb in enumerate(layer_blocks)]  # layer 0 ends mid-block
    meta, starts = _merged_meta([-(-len(img) // BS) for img in imgs], gap_blocks)
    meta_blocks = -(-len(meta) // BS)
    expected = bytearray(meta) + bytes(meta_blocks * BS - len(meta))
    layers_desc = []
    layers = []
    for k, img in enumerate(imgs):
        next_block = starts[k]
        out = io.BytesIO()
        info = write_chunked_zstd(io.BytesIO(img), out, chunk_size=CS)
        blob = out.getvalue()
        reg.blobs[info.digest] = blob
        blocks = -(-len(img) // BS)
        ann = annotations(info)
        ann.update(
            {
                "org.erofs.role": "device",
                "org.bdserver.mapped-blkaddr": str(next_block),
                "org.bdserver.blocks": str(blocks),
            }
        )
        layers_desc.append({"mediaType": info.media_type, "digest": info.digest, "size": info.size, "annotations": ann})
        expected += bytes(next_block * BS - len(expected))
        expected += img + bytes(blocks * BS - len(img))
        layers.append((info.digest, img, next_block))
        next_block += blocks + gap_blocks
    expected += bytes(next_block * BS - gap_blocks * BS - len(expected))
    md = sha(meta)
    reg.blobs[md] = meta
    layers_desc.append(
        {"mediaType": "application/vnd.erofs", "digest": md, "size": len(meta), "annotations": {"org.bdserver.role": "merged-meta"}}
    )
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": layers_desc}
    return LazyImage(manifest, reg, bytes(expected), meta, layers)


@pytest.fixture
def lazy() -> LazyImage:
    return build_lazy_image()


@pytest.fixture
def cache(tmp_path) -> Iterator[ChunkCache]:
    c = ChunkCache(str(tmp_path / "cache"))
    yield c
    c.close()


@pytest.fixture
def pools() -> Iterator[FetchPools]:
    """The test's own fetch threads (the daemon makes one set for all its devices)."""
    p = FetchPools()
    yield p
    p.close()


def tar_layer(files: dict[str, bytes]) -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
            t.addfile(ti, io.BytesIO(data))
    return b.getvalue()


@dataclass
class ConvertedImage:
    layout: object  # the OCILayout holding the lazy image's blobs
    result: object  # convert.image.ConvertResult
    manifest: object  # the lazy manifest (oci.model.Manifest)


def convert_tar_image(base: Path, layers: list[dict[str, bytes]], **convert_kw) -> ConvertedImage:
    """A tar image of `layers` in an OCI layout under `base`, converted by convert/ into its lazy
    image in a second layout (`base/lazy`); `convert_kw` go to convert_image (e.g. chunk_size)."""
    from bdserver.convert.image import convert_image
    from bdserver.oci import mediatypes as mt
    from bdserver.oci.layout import OCILayout
    from bdserver.oci.model import Descriptor, Manifest, canonical_json, parse_manifest

    src = OCILayout(base / "src")
    descs, diff_ids = [], []
    for files in layers:
        t = tar_layer(files)
        dg = sha(t)
        src.put_blob(io.BytesIO(t), dg, len(t))
        descs.append(Descriptor(media_type=mt.OCI_LAYER_TAR, digest=dg, size=len(t)))
        diff_ids.append(dg)
    cfg = canonical_json({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    cd = Descriptor.for_bytes(cfg, mt.OCI_CONFIG)
    src.put_blob(io.BytesIO(cfg), cd.digest, cd.size)
    src.put_manifest(Manifest(config=cd, layers=descs).to_bytes(), mt.OCI_MANIFEST, tag="v1")
    dest = OCILayout(base / "lazy")
    res = convert_image(src, "v1", dest, "lazy", **convert_kw)
    return ConvertedImage(dest, res, parse_manifest(res.manifest, mt.OCI_MANIFEST))
