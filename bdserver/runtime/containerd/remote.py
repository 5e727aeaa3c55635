"""Which layers containerd may skip: the remote-snapshot labels, checked against the registry and the trust policy.

containerd's unpacker (and the CRI plugin with snapshot annotations on, and `bdserver pull`) calls
Prepare for each layer with ``containerd.io/snapshot.ref`` = the layer's chain ID and the
``containerd.io/snapshot/cri.*`` labels naming the image reference, manifest digest and layer
digest. A layer is committed without download only when all of that checks out: the manifest is
fetched by digest and verified, its config's diff IDs give the chain IDs (the target must be one
of them), and the image has a lazy image that the node's trust policy accepts (the same
`discover_lazy_image` the attach path uses). Only registry references are accepted: labels come
from clients of containerd, and a pod author may name a registry image, never a path.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from bdserver.digest import is_digest, sha256_digest
from bdserver.errors import BdError, FormatError, IntegrityError, NoLazyImageError, SnapshotInvalid

log = logging.getLogger(__name__)

SNAPSHOT_REF = "containerd.io/snapshot.ref"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
NEGATIVE_TTL_S = 30.0  # "no trusted lazy image" is looked up again after this long


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI image-spec chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else sha256_digest(f"{out[-1]} {d}".encode()))
    return out


@dataclass(frozen=True)
class LazyImage:
    """An image with a trusted lazy image, as containerd's labels named it."""

    image: str  # pinned reference host/repo@<manifest digest>: what the device is attached from
    layers: tuple[str, ...]  # layer digests, bottom first
    chain: tuple[str, ...]  # chain IDs, bottom first
    lazy: str  # the trusted lazy manifest's digest
    spans: tuple[tuple[int, int], ...] = ()  # per layer: (first block, blocks) of its EROFS image in the device


def pinned_reference(image_ref: str, manifest_digest: str) -> str:
    """``host/repo@digest`` for a registry reference; anything else is refused."""
    from bdserver.oci.reference import parse_reference

    if not is_digest(manifest_digest):
        raise SnapshotInvalid(f"label {CRI_MANIFEST}={manifest_digest!r} is not a digest")
    try:
        r = parse_reference(image_ref)
    except BdError as exc:
        raise SnapshotInvalid(f"label {CRI_IMAGE_REF}={image_ref!r} is not an image reference ({exc})") from None
    if r.is_layout or image_ref.startswith(("file:", "/")):
        raise SnapshotInvalid(f"label {CRI_IMAGE_REF}={image_ref!r}: only registry images can be pulled lazily")
    return str(r.with_tag(None).with_digest(manifest_digest))


class RemoteResolver:
    """Labels -> LazyImage (or None: unpack plainly). Positive answers are kept for the process's
    life (manifests are immutable; trust is re-checked by every attach), negative ones briefly."""

    def __init__(self, open_store: Callable[[Any], Any], trust_policy: Callable[[], Any]) -> None:
        self._open_store = open_store
        self._trust_policy = trust_policy
        self._known: dict[str, LazyImage] = {}
        self._misses: dict[str, float] = {}
        self._lock = threading.Lock()

    def lookup(self, labels: dict[str, str]) -> LazyImage | None:
        ref, manifest = labels.get(CRI_IMAGE_REF, ""), labels.get(CRI_MANIFEST, "")
        if not ref or not manifest:
            return None
        image = pinned_reference(ref, manifest)
        with self._lock:
            hit = self._known.get(image)
            if hit is not None:
                return hit
            if time.monotonic() - self._misses.get(image, -NEGATIVE_TTL_S) < NEGATIVE_TTL_S:
                return None
        try:
            found = self._resolve(image, manifest)
        except NoLazyImageError as exc:
            log.info("snapshotter: %s has no trusted lazy image (%s): unpacking plainly", image, exc)
            found = None
        except SnapshotInvalid:
            raise
        except BdError as exc:  # registry trouble, odd manifests: containerd's own pull still works
            log.warning("snapshotter: cannot look for a lazy image of %s (%s): unpacking plainly",
                        image, exc.user_message())
            found = None
        with self._lock:
            if found is None:
                self._misses[image] = time.monotonic()
            else:
                self._known[image] = found
        return found

    def _resolve(self, image: str, manifest_digest: str) -> LazyImage:
        from bdserver.oci.model import Manifest, parse_manifest
        from bdserver.oci.reference import parse_reference
        from bdserver.oci.trust import discover_lazy_image

        r = parse_reference(image)
        store = self._open_store(r.store_ref())
        data, desc = store.get_manifest(manifest_digest)
        if sha256_digest(data) != manifest_digest:
            raise IntegrityError(f"manifest {manifest_digest} of {image} does not match its digest")
        m = parse_manifest(data, desc.media_type)
        if not isinstance(m, Manifest):
            raise SnapshotInvalid(f"{image} is an index, not an image manifest (containerd names the platform's)")
        with store.open_blob(m.config.digest, m.config.size) as f:
            raw = f.read()
        if sha256_digest(raw) != m.config.digest:
            raise IntegrityError(f"image config {m.config.digest} of {image} does not match its digest")
        try:
            diff_ids = list(json.loads(raw)["rootfs"]["diff_ids"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"image config {m.config.digest} of {image} has no rootfs.diff_ids ({exc})") from None
        if len(diff_ids) != len(m.layers):
            raise FormatError(f"{image}: {len(m.layers)} layers but {len(diff_ids)} diff IDs")
        _, lazy = discover_lazy_image(store, r, self._trust_policy())
        return LazyImage(image, tuple(d.digest for d in m.layers), tuple(chain_ids(diff_ids)), lazy.digest,
                         _layer_spans(store, lazy.digest, len(m.layers)))


def _layer_spans(store: Any, lazy_digest: str, n: int) -> tuple[tuple[int, int], ...]:
    """Where each layer's own EROFS image lies in the device (a chain shorter than the image mounts
    those); () when the lazy image does not say (then only the whole image mounts)."""
    from bdserver.oci.model import Manifest, parse_manifest
    from bdserver.vdev.lazyimage import plan

    data, desc = store.get_manifest(lazy_digest)
    if sha256_digest(data) != lazy_digest:
        raise IntegrityError(f"lazy manifest {lazy_digest} does not match its digest")
    m = parse_manifest(data, desc.media_type)
    if not isinstance(m, Manifest):
        return ()
    _, plans = plan(m.layers)
    if len(plans) != n or any(p.blocks is None for p in plans):
        return ()
    return tuple((p.start_block, int(p.blocks or 0)) for p in plans)
