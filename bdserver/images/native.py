"""EROFS-native images on the node: ONE lazy device whose merged metadata is built here.

An EROFS-native image (oci/nativeimage.py) has no bdserver lazy image and needs none: its layers
already are EROFS images. When every layer has a chunk index (embedded and verified against the
digest the manifest names, or a standalone index layer verified against its descriptor), each
layer becomes a lazy source behind the node chunk cache, exactly like a lazy image's layers; its
metadata is read through that source (only the chunks that hold inodes, directories and
lcluster indexes are fetched, each verified), checked, and merged with the one merge conversions
use (convert/native.py, convert/merge.py); the merged metadata is served from memory at block 0.
Trust needs no policy: the manifest digest pins every layer through its chunk index, and the
merged metadata is built here. Without chunk indexes the image is fetched whole by the on-node
conversion (opener.py), which knows native layers too.

The build is deterministic, so reopening the same manifest (a daemon restart) gives the same
device; with the metadata chunks in the cache it needs no registry request.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Callable

from bdserver.convert.merge import build_merged_meta, device_tag
from bdserver.convert.native import merge_layer
from bdserver.digest import sha256_digest
from bdserver.errors import FormatError
from bdserver.images.saved import read_small_blob, run_config
from bdserver.images.services import NodeServices
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Manifest, parse_manifest
from bdserver.oci.nativeimage import NativeLayer, native_layers
from bdserver.oci.store import ImageStore
from bdserver.vdev.device import VirtualDevice
from bdserver.vdev.lazyblob import LazyBlobSource
from bdserver.vdev.lazyimage import LayerDesc, LayerPlan, device_of, layer_sources


@dataclass
class NativeImage:
    """An EROFS-native image as the node sees it before deciding how to open it."""

    digest: str
    manifest: Manifest
    layers: list[NativeLayer]
    image_config: dict[str, Any]  # the config's "config" (Env, Cmd, ...)

    @property
    def lazy(self) -> bool:
        """Every layer readable at random (a chunk index): no layer is fetched whole."""
        return all(nl.indexed for nl in self.layers)


def load_native(services: NodeServices, digest: str, store: Callable[[], ImageStore]) -> NativeImage | None:
    """The EROFS-native image with manifest `digest` (saved by digest for restarts), or None when
    the image is made of tar layers."""
    data = services.saved.get(digest, lambda: store().get_manifest(digest)[0])
    man = parse_manifest(data, mt.OCI_MANIFEST)
    if not isinstance(man, Manifest):
        raise FormatError(f"{digest} is not an image manifest")
    raw = services.saved.get(man.config.digest, lambda: read_small_blob(store(), man.config.digest, man.config.size))
    try:
        cfg = json.loads(raw)
    except ValueError as exc:
        raise FormatError(f"image config {man.config.digest} is not JSON: {exc}") from None
    layers = native_layers(man, cfg if isinstance(cfg, dict) else {})
    if layers is None:
        return None
    return NativeImage(digest, man, layers, run_config(raw, man.config.digest))


def _reader(src: LazyBlobSource) -> Callable[[int, int], bytes]:
    """read_at over a layer source; past its end reads as zeros (as on the device)."""

    def read_at(off: int, n: int) -> bytes:
        inside = max(0, min(n, src.size - off))
        return (src.read(off, inside) if inside else b"") + bytes(n - inside)

    return read_at


def open_native(services: NodeServices, image: NativeImage, store: Callable[[], ImageStore]) -> VirtualDevice:
    """ONE lazy device for an EROFS-native image whose layers all have chunk indexes."""
    if not image.lazy:
        raise FormatError(f"{image.digest}: a layer has no chunk index; the image must be fetched whole")
    noted: list[bool] = []

    def fetch_range(digest: str, offset: int, length: int) -> bytes:
        st = store()
        if not noted:  # sizes from the descriptors: no HEAD per blob before its ranged reads
            noted.append(True)
            note = getattr(st, "note_size", None)
            for d in image.manifest.layers if note is not None else ():
                note(d.digest, d.size)
        return st.read_range(digest, offset, length)

    plans = [LayerPlan(LayerDesc(nl.spec_media_type, nl.digest, nl.desc.size, dict(nl.desc.annotations)), 0, None,
                       None if nl.index is None or nl.embedded_index else LayerDesc.of(nl.index))
             for nl in image.layers]
    pins: list[Any] = []
    sources: list[LazyBlobSource] = []
    try:
        # the metadata walk reads scattered blocks: no fetch-ahead (it would fetch most of a layer
        # whose producer interleaves metadata with data, as mkfs.erofs 1.5 does); what it fetches
        # lands in the node cache, where the device's own sources find it
        sources = layer_sources(plans, fetch_range, services.cache, pins, pools=services.pools,
                                fetch_deadline=services.cfg.fetch_deadline_s)
        merge = [merge_layer(_reader(src), src.size, device_tag(nl.digest), name=f"layer {k} ({nl.digest})")
                 for k, (nl, src) in enumerate(zip(image.layers, sources))]
        for src in sources:
            src.close()
        sources = layer_sources(plans, fetch_range, services.cache, pins, pools=services.pools,
                                prefetch=services.prefetcher(), fetch_deadline=services.cfg.fetch_deadline_s)
        buf = io.BytesIO()
        meta = build_merged_meta(merge, buf)
        meta_bytes = buf.getvalue()
        placed = [(slot.mapped_blkaddr, slot.blocks, src) for slot, src in zip(meta.devices, sources)]
        return device_of(meta_bytes, meta.blocks, placed, meta_name=sha256_digest(meta_bytes), pins=pins,
                         cache=services.cache)
    except BaseException:
        for src in sources:
            src.close()
        for pin in pins:
            pin.release()
        raise


__all__ = ["NativeImage", "load_native", "open_native"]
