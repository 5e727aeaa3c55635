"""Referrers (tag schema and API), trust policy and lazy-image discovery on a real registry."""

from __future__ import annotations

import json
import subprocess

import pytest

from bdserver.errors import NoLazyImageError
from bdserver.oci import mediatypes as mt
from bdserver.digest import sha256_digest
from bdserver.oci.layout import OCILayout
from bdserver.oci.model import Index, Platform, parse_manifest
from bdserver.oci.referrers import add_referrer, list_referrers, referrers_tag, remove_referrer
from bdserver.oci.trust import TrustPolicy, discover_lazy_image

from .helpers import client, lazy_manifest, push_image, push_index, rand_bytes, unique


def test_tag_schema_written_and_found(registry_session):
    repo = client(registry_session.host).repository(unique("ref/"))
    src = push_image(repo, "v1", [rand_bytes(1000, 1)])
    old = add_referrer(repo, lazy_manifest(repo, src, "2026-01-01T00:00:00Z", seed=1), mt.OCI_MANIFEST)
    new = add_referrer(repo, lazy_manifest(repo, src, "2026-03-01T00:00:00Z", seed=2), mt.OCI_MANIFEST)
    other = add_referrer(repo, lazy_manifest(repo, src, "2026-02-01T00:00:00Z", seed=3,
                                             artifact_type="application/vnd.example.sbom"), mt.OCI_MANIFEST)
    # the fallback tag holds an index with all three, annotations and artifactType copied
    data, desc = repo.get_manifest(referrers_tag(src.digest))
    idx = parse_manifest(data)
    assert isinstance(idx, Index) and {d.digest for d in idx.manifests} == {old.digest, new.digest, other.digest}
    assert all(d.artifact_type for d in idx.manifests)
    assert referrers_tag(src.digest) in repo.list_tags()
    found = list_referrers(repo, src.digest, mt.LAZY_ARTIFACT_TYPE)
    assert [d.digest for d in found] == [new.digest, old.digest]  # newest first
    assert found[0].annotations[mt.ANN_CREATED] == "2026-03-01T00:00:00Z"
    assert len(list_referrers(repo, src.digest)) == 3
    # adding again keeps one entry; removing keeps the others
    add_referrer(repo, lazy_manifest(repo, src, "2026-03-01T00:00:00Z", seed=2), mt.OCI_MANIFEST)
    assert len(list_referrers(repo, src.digest)) == 3
    remove_referrer(repo, src.digest, old.digest)
    assert [d.digest for d in list_referrers(repo, src.digest, mt.LAZY_ARTIFACT_TYPE)] == [new.digest]
    assert list_referrers(repo, sha256_digest(b"no subject")) == []


def test_referrers_api_path_through_proxy(registry, fault_proxy):
    p = fault_proxy
    p.referrers_api = True
    repo = client(p.host).repository("api/x")
    src = push_image(repo, "v1", [b"layer"])
    lz = add_referrer(repo, lazy_manifest(repo, src), mt.OCI_MANIFEST)
    add_referrer(repo, lazy_manifest(repo, src, seed=9, artifact_type="application/vnd.example.sig"), mt.OCI_MANIFEST)
    p.stats.reset()
    found = list_referrers(repo, src.digest, mt.LAZY_ARTIFACT_TYPE)
    assert [d.digest for d in found] == [lz.digest]
    assert p.stats.requests(r"/referrers/", "GET") == 1
    assert p.stats.requests(r"/manifests/sha256-", "GET") == 0  # the tag was not read by the client
    p.referrers_api = False
    p.stats.reset()
    assert [d.digest for d in list_referrers(repo, src.digest, mt.LAZY_ARTIFACT_TYPE)] == [lz.digest]
    assert p.stats.statuses(r"/referrers/", "GET") == [404]
    assert p.stats.requests(r"/manifests/sha256-", "GET") == 1


