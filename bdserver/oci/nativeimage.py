"""EROFS-native images: which manifests are one, and what each of their layers is.

An EROFS-native image carries EROFS filesystem images as its layers instead of tars: the EROFS
image layer spec's ``application/vnd.erofs`` and ``+zstd`` (optionally with an embedded chunk
index, or a standalone ``application/vnd.erofs.chunk-index.v1`` layer right after the layer it
indexes; ``os.features: ["erofs"]`` in the config), and containerd's
``application/vnd.erofs.layer.v1`` (``+zstd``: the image as zstd frames). It is recognised by
those media types and the config's ``os.features``, never by looking at bytes. bdserver's own
lazy images (artifactType `LAZY_ARTIFACT_TYPE`) are not native images: they are used only when
trusted (oci/trust.py).

Each mountable layer becomes a `NativeLayer`; how its bytes reach the node (lazily through a
chunk index, or whole against its digest) is decided by the caller. Roles: layers without one or
``overlay-lower`` stack as overlayfs would; ``device`` (block sources for multi-device EROFS
metadata) and ``overlay-data`` (metacopy redirects) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from bdserver.errors import FormatError
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Descriptor, Manifest

ZSTD_TYPES = (mt.EROFS_LAYER_ZSTD, mt.CONTAINERD_EROFS_LAYER_ZSTD)
IMAGE_TYPES = (mt.EROFS_LAYER, mt.CONTAINERD_EROFS_LAYER) + ZSTD_TYPES
ROLE_OVERLAY_LOWER = "overlay-lower"
_REFUSED_ROLES = {
    "device": "the device role (a block source of multi-device EROFS metadata) is not supported",
    "overlay-data": "the overlay-data role (overlayfs metacopy redirects) is not supported",
}


@dataclass(frozen=True)
class NativeLayer:
    """One EROFS layer of a native image, bottom first. `index` is the standalone chunk-index
    layer that follows it, if any; `diff_id` the digest of its image data when the manifest
    (`org.erofs.uncompressed-digest`) or the config (`rootfs.diff_ids`) says it."""

    desc: Descriptor
    index: Descriptor | None = None
    diff_id: str | None = None

    @property
    def zstd(self) -> bool:
        """The blob is zstd frames of the image (else the image itself, perhaps then an index)."""
        return self.desc.media_type in ZSTD_TYPES

    @property
    def spec_media_type(self) -> str:
        """The spec's media type for this wrapping (what blob/ knows chunk indexes by)."""
        return mt.EROFS_LAYER_ZSTD if self.zstd else mt.EROFS_LAYER

    @property
    def embedded_index(self) -> bool:
        return mt.ANN_CHUNK_INDEX_RANGE in self.desc.annotations

    @property
    def indexed(self) -> bool:
        """A chunk index the manifest pins (an embedded one by `org.erofs.chunk-index.digest`, a
        standalone one by its descriptor) makes it readable at random, so lazily."""
        if self.embedded_index:
            return mt.ANN_CHUNK_INDEX_DIGEST in self.desc.annotations
        return self.index is not None

    @property
    def digest(self) -> str:
        return self.desc.digest


def _features(config: Mapping[str, Any]) -> list[str]:
    feats = config.get("os.features")
    return [f for f in feats if isinstance(f, str)] if isinstance(feats, list) else []


def native_layers(manifest: Manifest, config: Mapping[str, Any]) -> list[NativeLayer] | None:
    """The layers of an EROFS-native image, or None for an image of tar layers (and for bdserver's
    own lazy images). FormatError when the manifest mixes the two, breaks the spec's layer order,
    or uses what is not supported, naming the layer and what to do."""
    if manifest.artifact_type == mt.LAZY_ARTIFACT_TYPE:
        return None
    types = [l.media_type for l in manifest.layers]
    erofs = [t in IMAGE_TYPES or t == mt.EROFS_CHUNK_INDEX for t in types]
    declared = "erofs" in _features(config)
    if not any(erofs):
        if declared:
            raise FormatError("the image config declares os.features erofs but its layers are not EROFS images")
        return None
    if not all(erofs):
        other = next(t for t, e in zip(types, erofs) if not e)
        raise FormatError(f"the image mixes EROFS layers with {other} layers (not defined by the EROFS image spec)")
    diff_ids = _diff_ids(config, len(manifest.layers))
    out: list[NativeLayer] = []
    layers: Sequence[Descriptor] = manifest.layers
    for k, d in enumerate(layers):
        what = f"layer {k} ({d.digest})"
        if d.media_type == mt.EROFS_CHUNK_INDEX:
            if not out or k == len(layers) - 1 or out[-1].digest != layers[k - 1].digest:
                raise FormatError(f"{what}: a standalone chunk index must follow the EROFS layer it indexes")
            target = d.annotations.get(mt.ANN_CHUNK_INDEX_TARGET)
            if target is not None and target != out[-1].digest:
                raise FormatError(f"{what}: the chunk index targets {target}, not the layer before it")
            if not out[-1].embedded_index:  # an embedded index wins (the spec says not to ship both)
                out[-1] = NativeLayer(out[-1].desc, d, out[-1].diff_id)
            continue
        role = d.annotations.get(mt.ANN_EROFS_ROLE, "")
        if role in _REFUSED_ROLES:
            raise FormatError(f"{what}: {_REFUSED_ROLES[role]}")
        if role not in ("", ROLE_OVERLAY_LOWER):
            raise FormatError(f"{what}: unknown {mt.ANN_EROFS_ROLE} {role!r}")
        diff = d.annotations.get(mt.ANN_UNCOMPRESSED_DIGEST) or (diff_ids[k] if diff_ids else None)
        if d.media_type not in ZSTD_TYPES:
            diff = d.digest  # a raw layer's DiffID is its blob digest
        out.append(NativeLayer(d, None, diff))
    return out


def _diff_ids(config: Mapping[str, Any], n: int) -> list[str] | None:
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, Mapping) else None
    if isinstance(ids, list) and len(ids) == n and all(isinstance(x, str) for x in ids):
        return ids
    return None


__all__ = ["IMAGE_TYPES", "NativeLayer", "ZSTD_TYPES", "native_layers"]
