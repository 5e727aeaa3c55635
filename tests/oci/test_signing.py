"""cosign-format signatures over lazy images, verified in-process (real registry)."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from bdserver.errors import NoLazyImageError
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Descriptor, Manifest
from bdserver.oci.referrers import add_referrer, update_referrers_tag
from bdserver.oci.signing import cosign_tag, load_private_key, payload, sign_bytes, sign_lazy_image, signed_by
from bdserver.oci.trust import TrustPolicy, discover_lazy_image

from .helpers import client, lazy_manifest, push_image, rand_bytes, unique

KEYS = {
    "ecdsa-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ecdsa-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


def write_key(d, name: str, kind: str = "ecdsa-p256"):
    """(private PEM path, public PEM path), PKCS#8 and SubjectPublicKeyInfo."""
    k = KEYS[kind]()
    priv, pub = d / f"{name}.key", d / f"{name}.pem"
    priv.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _image(host: str, prefix: str):
    repo = client(host).repository(unique(prefix))
    src = push_image(repo, "v1", [rand_bytes(300, 1)])
    lz = add_referrer(repo, lazy_manifest(repo, src), mt.OCI_MANIFEST)
    return repo, src, lz, f"{host}/{repo.name}:v1"


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_signed_by_each_key_type(registry_session, tmp_path, kind):
    repo, src, lz, ref = _image(registry_session.host, "sigk/")
    key, pub = write_key(tmp_path, "ci", kind)
    _, other_pub = write_key(tmp_path, "other", kind)
    sign_lazy_image(repo, lz, src.digest, key)
    assert discover_lazy_image(repo, ref, TrustPolicy(state_dir=tmp_path, public_keys=[pub]))[1].digest == lz.digest
    with pytest.raises(NoLazyImageError, match="not signed by any of 1 trusted key"):
        discover_lazy_image(repo, ref, TrustPolicy(state_dir=tmp_path, public_keys=[other_pub]))


def _openssl_sign(data: bytes, key, kind: str) -> bytes:
    msg = key.with_suffix(".msg")
    msg.write_bytes(data)  # Ed25519 is one-shot: openssl wants a file, not a pipe
    if kind == "ed25519":
        cmd = ["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(key), "-in", str(msg)]
    else:
        cmd = ["openssl", "dgst", "-sha256", "-sign", str(key), str(msg)]
    return subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout


def _cosign_manifest(repo, body: bytes, sig: bytes, subject: Descriptor | None) -> bytes:
    """A signature manifest laid out as cosign writes one (built here, not by bdserver)."""
    pd = repo.put_blob_bytes(body)
    repo.put_blob_bytes(b"{}")
    m = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
         "config": {"mediaType": mt.OCI_EMPTY, "digest": mt.EMPTY_JSON_DIGEST, "size": 2},
         "layers": [{"mediaType": mt.COSIGN_SIMPLESIGNING, "digest": pd, "size": len(body),
                     "annotations": {mt.ANN_COSIGN_SIGNATURE: base64.b64encode(sig).decode()}}]}
    if subject is not None:
        m["artifactType"] = mt.COSIGN_SIGNATURE_ARTIFACT
        m["subject"] = {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size}
    return json.dumps(m).encode()


