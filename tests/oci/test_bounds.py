"""Bounded answers: every body the client keeps is capped, and a flood of referrers cannot hide a
trusted lazy image (real registry behind the fault proxy)."""

from __future__ import annotations

import time

import pytest

from bdserver.errors import FormatError, NotFoundError, RegistryError
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Descriptor, Index, Manifest
from bdserver.oci.referrers import add_referrer, referrers_tag
from bdserver.oci.trust import TrustPolicy, discover_lazy_image

from .helpers import client, lazy_manifest, push_image

HUGE = 64 << 20


def _flood(repo, src, good, n=150):
    """``n`` junk lazy images of ``src``, dated after ``good`` and listed before it in the referrers index."""
    repo.put_blob_bytes(mt.EMPTY_JSON)
    junk = []
    for i in range(n):
        m = Manifest(config=Descriptor(mt.OCI_EMPTY, mt.EMPTY_JSON_DIGEST, 2), layers=[],
                     subject=Descriptor(src.media_type, src.digest, src.size), artifact_type=mt.LAZY_ARTIFACT_TYPE,
                     annotations={mt.ANN_CREATED: f"2030-01-01T00:{i // 60:02d}:{i % 60:02d}Z"})
        d = repo.put_manifest(m.to_bytes(), mt.OCI_MANIFEST)
        junk.append(d.with_annotations(m.annotations))
    repo.put_manifest(Index(manifests=[*junk, good]).to_bytes(), mt.OCI_INDEX, tag=referrers_tag(src.digest))
    return {d.digest for d in junk}


@pytest.mark.parametrize("api", [False, True])
def test_referrer_flood_does_not_hide_the_allowed_lazy_image(registry, fault_proxy, tmp_path, api):
    p = fault_proxy
    p.referrers_api = api
    repo = client(p.host).repository("flood/y")
    src = push_image(repo, "v1", [b"base"])
    good = add_referrer(repo, lazy_manifest(repo, src, "2026-01-01T00:00:00Z"), mt.OCI_MANIFEST)
    junk = _flood(repo, src, good)
    ref = f"{p.host}/flood/y:v1"
    for policy in (TrustPolicy(state_dir=tmp_path, allowed={good.digest}),
                   TrustPolicy(state_dir=tmp_path / "k", allowed={good.digest}, public_keys=[tmp_path / "k.pem"])):
        p.stats.reset()
        s, lz = discover_lazy_image(repo, ref, policy)
        assert (s.digest, lz.digest) == (src.digest, good.digest)
        asked = {e[1].rsplit("/", 1)[1].replace("sha256-", "sha256:") for e in p.stats.entries
                 if "/manifests/sha256" in e[1] or "/referrers/" in e[1]}
        assert not asked & junk  # no junk manifest fetched, no junk signature looked up
    # with nothing trusted, the error names a few and counts the rest
    with pytest.raises(Exception, match=r"151 lazy image\(s\) found .* and 146 more"):
        discover_lazy_image(repo, ref, TrustPolicy(state_dir=tmp_path / "none"))


def _sent(p, n=1, timeout=20.0) -> int:
    """Bytes the proxy's last "huge" answer got out (the handler notes them when the client has left)."""
    end = time.monotonic() + timeout
    while len(p.huge_sent) < n and time.monotonic() < end:
        time.sleep(0.05)
    assert len(p.huge_sent) >= n, "the proxy is still sending: the client did not stop reading"
    return p.huge_sent[-1]


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_manifest_is_refused_unread(registry, fault_proxy, chunked):
    p = fault_proxy
    repo = client(p.host).repository("big/m")
    push_image(repo, "v1", [b"x"])
    p.inject("huge", status=200, size=HUGE, chunked=chunked, content_type=mt.OCI_MANIFEST, match="/manifests/v1", method="GET")
    with pytest.raises(FormatError, match="refused unread" if not chunked else "larger than the 4194304 bytes"):
        repo.get_manifest("v1")
    assert _sent(p) < HUGE // 2


def test_oversized_tag_list_and_referrers_page_are_refused(registry, fault_proxy):
    p = fault_proxy
    p.referrers_api = True
    repo = client(p.host).repository("big/t")
    src = push_image(repo, "v1", [b"x"])
    p.inject("huge", status=200, size=HUGE, chunked=True, match="/tags/list", method="GET")
    with pytest.raises(FormatError, match="tag list is larger"):
        repo.list_tags()
    assert _sent(p, 1) < HUGE // 2
    p.inject("huge", status=200, size=HUGE, chunked=True, content_type=mt.OCI_INDEX, match="/referrers/", method="GET")
    with pytest.raises(FormatError, match="referrers of .* is larger"):
        repo.referrers_api(src.digest)
    assert _sent(p, 2) < HUGE // 2


def test_oversized_token_response_is_refused(registry, fault_proxy):
    p = fault_proxy
    p.require_auth("bearer", {})
    repo = client(p.host).repository("big/tok")
    p.inject("huge", status=200, size=HUGE, chunked=True, match="^/token$")
    with pytest.raises(FormatError, match="token response is larger"):
        repo.list_tags()
    assert _sent(p) < HUGE // 2


@pytest.mark.parametrize("status,error", [(400, RegistryError), (404, NotFoundError)])
def test_oversized_error_body_is_not_read(registry, fault_proxy, status, error):
    p = fault_proxy
    repo = client(p.host).repository("big/e")
    push_image(repo, "v1", [b"x"])
    p.inject("huge", status=status, size=HUGE, match="/manifests/v1", method="GET")
    with pytest.raises(error, match=f"HTTP {status}"):
        repo.get_manifest("v1")
    assert _sent(p) < HUGE // 2