def test_layout_referrers(tmp_path):
    lay = OCILayout(tmp_path / "lay")
    src = push_image(lay, "v1", [b"abc"])
    lz = add_referrer(lay, lazy_manifest(lay, src), mt.OCI_MANIFEST)
    assert [d.digest for d in list_referrers(lay, src.digest, mt.LAZY_ARTIFACT_TYPE)] == [lz.digest]


def test_trust_outcomes(registry_session, tmp_path):
    c = client(registry_session.host)
    repo = c.repository(unique("trust/"))
    ref = f"{registry_session.host}/{repo.name}:v1"
    src = push_image(repo, "v1", [rand_bytes(2000, 5)])
    policy = TrustPolicy(state_dir=tmp_path / "state")
    with pytest.raises(NoLazyImageError, match="no lazy image"):
        discover_lazy_image(repo, ref, policy)
    older = add_referrer(repo, lazy_manifest(repo, src, "2026-01-01T00:00:00Z", seed=1), mt.OCI_MANIFEST)
    newer = add_referrer(repo, lazy_manifest(repo, src, "2026-05-01T00:00:00Z", seed=2), mt.OCI_MANIFEST)
    with pytest.raises(NoLazyImageError, match="none is trusted"):
        discover_lazy_image(repo, ref, policy)
    # converted here: the record must match the source too
    policy.record_converted(older.digest, sha256_digest(b"another source"))
    with pytest.raises(NoLazyImageError):
        discover_lazy_image(repo, ref, policy)
    policy.record_converted(older.digest, src.digest)
    s, lz = discover_lazy_image(repo, ref, policy)
    assert (s.digest, lz.digest) == (src.digest, older.digest)
    # allow-list (file), newest trusted wins
    policy.allow(newer.digest)
    assert discover_lazy_image(repo, ref, policy)[1].digest == newer.digest
    assert newer.digest in (tmp_path / "state" / "trust" / "allowed").read_text()
    # a fresh policy object sees the persisted state; switching "converted here" off keeps the allow-list
    p2 = TrustPolicy(state_dir=tmp_path / "state", trust_converted_here=False)
    assert discover_lazy_image(repo, ref, p2)[1].digest == newer.digest
    p3 = TrustPolicy(state_dir=tmp_path / "empty", allowed={older.digest})
    assert discover_lazy_image(repo, ref, p3)[1].digest == older.digest
    # a reference that pins the lazy manifest itself: trusted only where the admin opted in
    pinned = f"{registry_session.host}/{repo.name}@{older.digest}"
    with pytest.raises(NoLazyImageError, match="not trusted"):
        discover_lazy_image(repo, pinned, TrustPolicy(state_dir=tmp_path / "none"))
    s, lz = discover_lazy_image(repo, pinned, TrustPolicy(state_dir=tmp_path / "none", trust_pinned_reference=True))
    assert (s.digest, lz.digest) == (src.digest, older.digest)
    with pytest.raises(NoLazyImageError, match="not found"):
        discover_lazy_image(repo, f"{registry_session.host}/{repo.name}:nope", policy)


