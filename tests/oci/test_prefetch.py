"""Start traces as referrers of lazy images in a real registry: published, found, trusted only like
lazy images (allow-list, recorded here, signature), refused when tampered with or too large."""

from __future__ import annotations

import pytest

from bdserver.blob.starttrace import StartTrace
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Descriptor, Manifest, parse_manifest
from bdserver.oci.prefetch import find_start_trace, publish_start_trace
from bdserver.oci.referrers import add_referrer, list_referrers
from bdserver.oci.signing import sign_lazy_image
from bdserver.oci.trust import TrustPolicy
from tests.fixtures.proxy import FaultProxy

from .helpers import client, lazy_manifest, push_image, rand_bytes, unique
from .test_signing import write_key


def _lazy(host: str, seed: int = 1):
    repo = client(host).repository(unique("pf/"))
    src = push_image(repo, "v1", [rand_bytes(300, seed)])
    lz = add_referrer(repo, lazy_manifest(repo, src, seed=seed), mt.OCI_MANIFEST)
    return repo, lz


def _trace(seed: int = 0) -> bytes:
    blob = "sha256:" + f"{seed:064x}"
    return StartTrace.from_accesses([(blob, i, i) for i in range(5 + seed)]).to_bytes()


def test_published_trace_is_a_referrer_of_the_lazy_image(registry_session, tmp_path) -> None:
    repo, lz = _lazy(registry_session.host)
    t = publish_start_trace(repo, lz, _trace(), created="2026-01-02T00:00:00Z")
    assert t.artifact_type == mt.PREFETCH_ARTIFACT_TYPE
    assert [d.digest for d in list_referrers(repo, lz.digest, mt.PREFETCH_ARTIFACT_TYPE)] == [t.digest]
    policy = TrustPolicy(state_dir=tmp_path)
    policy.record_converted(t.digest, lz.digest)  # what `bdserver optimize` does on its node
    found = find_start_trace(repo, lz.digest, policy)
    assert found.descriptor is not None and found.descriptor.digest == t.digest
    assert found.data == _trace() and found.why == "converted on this node"


def test_an_untrusted_trace_is_never_fetched(registry_session, tmp_path, fault_proxy: FaultProxy) -> None:
    host = fault_proxy.host
    repo, lz = _lazy(host)
    t = publish_start_trace(repo, lz, _trace())
    fault_proxy.stats.reset()
    found = find_start_trace(repo, lz.digest, TrustPolicy(state_dir=tmp_path))
    assert found.descriptor is None and found.untrusted == 1 and not found.refused
    assert fault_proxy.stats.requests(t.digest) == 0  # neither its manifest nor its blob
    # the same digest allow-listed: trusted, like an allow-listed lazy image
    found = find_start_trace(repo, lz.digest, TrustPolicy(state_dir=tmp_path, allowed={t.digest}))
    assert found.descriptor is not None and found.why == "digest in allow-list"
    # trusting the LAZY image does not make its traces trusted: anyone may add a referrer to it
    found = find_start_trace(repo, lz.digest, TrustPolicy(state_dir=tmp_path, allowed={lz.digest}))
    assert found.descriptor is None and found.untrusted == 1


def test_a_signed_trace_is_trusted_by_its_key(registry_session, tmp_path) -> None:
    repo, lz = _lazy(registry_session.host)
    t = publish_start_trace(repo, lz, _trace())
    key, pub = write_key(tmp_path, "ci")
    _, other = write_key(tmp_path, "other")
    sign_lazy_image(repo, t, lz.digest, key)  # cosign signature of the trace manifest, for this lazy image
    found = find_start_trace(repo, lz.digest, TrustPolicy(state_dir=tmp_path, public_keys=[pub]))
    assert found.descriptor is not None and found.descriptor.digest == t.digest and "signed by" in found.why
    found = find_start_trace(repo, lz.digest, TrustPolicy(state_dir=tmp_path, public_keys=[other]))
    assert found.descriptor is None and found.untrusted == 1


