"""Small image builders shared by the oci tests (real blobs, real manifests)."""

from __future__ import annotations

import itertools
import os
import random

from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Descriptor, Index, Manifest, Platform
from bdserver.oci.registry import RegistryClient, RetryPolicy
from bdserver.oci.store import ImageStore

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, max_retry_after=2.0)
_n = itertools.count()


def unique(prefix: str = "r") -> str:
    return f"{prefix}{os.getpid()}x{next(_n)}"


def rand_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def client(host: str, **kw) -> RegistryClient:
    kw.setdefault("retry", FAST_RETRY)
    kw.setdefault("docker_config", "/nonexistent/config.json")
    kw.setdefault("hosts_dirs", [])
    return RegistryClient(host, **kw)


def push_image(store: ImageStore, tag: str | None, layers: list[bytes], arch: str = "amd64") -> Descriptor:
    """A tiny but real image (tar media type; contents are not read by these tests)."""
    cfg = f'{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}}}}'.encode()
    cd = Descriptor.for_bytes(cfg, mt.OCI_CONFIG)
    store.put_blob_bytes(cfg)  # type: ignore[attr-defined]
    lds = []
    for b in layers:
        store.put_blob_bytes(b)  # type: ignore[attr-defined]
        lds.append(Descriptor.for_bytes(b, mt.OCI_LAYER_TAR))
    m = Manifest(config=cd, layers=lds)
    return store.put_manifest(m.to_bytes(), mt.OCI_MANIFEST, tag=tag)


def push_index(store: ImageStore, tag: str, per_arch: dict[str, Descriptor]) -> Descriptor:
    idx = Index(manifests=[Descriptor(d.media_type, d.digest, d.size, platform=Platform("linux", a))
                           for a, d in per_arch.items()])
    return store.put_manifest(idx.to_bytes(), mt.OCI_INDEX, tag=tag)


def lazy_manifest(store: ImageStore, subject: Descriptor, created: str = "2026-01-01T00:00:00Z",
                  seed: int = 1, artifact_type: str = mt.LAZY_ARTIFACT_TYPE) -> bytes:
    """A fake lazy image (right shape, fake EROFS bytes) whose blobs are already in ``store``."""
    layer = rand_bytes(20000 + seed, seed)
    meta = rand_bytes(4096, seed + 1000)
    cfg = b'{"architecture":"amd64","os":"linux","os.features":["erofs"],"rootfs":{"type":"layers","diff_ids":[]}}'
    for b in (layer, meta, cfg):
        store.put_blob_bytes(b)  # type: ignore[attr-defined]
    m = Manifest(
        config=Descriptor.for_bytes(cfg, mt.OCI_CONFIG),
        layers=[Descriptor.for_bytes(layer, mt.EROFS_LAYER_ZSTD, annotations={mt.ANN_EROFS_ROLE: "device"}),
                Descriptor.for_bytes(meta, mt.EROFS_LAYER, annotations={mt.ANN_BD_ROLE: "merged-meta"})],
        subject=Descriptor(subject.media_type, subject.digest, subject.size),
        artifact_type=artifact_type,
        annotations={mt.ANN_CREATED: created, mt.ANN_BD_SOURCE: subject.digest},
    )
    return m.to_bytes()