def test_referrer_that_lies_is_skipped(registry_session, tmp_path):
    """B's referrers list offers A's allow-listed lazy image (its subject is A), and a manifest whose
    index entry claims the lazy type while the manifest itself is something else: neither is used."""
    from bdserver.oci.model import Descriptor
    from bdserver.oci.referrers import update_referrers_tag

    host = registry_session.host
    repo = client(host).repository(unique("lie/"))
    a = push_image(repo, "a", [rand_bytes(700, 1)])
    b = push_image(repo, "b", [rand_bytes(700, 2)])
    lz_a = add_referrer(repo, lazy_manifest(repo, a), mt.OCI_MANIFEST)
    sbom = add_referrer(repo, lazy_manifest(repo, b, seed=5, artifact_type="application/vnd.example.sbom"),
                        mt.OCI_MANIFEST)
    remove_referrer(repo, b.digest, sbom.digest)  # listed again below, now claiming the lazy type
    for liar in (lz_a, sbom):
        update_referrers_tag(repo, b.digest, add=Descriptor(liar.media_type, liar.digest, liar.size,
                                                            artifact_type=mt.LAZY_ARTIFACT_TYPE,
                                                            annotations={mt.ANN_CREATED: "2030-01-01T00:00:00Z"}))
    policy = TrustPolicy(state_dir=tmp_path, allowed={lz_a.digest, sbom.digest})
    assert {d.digest for d in list_referrers(repo, b.digest, mt.LAZY_ARTIFACT_TYPE)} == {lz_a.digest, sbom.digest}
    with pytest.raises(NoLazyImageError, match=f"{lz_a.digest} \\(does not point at {b.digest}\\)") as e:
        discover_lazy_image(repo, f"{host}/{repo.name}:b", policy)
    assert f"{sbom.digest} (does not point at" in str(e.value)
    # A itself still finds its own lazy image
    assert discover_lazy_image(repo, f"{host}/{repo.name}:a", policy)[1].digest == lz_a.digest


def test_discovery_through_multiplatform_index(registry_session, tmp_path):
    repo = client(registry_session.host).repository(unique("multi/"))
    amd = push_image(repo, None, [b"amd"], arch="amd64")
    arm = push_image(repo, None, [b"arm"], arch="arm64")
    push_index(repo, "v1", {"amd64": amd, "arm64": arm})
    lz_amd = add_referrer(repo, lazy_manifest(repo, amd, seed=1), mt.OCI_MANIFEST)
    lz_arm = add_referrer(repo, lazy_manifest(repo, arm, seed=2), mt.OCI_MANIFEST)
    policy = TrustPolicy(state_dir=tmp_path, allowed={lz_amd.digest, lz_arm.digest})
    ref = f"{registry_session.host}/{repo.name}:v1"
    s, lz = discover_lazy_image(repo, ref, policy, platform=Platform("linux", "arm64"))
    assert (s.digest, lz.digest) == (arm.digest, lz_arm.digest)
    s, lz = discover_lazy_image(repo, ref, policy, platform=Platform("linux", "amd64"))
    assert (s.digest, lz.digest) == (amd.digest, lz_amd.digest)


def test_skopeo_copy_keeps_lazy_image_discoverable(registry_session, tmp_path):
    """skopeo --preserve-digests copies the source and the lazy manifest byte-for-byte; with the
    referrers index copied too (skopeo 1.9 cannot: `copy --all --preserve-digests` of an index whose
    entries carry artifactType fails with "Manifest list must be converted"), discovery finds it;
    a reference pinning the lazy digest works without the index."""
    host = registry_session.host
    c = client(host)
    a = c.repository(unique("sk/a"))
    b_name = unique("sk/b")
    src = push_image(a, "v1", [rand_bytes(3000, 7)])
    lz = add_referrer(a, lazy_manifest(a, src), mt.OCI_MANIFEST)
    tag = referrers_tag(src.digest)

    def copy(src_ref: str, dst_ref: str, *extra: str) -> None:
        subprocess.run(["skopeo", "copy", "-q", "--preserve-digests", "--src-tls-verify=false",
                        "--dest-tls-verify=false", *extra, src_ref, dst_ref], check=True, capture_output=True,
                       timeout=120)

    copy(f"docker://{host}/{a.name}:v1", f"docker://{host}/{b_name}:v1")
    copy(f"docker://{host}/{a.name}@{lz.digest}", f"docker://{host}/{b_name}:lazy-copy")
    b = c.repository(b_name)
    assert b.resolve("v1").digest == src.digest
    assert b.resolve("lazy-copy").digest == lz.digest  # digest preserved, subject intact
    policy = TrustPolicy(state_dir=tmp_path, allowed={lz.digest})
    with pytest.raises(NoLazyImageError, match="no lazy image"):
        discover_lazy_image(b, f"{host}/{b_name}:v1", policy)
    s, found = discover_lazy_image(b, f"{host}/{b_name}@{lz.digest}",
                                   TrustPolicy(state_dir=tmp_path / "x", trust_pinned_reference=True))
    assert (s.digest, found.digest) == (src.digest, lz.digest)
    index_bytes, idesc = a.get_manifest(tag)
    assert b.put_manifest(index_bytes, idesc.media_type, tag=tag).digest == idesc.digest
    s, found = discover_lazy_image(b, f"{host}/{b_name}:v1", policy)
    assert (s.digest, found.digest) == (src.digest, lz.digest)
    # and into an OCI layout on disk with skopeo, read back through our layout store
    copy(f"docker://{host}/{a.name}:v1", f"oci:{tmp_path}/lay:v1")
    copy(f"docker://{host}/{a.name}@{lz.digest}", f"oci:{tmp_path}/lay:lazy")
    lay = OCILayout(tmp_path / "lay", create=False)
    lay.put_manifest(index_bytes, idesc.media_type, tag=tag)
    s, found = discover_lazy_image(lay, f"oci:{tmp_path}/lay:v1", policy)
    assert found.digest == lz.digest
    idx = json.loads((tmp_path / "lay" / "index.json").read_text())
    assert {m["annotations"]["org.opencontainers.image.ref.name"] for m in idx["manifests"]} == {"v1", "lazy", tag}


