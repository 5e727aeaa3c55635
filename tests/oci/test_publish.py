"""convert/publish.py: push a lazy image from a layout as a referrer, then find it."""

from __future__ import annotations

import io

import pytest

from bdserver.convert.publish import Progress, publish
from bdserver.errors import FormatError
from bdserver.oci import mediatypes as mt
from bdserver.oci.layout import OCILayout
from bdserver.oci.referrers import list_referrers
from bdserver.oci.trust import TrustPolicy, discover_lazy_image

from .helpers import FAST_RETRY, client, lazy_manifest, push_image, rand_bytes, unique



def _setup(registry, tmp_path):
    src_lay = OCILayout(tmp_path / "src")
    src = push_image(src_lay, "v1", [rand_bytes(5000, 1), rand_bytes(7000, 2)])
    repo = unique("pub/")
    registry.push_layout(tmp_path / "src", "v1", repo, "v1")  # skopeo, digests preserved
    registry.push_layout(tmp_path / "src", "v1", repo + "-native", tool="bdserver")
    assert client(registry.host).repository(repo + "-native").resolve("v1").digest == src.digest
    lazy_lay = OCILayout(tmp_path / "lazy")
    data = lazy_manifest(lazy_lay, src)
    lazy_lay.put_manifest(data, mt.OCI_MANIFEST, tag="lazy")
    return src, repo, lazy_lay


def test_publish_as_referrer_then_discover(registry_session, tmp_path):
    reg = registry_session
    src, repo, lazy_lay = _setup(reg, tmp_path)
    out = io.StringIO()
    kw = {"retry": FAST_RETRY, "hosts_dirs": []}
    res = publish(lazy_lay, "lazy", f"{reg.host}/{repo}:v1", progress=Progress(1, stream=out), registry_kw=kw)
    assert len(res.uploaded) == 3 and not res.skipped
    assert res.lazy.artifact_type == mt.LAZY_ARTIFACT_TYPE
    assert "uploaded" in out.getvalue() and "pushed" in out.getvalue()
    r = client(reg.host).repository(repo)
    assert [d.digest for d in list_referrers(r, src.digest, mt.LAZY_ARTIFACT_TYPE)] == [res.lazy.digest]
    policy = TrustPolicy(state_dir=tmp_path / "state")
    policy.record_converted(res.lazy.digest, src.digest)
    s, lz = discover_lazy_image(r, f"{reg.host}/{repo}:v1", policy)
    assert (s.digest, lz.digest) == (src.digest, res.lazy.digest)
    # publishing again: nothing uploaded, the referrers index keeps one entry
    res2 = publish(lazy_lay, "lazy", f"{reg.host}/{repo}:v1", progress=False, registry_kw=kw)
    assert not res2.uploaded and len(res2.skipped) == 3
    assert len(list_referrers(r, src.digest)) == 1


def test_publish_to_dest_with_mount(registry, fault_proxy, tmp_path):
    p = fault_proxy
    src, repo, lazy_lay = _setup(registry, tmp_path)
    kw = {"retry": FAST_RETRY, "hosts_dirs": []}
    publish(lazy_lay, "lazy", f"{p.host}/{repo}:v1", progress=False, registry_kw=kw)
    p.stats.reset()
    res = publish(lazy_lay, "lazy", None, dest=f"{p.host}/other/repo:lazy-v1", mount_from=[repo],
                  progress=False, registry_kw=kw)
    assert len(res.mounted) == 3 and not res.uploaded
    assert p.stats.requests(method="PATCH") == 0
    assert p.stats.bytes(r"/blobs/uploads/", "PUT") == 0
    r = client(p.host).repository("other/repo")
    assert r.resolve("lazy-v1").digest == res.lazy.digest
    assert [d.digest for d in list_referrers(r, src.digest)] == [res.lazy.digest]


def test_publish_to_layout_and_refusals(tmp_path):
    src_lay = OCILayout(tmp_path / "src")
    src = push_image(src_lay, "v1", [b"x"])
    lazy_lay = OCILayout(tmp_path / "lazy")
    lazy_lay.put_manifest(lazy_manifest(lazy_lay, src), mt.OCI_MANIFEST, tag="lazy")
    res = publish(lazy_lay, "lazy", None, dest=f"oci:{tmp_path}/out:lz", progress=False)
    out = OCILayout(tmp_path / "out", create=False)
    assert out.resolve("lz").digest == res.lazy.digest
    assert [d.digest for d in list_referrers(out, src.digest)] == [res.lazy.digest]
    lazy_lay.put_manifest(src_lay.get_manifest("v1")[0], mt.OCI_MANIFEST, tag="plain")
    with pytest.raises(FormatError, match="no subject"):
        publish(lazy_lay, "plain", None, dest=f"oci:{tmp_path}/out2", progress=False)


def test_publish_signed(registry_session, tmp_path):
    import subprocess

    reg = registry_session
    src, repo, lazy_lay = _setup(reg, tmp_path)
    key, pub = tmp_path / "k.pem", tmp_path / "p.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "ec", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
    res = publish(lazy_lay, "lazy", f"{reg.host}/{repo}:v1", progress=False, sign_key=str(key),
                  registry_kw={"retry": FAST_RETRY, "hosts_dirs": []})
    assert res.signature
    r = client(reg.host).repository(repo)
    s, lz = discover_lazy_image(r, f"{reg.host}/{repo}:v1", TrustPolicy(state_dir=tmp_path / "st", public_keys=[pub]))
    assert (s.digest, lz.digest) == (src.digest, res.lazy.digest)
