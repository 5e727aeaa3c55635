"""Conversion laid out by a start trace: the files a start read come first, contiguous, in trace
order; the tree is unchanged; the trace carries over to the new blobs; deterministic."""

from __future__ import annotations

import random
from pathlib import Path

from bdserver.blob.starttrace import StartTrace
from bdserver.convert.image import convert_image
from bdserver.convert.tracelayout import ExtentMap
from bdserver.erofs.reader import ErofsImage
from bdserver.oci import mediatypes as mt
from bdserver.oci.layout import OCILayout
from bdserver.oci.model import parse_manifest
from bdserver.vdev import FetchPools, open_lazy_image
from tests.vdev.conftest import convert_tar_image

CS = 16384
RND = random.Random(11)
FILES = {f"lib/m{i:02d}.so": RND.randbytes(3 * CS + 1000 * i) for i in range(12)}
FILES["bin/app"] = RND.randbytes(5 * CS)
READ = ["bin/app", "lib/m09.so", "lib/m02.so", "lib/m07.so"]  # what the "start" reads, in this order


def _layer_image(layout: OCILayout, manifest, tmp: Path, k: int = 0) -> Path:
    """The uncompressed EROFS image of device layer ``k`` (through the lazy device)."""
    with FetchPools() as pools:
        dev = open_lazy_image(manifest, layout.read_range, None, pools=pools)
        seg = dev.segments[1 + k]
        out = tmp / f"layer{k}.img"
        out.write_bytes(seg.source.read(0, seg.source.size))
        dev.close()
    return out


def _trace_of(image: Path, digest: str, paths: list[str]) -> StartTrace:
    """A trace that reads ``paths`` whole, in order (as the daemon would record it)."""
    m = ExtentMap(image)
    acc = []
    for p in paths:
        for e in m.by_path[b"/" + p.encode()]:
            acc += [(digest, c, 0) for c in range(e.start // CS, (e.end - 1) // CS + 1)]
    return StartTrace.from_accesses(acc)


def test_traced_files_come_first_and_the_trace_carries_over(tmp_path: Path) -> None:
    base = convert_tar_image(tmp_path / "a", [FILES], chunk_size=CS)
    digest = base.manifest.layers[0].digest
    old_img = _layer_image(base.layout, base.manifest, tmp_path)
    trace = _trace_of(old_img, digest, READ)
    before = len(trace)

    res = convert_image(OCILayout(tmp_path / "a" / "src"), "v1", OCILayout(tmp_path / "b"), "traced", chunk_size=CS, startup_trace=trace)
    lay_b = OCILayout(tmp_path / "b")
    man_b = parse_manifest(res.manifest, mt.OCI_MANIFEST)
    new_digest = man_b.layers[0].digest
    assert new_digest != digest
    new_img = _layer_image(lay_b, man_b, tmp_path / "b")
    ext = ExtentMap(new_img)
    # the files read come first in the data area, in trace order, and back to back
    starts = [ext.by_path[b"/" + p.encode()][0].start for p in READ]
    assert starts == sorted(starts)
    first_data = min(e.start for e in ext.extents)
    assert starts[0] == first_data
    # the carried-over trace names the new blob's chunks that hold what the traced chunks held of
    # the files read (not of neighbours that only shared a chunk with them), now ONE run of
    # adjacent chunks from the start of the data, where the old trace had several
    assert res.trace is not None and res.trace.blobs() == [new_digest]
    new_chunks = sorted(res.trace.per_blob()[new_digest])
    assert set(_trace_of(new_img, new_digest, READ).per_blob()[new_digest]) <= set(new_chunks)
    assert len(res.trace) <= before and new_chunks[0] == first_data // CS
    runs = lambda cs: sum(1 for a, b in zip([-2] + cs, cs) if b != a + 1)  # noqa: E731
    assert runs(new_chunks) == 1 < runs(sorted(trace.per_blob()[digest]))
    # same tree, same bytes
    with ErofsImage.open(old_img) as a, ErofsImage.open(new_img) as b:
        for p in FILES:
            assert a.read(p) == b.read(p) == FILES[p]
    # deterministic: the same source and trace give the same lazy image
    again = convert_image(OCILayout(tmp_path / "a" / "src"), "v1", OCILayout(tmp_path / "c"), "traced", chunk_size=CS,
                          startup_trace=trace)
    assert again.digest == res.digest


def test_without_a_trace_the_layout_is_unchanged(tmp_path: Path) -> None:
    a = convert_tar_image(tmp_path / "a", [FILES], chunk_size=CS)
    b = convert_image(OCILayout(tmp_path / "a" / "src"), "v1", OCILayout(tmp_path / "b"), "x", chunk_size=CS,
                      startup_trace=StartTrace.from_accesses([("sha256:" + "f" * 64, 0, 0)]))  # another blob
    assert parse_manifest(b.manifest, mt.OCI_MANIFEST).layers[0].digest == a.manifest.layers[0].digest
    assert b.trace is not None and len(b.trace) == 0