def _keypair(d, name):
    key, pub = d / f"{name}.key", d / f"{name}.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "ec", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
    return key, pub


def test_signed_lazy_image_is_trusted(registry_session, tmp_path):
    from bdserver.oci.signing import sign_lazy_image

    host = registry_session.host
    repo = client(host).repository(unique("sig/"))
    ref = f"{host}/{repo.name}:v1"
    src = push_image(repo, "v1", [rand_bytes(100, 3)])
    other_src = push_image(repo, "v2", [rand_bytes(100, 4)])
    lz = add_referrer(repo, lazy_manifest(repo, src), mt.OCI_MANIFEST)
    good_key, good_pub = _keypair(tmp_path, "good")
    bad_key, _ = _keypair(tmp_path, "bad")
    policy = TrustPolicy(state_dir=tmp_path / "state", public_keys=[good_pub])
    with pytest.raises(NoLazyImageError, match="none is trusted"):
        discover_lazy_image(repo, ref, policy)
    sign_lazy_image(repo, lz, src.digest, bad_key)  # wrong key
    sign_lazy_image(repo, lz, other_src.digest, good_key)  # right key, other source: no replay
    with pytest.raises(NoLazyImageError, match="none is trusted"):
        discover_lazy_image(repo, ref, policy)
    sign_lazy_image(repo, lz, src.digest, good_key)
    s, found = discover_lazy_image(repo, ref, policy)
    assert (s.digest, found.digest) == (src.digest, lz.digest)
    # keys dropped into the state dir work too
    kd = tmp_path / "state2" / "trust" / "keys"
    kd.mkdir(parents=True)
    (kd / "ci.pem").write_bytes(good_pub.read_bytes())
    assert discover_lazy_image(repo, ref, TrustPolicy(state_dir=tmp_path / "state2"))[1].digest == lz.digest


def test_concurrent_add_referrer_keeps_every_entry(registry_session):
    import threading

    host = registry_session.host
    repo_name = unique("race/")
    repo = client(host).repository(repo_name)
    src = push_image(repo, "v1", [b"base"])
    bodies = [lazy_manifest(repo, src, f"2026-01-0{i + 1}T00:00:00Z", seed=100 + i) for i in range(6)]
    errors: list[BaseException] = []

    def add(body: bytes) -> None:
        try:
            add_referrer(client(host).repository(repo_name), body, mt.OCI_MANIFEST)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=add, args=(b,)) for b in bodies]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert not errors
    found = list_referrers(repo, src.digest, mt.LAZY_ARTIFACT_TYPE)
    assert {d.digest for d in found} == {sha256_digest(b) for b in bodies}