def test_the_newest_trusted_trace_wins_and_an_untrusted_newer_one_is_ignored(registry_session, tmp_path) -> None:
    repo, lz = _lazy(registry_session.host)
    old = publish_start_trace(repo, lz, _trace(1), created="2026-01-01T00:00:00Z")
    new = publish_start_trace(repo, lz, _trace(2), created="2026-01-03T00:00:00Z")
    publish_start_trace(repo, lz, _trace(3), created="2027-01-01T00:00:00Z")  # newest, by a stranger
    found = find_start_trace(repo, lz.digest, TrustPolicy(state_dir=tmp_path, allowed={old.digest, new.digest}))
    assert found.descriptor is not None and found.descriptor.digest == new.digest and found.data == _trace(2)
    assert found.untrusted == 1


def test_a_tampered_trace_is_refused_and_the_next_trusted_one_used(registry_session, tmp_path,
                                                                   fault_proxy: FaultProxy) -> None:
    repo, lz = _lazy(fault_proxy.host)
    good = publish_start_trace(repo, lz, _trace(1), created="2026-01-01T00:00:00Z")
    bad = publish_start_trace(repo, lz, _trace(2), created="2026-01-02T00:00:00Z")
    bad_blob = parse_manifest(repo.get_manifest(bad.digest)[0]).layers[0].digest
    fault_proxy.inject("corrupt", match=f"/blobs/{bad_blob}", count=10)
    policy = TrustPolicy(state_dir=tmp_path, allowed={good.digest, bad.digest})
    found = find_start_trace(repo, lz.digest, policy)
    assert found.descriptor is not None and found.descriptor.digest == good.digest
    assert len(found.refused) == 1 and found.refused[0][0] == bad.digest
    assert "digest mismatch" in found.refused[0][1]


def test_an_oversized_trace_is_refused_before_it_is_fetched(registry_session, tmp_path,
                                                            fault_proxy: FaultProxy) -> None:
    repo, lz = _lazy(fault_proxy.host)
    big = b'{"version":1,"blobs":[],"runs":[]}' + b" " * (5 << 20)
    dg = repo.put_blob_bytes(big)
    repo.put_blob_bytes(mt.EMPTY_JSON)
    m = Manifest(config=Descriptor(mt.OCI_EMPTY, mt.EMPTY_JSON_DIGEST, 2, data="e30="),
                 layers=[Descriptor(mt.PREFETCH_TRACE, dg, len(big))],
                 subject=Descriptor(lz.media_type, lz.digest, lz.size), artifact_type=mt.PREFETCH_ARTIFACT_TYPE)
    t = add_referrer(repo, m.to_bytes(), mt.OCI_MANIFEST)
    fault_proxy.stats.reset()
    found = find_start_trace(repo, lz.digest, TrustPolicy(state_dir=tmp_path, allowed={t.digest}))
    assert found.descriptor is None
    assert len(found.refused) == 1 and "at most 4194304 are accepted" in found.refused[0][1]
    assert fault_proxy.stats.requests(f"/blobs/{dg}") == 0
    with pytest.raises(Exception, match="larger than"):
        publish_start_trace(repo, lz, big)


def test_a_trace_of_another_lazy_image_is_refused(registry_session, tmp_path) -> None:
    repo, lz = _lazy(registry_session.host)
    _, other = _lazy(registry_session.host, seed=2)
    t = publish_start_trace(repo, other, _trace())  # pushed for another image...
    m = parse_manifest(repo.get_manifest(t.digest)[0])
    assert m.subject is not None and m.subject.digest == other.digest
    # ...and listed under lz's referrers tag by a hostile writer
    from bdserver.oci.referrers import update_referrers_tag

    update_referrers_tag(repo, lz.digest, add=t)
    found = find_start_trace(repo, lz.digest, TrustPolicy(state_dir=tmp_path, allowed={t.digest}))
    assert found.descriptor is None and "subject is not" in found.refused[0][1]
