"""EROFS-native images (issue 13 item 1): mkfs.erofs layers in every shipping form, the
reference tree they make, a private daemon (tests/node/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.erofs_layers import MIXED, layer_views, mkfs_layer, reference
from tests.node.conftest import daemon  # noqa: F401  (fixture)


class NativeLayers:
    """Three mkfs.erofs layers (compressed compact, compressed big pclusters, plain with inline
    tails) of overlay layer views, and their overlay reference tree."""

    def __init__(self, base: Path) -> None:
        views = layer_views(base / "views")
        self.images = [mkfs_layer(v, base / f"layer{i}.erofs", variant)
                       for i, (v, variant) in enumerate(zip(views, MIXED))]
        self.reference = reference(base)
        self.base = base


@pytest.fixture(scope="session")
def native_layers(tmp_path_factory: pytest.TempPathFactory) -> NativeLayers:
    return NativeLayers(tmp_path_factory.mktemp("native-layers"))