def test_untrusted_referrers_are_not_fetched(registry, fault_proxy, tmp_path):
    p = fault_proxy
    repo = client(p.host).repository("flood/x")
    src = push_image(repo, "v1", [b"base"])
    lzs = [add_referrer(repo, lazy_manifest(repo, src, f"2026-01-0{i + 1}T00:00:00Z", seed=i), mt.OCI_MANIFEST)
           for i in range(5)]
    p.stats.reset()
    with pytest.raises(NoLazyImageError, match="5 lazy image"):
        discover_lazy_image(repo, f"{p.host}/flood/x:v1", TrustPolicy(state_dir=tmp_path))
    fetched = {e[1].rsplit("/", 1)[1] for e in p.stats.entries if "/manifests/sha256:" in e[1]}
    assert not fetched & {d.digest for d in lzs}
    s, lz = discover_lazy_image(repo, f"{p.host}/flood/x:v1", TrustPolicy(state_dir=tmp_path, allowed={lzs[2].digest}))
    assert lz.digest == lzs[2].digest


def test_module_cli(registry_session, tmp_path, capsys):
    from bdserver.oci.__main__ import main

    host = registry_session.host
    repo = client(host).repository(unique("cli/"))
    src = push_image(repo, "v1", [b"cli"])
    lz = add_referrer(repo, lazy_manifest(repo, src), mt.OCI_MANIFEST)
    base = ["--state-dir", str(tmp_path / "st"), "--docker-config", "/nonexistent", "--hosts-dir", str(tmp_path)]
    ref = f"{host}/{repo.name}:v1"
    assert main([*base, "resolve", ref]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == src.digest
    assert main([*base, "referrers", ref, "--artifact-type", mt.LAZY_ARTIFACT_TYPE]) == 0
    assert [x["digest"] for x in json.loads(capsys.readouterr().out)["referrers"]] == [lz.digest]
    assert main([*base, "discover", ref]) == NoLazyImageError.exit_code
    assert "none is trusted" in capsys.readouterr().err
    assert main([*base, "allow", lz.digest]) == 0
    capsys.readouterr()
    assert main([*base, "discover", ref]) == 0
    assert json.loads(capsys.readouterr().out)["lazy"] == lz.digest
    key, pub = _keypair(tmp_path, "cli")
    assert main([*base, "sign", f"{host}/{repo.name}@{lz.digest}", "--key", str(key)]) == 0
    capsys.readouterr()
    assert main([*base, "copy", ref, f"oci:{tmp_path}/lay:v1"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == src.digest


def _race_worker(host: str, repo: str, body: bytes, barrier) -> None:
    r = client(host).repository(repo)
    barrier.wait(timeout=60)
    add_referrer(r, body, mt.OCI_MANIFEST)


def test_concurrent_add_referrer_across_processes(registry_session):
    """Separate processes (nodes) share no lock: the grow-only merge + re-checks keep every entry."""
    import multiprocessing as mp

    host = registry_session.host
    repo_name = unique("prace/")
    repo = client(host).repository(repo_name)
    src = push_image(repo, "v1", [b"base"])
    bodies = [lazy_manifest(repo, src, seed=200 + i) for i in range(5)]
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(bodies))
    ps = [ctx.Process(target=_race_worker, args=(host, repo_name, b, barrier)) for b in bodies]
    for p in ps:
        p.start()
    for p in ps:
        p.join(timeout=120)
    assert [p.exitcode for p in ps] == [0] * len(ps)
    assert {d.digest for d in list_referrers(repo, src.digest)} == {sha256_digest(b) for b in bodies}