@pytest.mark.parametrize("kind", ["ecdsa-p256", "ed25519"])
@pytest.mark.parametrize("where", ["referrer", "sig-tag"])
def test_signature_made_by_openssl_in_cosign_layout(registry_session, tmp_path, kind, where):
    """An independent producer: openssl signs cosign's payload; the manifest is a referrer of the lazy
    image (cosign's OCI 1.1 mode) or sits under cosign's default tag sha256-<hex>.sig."""
    repo, src, lz, ref = _image(registry_session.host, "sigo/")
    key, pub = write_key(tmp_path, "ci", kind)
    body = json.dumps({"critical": {"identity": {"docker-reference": f"{registry_session.host}/{repo.name}"},
                                    "image": {"docker-manifest-digest": lz.digest},
                                    "type": "cosign container image signature"},
                       "optional": None}).encode()
    sig = _openssl_sign(body, key, kind)
    policy = TrustPolicy(state_dir=tmp_path, public_keys=[pub])
    with pytest.raises(NoLazyImageError):
        discover_lazy_image(repo, ref, policy)
    if where == "referrer":
        add_referrer(repo, _cosign_manifest(repo, body, sig, lz), mt.OCI_MANIFEST)
    else:
        repo.put_manifest(_cosign_manifest(repo, body, sig, None), mt.OCI_MANIFEST, tag=cosign_tag(lz.digest))
    s, found = discover_lazy_image(repo, ref, policy)
    assert (s.digest, found.digest) == (src.digest, lz.digest)
    assert signed_by(repo, lz.digest, src.digest, [pub]) == str(pub)


def test_a_signature_binds_the_lazy_manifest_and_its_source(registry_session, tmp_path):
    host = registry_session.host
    repo, src, lz, ref = _image(host, "sigb/")
    key, pub = write_key(tmp_path, "ci")
    policy = TrustPolicy(state_dir=tmp_path, public_keys=[pub])
    # 1. a valid signature of lz, copied onto another lazy manifest of the same source: refused
    good = sign_lazy_image(repo, lz, src.digest, key)
    lz2 = add_referrer(repo, lazy_manifest(repo, src, "2030-01-01T00:00:00Z", seed=7), mt.OCI_MANIFEST)
    sig_manifest = Manifest.from_dict(json.loads(repo.get_manifest(good.digest)[0]))
    sig_manifest.subject = Descriptor(lz2.media_type, lz2.digest, lz2.size)
    add_referrer(repo, sig_manifest.to_bytes(), mt.OCI_MANIFEST)
    assert signed_by(repo, lz2.digest, src.digest, [pub]) is None
    assert discover_lazy_image(repo, ref, policy)[1].digest == lz.digest  # the newer lz2 is passed over
    # 2. the key holder signed lz3 for another source (payload's optional source): not for this one
    other = push_image(repo, "v2", [rand_bytes(300, 2)])
    lz3 = add_referrer(repo, lazy_manifest(repo, src, seed=8), mt.OCI_MANIFEST)
    sign_lazy_image(repo, lz3, other.digest, key)
    assert signed_by(repo, lz3.digest, src.digest, [pub]) is None
    # 3. a signed lazy image of src offered for another image, with a plain cosign payload (no
    #    source named): the signature is valid, but the lazy manifest's subject says src, so no
    lz4 = add_referrer(repo, lazy_manifest(repo, src, seed=9), mt.OCI_MANIFEST)
    body = json.dumps({"critical": {"identity": {"docker-reference": ""}, "image": {"docker-manifest-digest":
                       lz4.digest}, "type": "cosign container image signature"}}).encode()
    add_referrer(repo, _cosign_manifest(repo, body, sign_bytes(body, load_private_key(key)), lz4), mt.OCI_MANIFEST)
    assert signed_by(repo, lz4.digest, src.digest, [pub]) == str(pub)
    assert signed_by(repo, lz4.digest, other.digest, [pub]) is None
    update_referrers_tag(repo, other.digest, add=lz4)
    with pytest.raises(NoLazyImageError, match="none is trusted"):
        discover_lazy_image(repo, f"{host}/{repo.name}:v2", policy)
    assert payload(lz.digest, src.digest) != payload(lz.digest, other.digest)


def test_unusable_keys(tmp_path):
    from bdserver.errors import ConfigError

    (tmp_path / "x.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="public_keys: .*x.pem: not a PEM public key"):
        TrustPolicy.from_config({"public_keys": [str(tmp_path / "x.pem")]}, tmp_path)
    priv, _ = write_key(tmp_path, "p")
    with pytest.raises(ConfigError, match="public_keys"):  # a private key is not a public key
        TrustPolicy.from_config({"public_keys": [str(priv)]}, tmp_path)
