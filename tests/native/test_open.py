"""EROFS-native images opened on the node (images/opener.py) from OCI layouts: lazily when a
chunk index pins each layer (the merged metadata built here from the layers' own metadata), whole
otherwise; the device, mounted by the kernel, equals the layers applied with overlay semantics;
a malformed layer is refused before the merge."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bdserver.config import Config
from bdserver.errors import FormatError
from bdserver.images.opener import open_image
from bdserver.images.services import NodeServices
from tests.convert.conftest import mounted
from tests.fixtures.erofs_layers import FORMS, layer_views, native_oci_layout
from tests.fixtures.reftree import compare_trees
from tests.native.conftest import NativeLayers


@pytest.fixture
def services(tmp_path: Path):  # type: ignore[no-untyped-def]
    cfg = Config(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                 hosts_dir=str(tmp_path / "no-hosts"), docker_config="/nonexistent")
    s = NodeServices.from_config(cfg)
    yield s
    s.pools.close()
    if s._cache is not None:
        s._cache.close()


def _mount_device(dev, tmp_path: Path):  # type: ignore[no-untyped-def]
    flat = tmp_path / "device.img"
    with open(flat, "wb") as f:
        for off in range(0, dev.size, 4 << 20):
            f.write(dev.read(off, min(4 << 20, dev.size - off)))
    return mounted(flat)


@pytest.mark.parametrize("form", FORMS)
def test_native_image_opens_as_one_device_equal_to_the_reference(native_layers: NativeLayers, services, form: str,
                                                                 tmp_path: Path) -> None:
    layout = native_oci_layout(native_layers.images, tmp_path / "layout", form)
    opened = open_image(f"oci:{layout}:latest", services)
    try:
        lazy = not form.startswith("containerd")
        assert opened.kind == ("native" if lazy else "converted-on-node"), opened.message
        assert opened.image_config.get("Cmd") == ["/bin/sh"]
        with _mount_device(opened.device, tmp_path) as mnt:
            diffs = compare_trees(mnt, native_layers.reference)
        assert diffs == [], "\n".join(diffs)
        if lazy:
            info = opened.device.info
            assert len(info["layers"]) == 3 and info["meta_blocks"] > 0
            again = open_image(f"oci:{layout}:latest", services, pin=opened.pin)  # a restart: the same bytes
            try:
                assert again.device.read(0, again.device.size) == opened.device.read(0, opened.device.size)
            finally:
                again.close()
    finally:
        opened.close()


def _corrupt_first_file_block(image: Path, out: Path) -> Path:
    """A copy of a plain mkfs layer whose first flat file points far past the layer's end."""
    from bdserver.erofs import structs as S
    from bdserver.erofs.reader import ErofsImage

    raw = bytearray(image.read_bytes())
    with ErofsImage.open(image) as e:
        info = next(i for _, i in e.walk() if i.is_reg and i.layout == S.LAYOUT_FLAT_INLINE and i.size > 4096)
        pos = e.sb.meta_blkaddr * 4096 + (info.nid << 5)
    import struct

    struct.pack_into("<I", raw, pos + 16, len(raw) // 4096 + 100)  # i_u: raw_blkaddr
    out.write_bytes(bytes(raw))
    return out


def test_malformed_layer_is_refused_before_the_merge(native_layers: NativeLayers, services, tmp_path: Path) -> None:
    bad = _corrupt_first_file_block(native_layers.images[2], tmp_path / "bad.erofs")
    layout = native_oci_layout([native_layers.images[0], bad], tmp_path / "layout", "zstd-index")
    with pytest.raises(FormatError, match=r"layer 1 \(sha256:[0-9a-f]{64}\): inode \d+ \(/.*\): i_u \(raw_blkaddr\): "
                                          r"blocks \[\d+, \d+\) are not inside one region"):
        open_image(f"oci:{layout}:latest", services)


def test_unsupported_feature_is_named(services, tmp_path: Path) -> None:
    view = layer_views(tmp_path / "v", 1)[0]
    img = tmp_path / "tail.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", "-zlz4hc", "-Eztailpacking", str(img), str(view)], check=True)
    layout = native_oci_layout([img], tmp_path / "layout", "zstd-index")
    with pytest.raises(FormatError, match=r"layer 0 .*ztailpacking .* is not supported"):
        open_image(f"oci:{layout}:latest", services)
    shutil.rmtree(tmp_path / "v")
