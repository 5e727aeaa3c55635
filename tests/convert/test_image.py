"""`convert_image` end to end on OCI layouts: the lazy image's shape (CONTRACTS.md), its device
mounted against the reference, determinism, layer reuse, the node-side fallback, errors."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import zstandard

from bdserver.convert.image import convert_image, convert_layers_to_device
from bdserver.errors import FormatError, IntegrityError
from bdserver.oci import mediatypes as mt
from bdserver.oci.layout import OCILayout
from bdserver.oci.model import Descriptor, Index, Manifest, canonical_json, host_platform, parse_manifest
from tests.convert.conftest import mounted
from tests.fixtures.layers import build_oci_layout, debian_layers, debian_oci_layout, edge_layers, edge_oci_layout
from tests.fixtures.reftree import compare_trees, reference_tree
from tests.fixtures.tarwriter import TarWriter


def _blob(layout: OCILayout, digest: str) -> bytes:
    return layout.blob_path(digest).read_bytes()


def device_from_layout(layout: OCILayout, manifest: bytes, out: Path) -> Path:
    """What vdev serves, built from the stored blobs: [meta | layer 1 | ... | layer N]."""
    m = parse_manifest(manifest)
    assert isinstance(m, Manifest)
    meta = _blob(layout, m.layers[-1].digest)
    with open(out, "wb") as f:
        f.write(meta)
        for l in m.layers[:-1]:
            data = _decompress_all(_blob(layout, l.digest))
            f.seek(int(l.annotations[mt.ANN_BD_MAPPED_BLKADDR]) * 4096)
            f.write(data)
    return out


def _decompress_all(blob: bytes) -> bytes:
    """A standard zstd decoder over all frames (skippable frames, i.e. the chunk index, skipped)."""
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True) as r:
        return r.read()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    src = OCILayout(debian_oci_layout())
    dest = OCILayout(tmp_path_factory.mktemp("dest") / "layout")
    res = convert_image(src, "latest", dest, "lazy")
    return src, dest, res


def test_lazy_manifest_shape(converted) -> None:  # type: ignore[no-untyped-def]
    src, dest, res = converted
    data, desc = dest.get_manifest("lazy")
    assert data == res.manifest and desc.digest == res.digest
    m = parse_manifest(data)
    assert isinstance(m, Manifest)
    src_bytes, src_desc = src.get_manifest("latest")
    assert m.subject is not None and m.subject.digest == src_desc.digest and m.subject.size == len(src_bytes)
    assert m.artifact_type == mt.LAZY_ARTIFACT_TYPE
    assert m.annotations[mt.ANN_BD_SOURCE] == src_desc.digest
    src_m = parse_manifest(src_bytes)
    assert isinstance(src_m, Manifest)
    assert len(m.layers) == len(src_m.layers) + 1
    pos = int(m.layers[-1].annotations[mt.ANN_BD_BLOCKS])
    diff_ids = []
    for l in m.layers[:-1]:
        assert l.media_type == mt.EROFS_LAYER_ZSTD
        a = l.annotations
        assert a[mt.ANN_EROFS_ROLE] == "device"
        assert int(a[mt.ANN_BD_MAPPED_BLKADDR]) == pos
        raw = _decompress_all(_blob(dest, l.digest))
        assert len(raw) == int(a[mt.ANN_BD_BLOCKS]) * 4096
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == a[mt.ANN_UNCOMPRESSED_DIGEST]
        start, end = (int(x) for x in a[mt.ANN_CHUNK_INDEX_RANGE].split(":"))
        assert end == l.size and 0 < start < end
        assert a[mt.ANN_CHUNK_INDEX_DIGEST].startswith("sha256:")
        assert raw[1024:1028] == b"\xe2\xe1\xf5\xe0"  # an EROFS superblock
        diff_ids.append(a[mt.ANN_UNCOMPRESSED_DIGEST])
        pos += int(a[mt.ANN_BD_BLOCKS])
    meta = m.layers[-1]
    assert meta.media_type == mt.EROFS_LAYER and meta.annotations[mt.ANN_BD_ROLE] == "merged-meta"
    assert res.device_blocks == pos
    cfg = json.loads(_blob(dest, m.config.digest))
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": diff_ids + [meta.digest]}
    assert "erofs" in cfg["os.features"]
    src_cfg = json.loads(_blob(src, src_m.config.digest))
    assert cfg["config"] == src_cfg["config"] and cfg["architecture"] == src_cfg["architecture"]
    assert res.source_diff_ids == src_cfg["rootfs"]["diff_ids"]


@pytest.mark.slow
def test_lazy_device_mounts_and_equals_reference(converted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, dest, res = converted
    flat = device_from_layout(dest, res.manifest, tmp_path / "device.img")
    ref = reference_tree(debian_layers(), tmp_path / "ref", tmp_path)
    with mounted(flat) as mnt:
        diffs = compare_trees(mnt, ref)
    assert diffs == [], "\n".join(diffs)


def test_convert_is_deterministic_and_reuses_layers(converted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, _, res = converted
    other = OCILayout(tmp_path / "again")
    res2 = convert_image(src, "latest", other, None)
    assert res2.manifest == res.manifest and res2.digest == res.digest
    # An image sharing the base layer gets the very same EROFS blob for it.
    layers = debian_layers()
    two = build_oci_layout([layers[0], layers[2]], tmp_path / "two")
    res3 = convert_image(OCILayout(two), "latest", other, "two")
    assert res3.layers[0].digest == res.layers[0].digest
    assert res3.layers[1].digest != res.layers[1].digest


def test_node_fallback_builds_the_same_tree(converted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, dest, res = converted
    local = convert_layers_to_device(src, "latest", tmp_path / "work")
    assert local.meta.blocks == res.meta_blocks and local.meta.device_blocks == res.device_blocks
    flat = local.assemble(tmp_path / "local.img")
    lazy = device_from_layout(dest, res.manifest, tmp_path / "lazy.img")
    with mounted(flat) as a, mounted(lazy) as b:
        assert compare_trees(a, b) == []


def _tiny_layout(path: Path, *, diff_id: str | None = None, index: bool = False) -> OCILayout:
    w = TarWriter()
    w.add("hello", b"0", b"world")
    raw = w.close()
    lay = OCILayout(path)
    dg = "sha256:" + hashlib.sha256(raw).hexdigest()
    lay.put_blob(io.BytesIO(raw), dg, len(raw))
    cfg = canonical_json({"architecture": host_platform().architecture, "os": "linux",
                          "rootfs": {"type": "layers", "diff_ids": [diff_id or dg]}})
    cd = Descriptor.for_bytes(cfg, mt.OCI_CONFIG)
    lay.put_blob(io.BytesIO(cfg), cd.digest, cd.size)
    man = Manifest(config=cd, layers=[Descriptor(mt.OCI_LAYER_TAR, dg, len(raw))])
    if not index:
        lay.put_manifest(man.to_bytes(), mt.OCI_MANIFEST, tag="t")
        return lay
    md = lay.put_manifest(man.to_bytes(), mt.OCI_MANIFEST)
    idx = Index(manifests=[Descriptor(mt.OCI_MANIFEST, md.digest, md.size, platform=host_platform())])
    lay.put_manifest(idx.to_bytes(), mt.OCI_INDEX, tag="t")
    return lay


def test_index_source_picks_host_platform(tmp_path: Path) -> None:
    src = _tiny_layout(tmp_path / "src", index=True)
    res = convert_image(src, "t", OCILayout(tmp_path / "dst"), "t")
    assert res.subject.media_type == mt.OCI_MANIFEST
    with mounted(device_from_layout(OCILayout(tmp_path / "dst"), res.manifest, tmp_path / "d.img")) as m:
        assert (m / "hello").read_bytes() == b"world"


def test_diff_id_mismatch_is_refused(tmp_path: Path) -> None:
    src = _tiny_layout(tmp_path / "src", diff_id="sha256:" + "0" * 64)
    dst = OCILayout(tmp_path / "dst")
    with pytest.raises(IntegrityError):
        convert_image(src, "t", dst, "t")
    assert dst.list_tags() == []


def test_lazy_image_source_is_refused(converted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, dest, res = converted
    with pytest.raises(FormatError, match="lazy image already: it needs no conversion"):
        convert_image(dest, res.digest, OCILayout(tmp_path / "x"), None)


def test_edge_image_through_oci_layouts(tmp_path: Path) -> None:
    """The synthetic edge-case image (6 layers: tar, tar+gzip, tar+zstd; sparse > 4 GiB) through
    the OCI path: blobs in a layout, device assembled from them, mounted, equal to the reference."""
    dest = OCILayout(tmp_path / "dest")
    res = convert_image(OCILayout(edge_oci_layout()), "latest", dest, "lazy")
    flat = device_from_layout(dest, res.manifest, tmp_path / "device.img")
    ref = reference_tree(edge_layers(), tmp_path / "ref", tmp_path)
    with mounted(flat) as mnt:
        diffs = compare_trees(mnt, ref, full_limit=256 << 20)
    assert diffs == [], "\n".join(diffs)


def test_hostile_layer_stores_nothing(tmp_path: Path) -> None:
    """A bad layer anywhere in the image: FormatError, and the destination stays empty."""
    from tests.fixtures.layers import hostile_tars

    good = TarWriter()
    good.add("ok", b"0", b"fine")
    layers = [tmp_path / "1.tar", tmp_path / "2.tar"]
    layers[0].write_bytes(good.close())
    layers[1].write_bytes(hostile_tars()["dotdot"])
    src = OCILayout(build_oci_layout(layers, tmp_path / "src"))
    dst = OCILayout(tmp_path / "dst")
    with pytest.raises(FormatError, match=r"\.\."):
        convert_image(src, "latest", dst, "t")
    assert dst.list_tags() == []
    assert [p for p in (tmp_path / "dst").rglob("*") if p.is_file() and "blobs" in p.parts] == []
