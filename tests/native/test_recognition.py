"""oci/nativeimage.py: an EROFS-native image is recognised by its media types and os.features,
never by its bytes; what the spec forbids or bdserver does not support is refused by name."""

from __future__ import annotations

import pytest

from bdserver.errors import FormatError
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Descriptor, Manifest
from bdserver.oci.nativeimage import native_layers

CFG = Descriptor(mt.OCI_CONFIG, "sha256:" + "c" * 64, 2)
FEATURES = {"os.features": ["erofs"]}


def _d(media_type: str, n: int, **ann: str) -> Descriptor:
    return Descriptor(media_type, "sha256:" + f"{n:064x}", 1000 + n, annotations=dict(ann))


def _m(*layers: Descriptor, artifact_type: str | None = None) -> Manifest:
    return Manifest(config=CFG, layers=list(layers), media_type=mt.OCI_MANIFEST, artifact_type=artifact_type)


INDEXED = {mt.ANN_CHUNK_INDEX_RANGE: "900:1000", mt.ANN_CHUNK_INDEX_DIGEST: "sha256:" + "e" * 64}


def test_tar_images_are_not_native() -> None:
    assert native_layers(_m(_d(mt.OCI_LAYER_TAR_GZIP, 1)), {}) is None


def test_spec_and_containerd_layers_are_native() -> None:
    got = native_layers(_m(_d(mt.EROFS_LAYER_ZSTD, 1, **INDEXED), _d(mt.EROFS_LAYER, 2),
                           _d(mt.EROFS_CHUNK_INDEX, 3, **{mt.ANN_CHUNK_INDEX_TARGET: "sha256:" + f"{2:064x}"}),
                           _d(mt.CONTAINERD_EROFS_LAYER_ZSTD, 4)), FEATURES)
    assert got is not None and [nl.desc.media_type for nl in got] == [
        mt.EROFS_LAYER_ZSTD, mt.EROFS_LAYER, mt.CONTAINERD_EROFS_LAYER_ZSTD]
    assert [nl.indexed for nl in got] == [True, True, False]
    assert got[1].index is not None and [nl.zstd for nl in got] == [True, False, True]


def test_an_embedded_index_without_its_digest_is_not_a_lazy_index() -> None:
    got = native_layers(_m(_d(mt.EROFS_LAYER, 1, **{mt.ANN_CHUNK_INDEX_RANGE: "900:1000"})), FEATURES)
    assert got is not None and not got[0].indexed  # fetched whole, verified by the blob digest


def test_bdserver_lazy_images_are_not_native() -> None:
    lazy = _m(_d(mt.EROFS_LAYER_ZSTD, 1, **INDEXED), _d(mt.EROFS_LAYER, 2), artifact_type=mt.LAZY_ARTIFACT_TYPE)
    assert native_layers(lazy, FEATURES) is None


@pytest.mark.parametrize("layers, config, match", [
    ([_d(mt.EROFS_LAYER, 1), _d(mt.OCI_LAYER_TAR, 2)], FEATURES, "mixes EROFS layers with"),
    ([_d(mt.OCI_LAYER_TAR, 1)], FEATURES, "declares os.features erofs but its layers are not EROFS"),
    ([_d(mt.EROFS_CHUNK_INDEX, 1), _d(mt.EROFS_LAYER, 2)], FEATURES, "must follow the EROFS layer it indexes"),
    ([_d(mt.EROFS_LAYER, 1), _d(mt.EROFS_CHUNK_INDEX, 2)], FEATURES, "must follow the EROFS layer it indexes"),
    ([_d(mt.EROFS_LAYER, 1), _d(mt.EROFS_CHUNK_INDEX, 2, **{mt.ANN_CHUNK_INDEX_TARGET: "sha256:" + "9" * 64}),
      _d(mt.EROFS_LAYER, 3)], FEATURES, "targets sha256:9+, not the layer before it"),
    ([_d(mt.EROFS_LAYER, 1, **{mt.ANN_EROFS_ROLE: "device"}), _d(mt.EROFS_LAYER, 2)], FEATURES,
     "layer 0 .* the device role .* is not supported"),
    ([_d(mt.EROFS_LAYER, 1, **{mt.ANN_EROFS_ROLE: "overlay-data"}), _d(mt.EROFS_LAYER, 2)], FEATURES,
     "overlay-data role"),
    ([_d(mt.EROFS_LAYER, 1, **{mt.ANN_EROFS_ROLE: "bogus"})], FEATURES, "unknown org.erofs.role 'bogus'"),
])
def test_malformed_or_unsupported_manifests_are_refused(layers, config, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FormatError, match=match):
        native_layers(_m(*layers), config)
