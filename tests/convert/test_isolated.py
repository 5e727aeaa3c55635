"""convert/isolated.py: on-node conversion in a child under memory, file-size and CPU limits. A
layer that passes every parser cap but is too much for the child fails that conversion with a
ResourceLimitError naming the limit; the parent (this test process) carries on converting."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from bdserver.convert.image import convert_layers_to_device
from bdserver.convert.isolated import ChildLimits, convert_isolated
from bdserver.errors import FormatError, ResourceLimitError
from bdserver.oci import mediatypes as mt
from bdserver.oci.layout import OCILayout
from bdserver.oci.model import Descriptor, Manifest, canonical_json
from tests.fixtures.layers import debian_oci_layout, hostile_tars, many_files_layer, zstd_zeros_frame
from tests.fixtures.tarwriter import TarWriter, header


def layout_of(tmp: Path, layers: list[tuple[bytes, str]]) -> str:
    """An OCI layout with one image of these (bytes, media type) layers. The config's diff_ids
    are not computed (a bomb's would take as long as the bomb): the conversion dies first."""
    lay = OCILayout(tmp / "layout")
    descs = [Descriptor(media_type=t, digest=lay.put_blob_bytes(b), size=len(b)) for b, t in layers]
    cfg = canonical_json({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
    cdesc = Descriptor.for_bytes(cfg, mt.OCI_CONFIG)
    lay.put_blob(io.BytesIO(cfg), cdesc.digest, cdesc.size)
    lay.put_manifest(Manifest(config=cdesc, layers=descs).to_bytes(), mt.OCI_MANIFEST, tag="latest")
    return f"oci:{lay.path}"


def _small_tar() -> bytes:
    w = TarWriter()
    w.add("etc/hostname", b"0", b"isolated\n")
    return w.close(eof=False)


def test_child_builds_the_same_device_as_in_process(tmp_path: Path) -> None:
    lay = debian_oci_layout()
    child = convert_isolated(f"oci:{lay}", "latest", tmp_path / "child")
    here = convert_layers_to_device(OCILayout(lay), "latest", tmp_path / "here")
    assert child.layer_digests == here.layer_digests and child.meta == here.meta
    assert child.meta_path.read_bytes() == here.meta_path.read_bytes()


def test_child_errors_come_back_typed(tmp_path: Path) -> None:
    ref = layout_of(tmp_path, [(hostile_tars()["dotdot"], mt.OCI_LAYER_TAR)])
    with pytest.raises(FormatError, match=r"'\.\.'"):
        convert_isolated(ref, "latest", tmp_path / "out")


def test_file_size_limit(tmp_path: Path) -> None:
    """A 256 MiB file of zeros in a 50 KB layer: within every parser cap, over a 64 MiB FSIZE."""
    import zstandard

    body = zstandard.ZstdCompressor().compress(header(b"zeros", size=256 << 20)) + zstd_zeros_frame(256 << 20)
    ref = layout_of(tmp_path, [(body, mt.OCI_LAYER_TAR_ZSTD)])
    with pytest.raises(ResourceLimitError, match=r"file-size limit \(RLIMIT_FSIZE 64 MiB\)"):
        convert_isolated(ref, "latest", tmp_path / "out", limits=ChildLimits(file_bytes=64 << 20))


def test_cpu_limit(tmp_path: Path) -> None:
    """64 GiB of zeros after the end of a small tar (2 MB compressed): hashed for the diff_id
    whatever its length (max_tar_bytes is 4 TiB), so only RLIMIT_CPU stops it."""
    import zstandard

    body = zstandard.ZstdCompressor().compress(_small_tar() + b"\0" * 1024) + zstd_zeros_frame(64 << 30)
    ref = layout_of(tmp_path, [(body, mt.OCI_LAYER_TAR_ZSTD)])
    with pytest.raises(ResourceLimitError, match=r"CPU limit \(RLIMIT_CPU 2 s\)"):
        convert_isolated(ref, "latest", tmp_path / "out", limits=ChildLimits(cpu_seconds=2, wall_seconds=300))


def test_memory_limit_and_the_parent_lives_on(tmp_path: Path) -> None:
    """200 000 files (far below max_entries) in a 700 KB layer need more than 160 MiB of address
    space to convert; the parent then converts a normal image."""
    ref = layout_of(tmp_path, [(many_files_layer(200_000), mt.OCI_LAYER_TAR_ZSTD)])
    with pytest.raises(ResourceLimitError, match=r"memory limit \(RLIMIT_AS 160 MiB\)"):
        convert_isolated(ref, "latest", tmp_path / "out", limits=ChildLimits(memory_bytes=160 << 20))
    ok = layout_of(tmp_path / "ok", [(_small_tar() + b"\0" * 1024, mt.OCI_LAYER_TAR)])
    dev = convert_isolated(ok, "latest", tmp_path / "ok-out")
    assert dev.meta_path.exists() and len(dev.layer_paths) == 1


def test_wall_clock_limit(tmp_path: Path) -> None:
    import zstandard

    body = zstandard.ZstdCompressor().compress(_small_tar() + b"\0" * 1024) + zstd_zeros_frame(64 << 30)
    ref = layout_of(tmp_path, [(body, mt.OCI_LAYER_TAR_ZSTD)])
    with pytest.raises(ResourceLimitError, match=r"longer than 1 s \(wall-clock limit\)"):
        convert_isolated(ref, "latest", tmp_path / "out", limits=ChildLimits(wall_seconds=1))
