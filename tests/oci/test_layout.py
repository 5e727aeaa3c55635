import io
import json
import os
import subprocess
import sys
import threading

import pytest

from bdserver.errors import IntegrityError, NotFoundError
from bdserver.oci import mediatypes as mt
from bdserver.digest import sha256_digest
from bdserver.oci.layout import OCILayout
from bdserver.oci.model import Descriptor, Manifest, parse_manifest
from bdserver.oci.store import ImageStore, open_store


def _image(lay: OCILayout, payload: bytes = b"layer-bytes" * 1000) -> tuple[bytes, Descriptor]:
    cfg = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    cd = lay.put_blob_bytes(cfg)
    ld = lay.put_blob_bytes(payload)
    m = Manifest(
        config=Descriptor(mt.OCI_CONFIG, cd, len(cfg)),
        layers=[Descriptor(mt.OCI_LAYER_TAR, ld, len(payload))],
    )
    return m.to_bytes(), m.descriptor()


def test_layout_roundtrip(tmp_path):
    lay = open_store(f"oci:{tmp_path}/lay", create=True)
    assert isinstance(lay, OCILayout) and isinstance(lay, ImageStore)
    assert json.loads((tmp_path / "lay" / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    data, want = _image(lay)
    desc = lay.put_manifest(data, mt.OCI_MANIFEST, tag="v1")
    assert desc.digest == want.digest
    assert lay.resolve("v1").digest == desc.digest
    assert lay.resolve(desc.digest).digest == desc.digest
    assert mt.ANN_REF_NAME not in lay.resolve("v1").annotations
    got, gdesc = lay.get_manifest("v1")
    assert got == data and gdesc.size == len(data)
    m = parse_manifest(got)
    with lay.open_blob(m.layers[0].digest, m.layers[0].size) as f:
        assert f.read() == b"layer-bytes" * 1000
    assert lay.read_range(m.layers[0].digest, 11 * 999, 100) == b"layer-bytes"
    assert lay.list_tags() == ["v1"]
    # retag: the tag moves, index.json keeps one holder
    data2, _ = _image(lay, b"other")
    d2 = lay.put_manifest(data2, mt.OCI_MANIFEST, tag="v1")
    assert lay.resolve("v1").digest == d2.digest
    assert [x.digest for x in lay.list_manifests()] == [d2.digest]
    # untagged manifests are listed once
    lay.put_manifest(data, mt.OCI_MANIFEST)
    lay.put_manifest(data, mt.OCI_MANIFEST)
    assert len(lay.list_manifests()) == 2
    with pytest.raises(NotFoundError):
        lay.resolve("nope")
    # reopen
    assert OCILayout(tmp_path / "lay", create=False).resolve("v1").digest == d2.digest


def test_skopeo_reads_our_layout(tmp_path):
    import shutil
    import subprocess

    if not shutil.which("skopeo"):
        pytest.fail("skopeo missing")
    lay = OCILayout(tmp_path / "lay")
    data, _ = _image(lay)
    desc = lay.put_manifest(data, mt.OCI_MANIFEST, tag="v1")
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{tmp_path}/lay:v1"], check=True, capture_output=True
    ).stdout
    assert sha256_digest(out) == desc.digest


def test_put_blob_rejects_wrong_bytes(tmp_path):
    lay = OCILayout(tmp_path / "lay")
    with pytest.raises(IntegrityError):
        lay.put_blob(io.BytesIO(b"abc"), sha256_digest(b"abd"), 3)
    with pytest.raises(IntegrityError):
        lay.put_blob(io.BytesIO(b"abcd"), sha256_digest(b"abc"), 3)
    assert not lay.has_blob(sha256_digest(b"abd"))
    assert [p for p in (tmp_path / "lay" / "blobs" / "sha256").iterdir()] == []


def test_open_blob_detects_corruption_at_eof(tmp_path):
    lay = OCILayout(tmp_path / "lay")
    dg = lay.put_blob_bytes(b"x" * 100000)
    p = lay.blob_path(dg)
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.seek(500)
        f.write(b"y")
    r = lay.open_blob(dg)
    r.read(1000)
    with pytest.raises(IntegrityError):
        while r.read(4096):
            pass


def test_concurrent_tags(tmp_path):
    lay = OCILayout(tmp_path / "lay")
    data, _ = _image(lay)

    def tagger(i: int) -> None:
        OCILayout(tmp_path / "lay").put_manifest(data, mt.OCI_MANIFEST, tag=f"t{i}")

    ts = [threading.Thread(target=tagger, args=(i,)) for i in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert lay.list_tags() == sorted(f"t{i}" for i in range(16))


def test_copy_image_layout_registry_layout(tmp_path, registry_session):
    from bdserver.oci.copy import copy_image
    from bdserver.oci.referrers import add_referrer, list_referrers, referrers_tag

    from .helpers import client, lazy_manifest, push_image, push_index

    a = OCILayout(tmp_path / "a")
    amd = push_image(a, None, [b"amd-layer"], arch="amd64")
    arm = push_image(a, None, [b"arm-layer"], arch="arm64")
    top = push_index(a, "v1", {"amd64": amd, "arm64": arm})
    lz = add_referrer(a, lazy_manifest(a, amd), mt.OCI_MANIFEST)
    repo = client(registry_session.host).repository("copy/x" + str(os.getpid()))
    assert copy_image(a, repo, "v1", "v1").digest == top.digest
    assert copy_image(a, repo, referrers_tag(amd.digest), referrers_tag(amd.digest)).digest
    assert [d.digest for d in list_referrers(repo, amd.digest)] == [lz.digest]
    b = OCILayout(tmp_path / "b")
    assert copy_image(repo, b, "v1", "w").digest == top.digest
    assert b.get_manifest(arm.digest)[0] == a.get_manifest(arm.digest)[0]


def test_reading_never_creates(tmp_path):
    """A source is never created by reading it: `oci:/any/path` gives NotFoundError, no directory."""
    from bdserver.errors import NotFoundError

    missing = tmp_path / "nonexistent"
    with pytest.raises(NotFoundError, match=f"no OCI layout at {missing}"):
        open_store(f"oci:{missing}:v1")
    assert not missing.exists()
    # an existing directory that is not a layout is not turned into one either
    (tmp_path / "plain").mkdir()
    with pytest.raises(NotFoundError, match="no OCI layout at"):
        open_store(f"oci:{tmp_path}/plain")
    assert list((tmp_path / "plain").iterdir()) == []
    # the CLI, as a user would run it: `bdserver convert oci:/nonexistent:v1`
    (tmp_path / "config.toml").write_text(f'state_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\n')
    env = {**os.environ, "BDSERVER_CONFIG": str(tmp_path / "config.toml")}
    p = subprocess.run([sys.executable, "-m", "bdserver.cli", "convert", f"oci:{missing}:v1"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == NotFoundError.exit_code, p.stderr
    assert f"no OCI layout at {missing}" in p.stderr
    assert not missing.exists()
    # a destination may be created
    assert isinstance(open_store(f"oci:{tmp_path}/dest:v1", create=True), OCILayout)
    assert (tmp_path / "dest" / "oci-layout").is_file()
