"""The [trust] config table fails closed: TrustPolicy.from_config, on a real registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from bdserver.errors import ConfigError, NoLazyImageError
from bdserver.oci import mediatypes as mt
from bdserver.oci.referrers import add_referrer
from bdserver.oci.trust import TrustPolicy, discover_lazy_image

from .helpers import client, lazy_manifest, push_image, rand_bytes, unique

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("table,key", [
    ({"mode": "converted-here"}, "mode"),                  # the old default config's unused key
    ({"allowed": [DIGEST], "alowed": [DIGEST]}, "alowed"),  # a typo never passes silently
    ({"allowed": DIGEST}, "allowed"),                       # a string, not a list
    ({"allowed": ["sha256:xyz"]}, "allowed"),
    ({"allow_files": [1]}, "allow_files"),
    ({"converted_here": "no"}, "converted_here"),
    ({"pinned_reference": 1}, "pinned_reference"),
    ({"public_keys": "/k.pem"}, "public_keys"),
    ({"public_keys": ["/nonexistent/k.pem"]}, "public_keys"),
])
def test_bad_tables_name_the_key(tmp_path, table, key):
    with pytest.raises(ConfigError, match=key):
        TrustPolicy.from_config(table, tmp_path)


def test_keys_reach_the_policy(tmp_path):
    from .test_signing import write_key

    write_key(tmp_path, "k")
    p = TrustPolicy.from_config({"allowed": [DIGEST], "allow_files": ["/etc/x"], "converted_here": False,
                                 "pinned_reference": True, "public_keys": [str(tmp_path / "k.pem")]}, tmp_path / "st")
    assert (p.allowed, p.allow_files, p.trust_converted_here, p.trust_pinned_reference, p.public_keys) == \
        ({DIGEST}, [Path("/etc/x")], False, True, [tmp_path / "k.pem"])
    assert p.state_dir == tmp_path / "st"
    d = TrustPolicy.from_config(None, tmp_path)
    assert (d.allowed, d.trust_converted_here, d.trust_pinned_reference, d.public_keys) == (set(), True, False, [])
    assert TrustPolicy.from_config({}, tmp_path) == d


def test_pinned_digest_is_not_trust_by_default(registry_session, tmp_path):
    """A pod author who writes REPO@<lazy digest> gets no trust unless the admin opted in."""
    host = registry_session.host
    repo = client(host).repository(unique("pin/"))
    src = push_image(repo, "v1", [rand_bytes(500, 1)])
    lz = add_referrer(repo, lazy_manifest(repo, src), mt.OCI_MANIFEST)
    pinned = f"{host}/{repo.name}@{lz.digest}"
    with pytest.raises(NoLazyImageError, match="not trusted"):
        discover_lazy_image(repo, pinned, TrustPolicy.from_config({}, tmp_path))
    with pytest.raises(NoLazyImageError, match="not trusted"):
        discover_lazy_image(repo, pinned, TrustPolicy(state_dir=tmp_path))
    s, found = discover_lazy_image(repo, pinned, TrustPolicy.from_config({"pinned_reference": True}, tmp_path))
    assert (s.digest, found.digest) == (src.digest, lz.digest)
    # the allow-list from the table is what discovery uses
    s, found = discover_lazy_image(repo, f"{host}/{repo.name}:v1",
                                   TrustPolicy.from_config({"allowed": [lz.digest]}, tmp_path))
    assert found.digest == lz.digest
    with pytest.raises(NoLazyImageError):
        discover_lazy_image(repo, f"{host}/{repo.name}:v1",
                            TrustPolicy.from_config({"allowed": [DIGEST]}, tmp_path))


def test_public_keys_reach_the_verifier(registry_session, tmp_path):
    from bdserver.oci.signing import sign_lazy_image

    from .test_referrers_trust import _keypair

    host = registry_session.host
    repo = client(host).repository(unique("keys/"))
    src = push_image(repo, "v1", [rand_bytes(500, 2)])
    lz = add_referrer(repo, lazy_manifest(repo, src), mt.OCI_MANIFEST)
    key, pub = _keypair(tmp_path, "ci")
    sign_lazy_image(repo, lz, src.digest, key)
    ref = f"{host}/{repo.name}:v1"
    with pytest.raises(NoLazyImageError, match="none is trusted"):
        discover_lazy_image(repo, ref, TrustPolicy.from_config({}, tmp_path / "st"))
    policy = TrustPolicy.from_config({"public_keys": [str(pub)]}, tmp_path / "st")
    assert discover_lazy_image(repo, ref, policy)[1].digest == lz.digest
