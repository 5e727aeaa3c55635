"""Signatures over lazy images, in cosign's format, checked in-process with ``cryptography``.

A key holder vouches that a lazy manifest is the lazy image of its source. The signature is what
``cosign sign --key`` makes of the lazy manifest: cosign's simple-signing payload
(``critical.image.docker-manifest-digest`` = the lazy manifest digest, ``critical.type`` =
"cosign container image signature") stored as a layer of a signature manifest, the base64
signature of the payload bytes in that layer's ``dev.cosignproject.cosign/signature`` annotation.
bdserver attaches it as a referrer of the lazy manifest (cosign's OCI 1.1 referrers mode) and reads
that and cosign's default tag ``sha256-<hex>.sig`` too, so ``cosign sign`` and ``cosign verify`` work
on the same images.

How a signature binds both digests: the payload names the lazy manifest digest, and the lazy
manifest, which is content-addressed by that digest, names the source in its ``subject``. A
signature is accepted only after the lazy manifest fetched by that digest has the expected subject
(`signed_by` checks it), so it cannot be replayed onto another source without a different lazy
digest. bdserver also writes the source digest into the payload's ``optional`` section
(``org.bdserver.source``); a payload that names another source there is refused.

Keys are PEM public keys: ECDSA (P-256, P-384, P-521; SHA-256 over the payload, as cosign does),
Ed25519 (over the payload bytes) and RSA (PKCS#1 v1.5, SHA-256).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from bdserver.digest import parse_digest
from bdserver.errors import BdError, ConfigError
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Descriptor, Manifest, parse_manifest
from bdserver.oci.referrers import add_referrer, list_referrers
from bdserver.oci.store import ImageStore

log = logging.getLogger(__name__)

COSIGN_TYPE = "cosign container image signature"
ANN_SOURCE = "org.bdserver.source"  # in the payload's optional section
MAX_PAYLOAD_SIZE = 64 * 1024
MAX_SIGNATURE_MANIFESTS = 16  # per lazy manifest (referrers, then the .sig tag)
MAX_LAYERS = 16  # signatures examined per signature manifest

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def load_public_key(path: str | os.PathLike) -> PublicKey:
    """A PEM public key that can verify signatures; ConfigError naming the file otherwise."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"{path}: not a PEM public key ({e.__class__.__name__})") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, rsa.RSAPublicKey)):
        raise ConfigError(f"{path}: {type(key).__name__} keys are not supported (use ECDSA, Ed25519 or RSA)")
    return key


def load_private_key(path: str | os.PathLike) -> PrivateKey:
    """An unencrypted PEM private key (PKCS#8, SEC1 or PKCS#1), as openssl writes them."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BdError(f"{path}: not an unencrypted PEM private key ({e.__class__.__name__})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
        raise BdError(f"{path}: {type(key).__name__} keys are not supported (use ECDSA, Ed25519 or RSA)")
    return key


def sign_bytes(data: bytes, key: PrivateKey) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def verify_bytes(data: bytes, signature: bytes, key: PublicKey) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


def payload(lazy_digest: str, source_digest: str, reference: str = "") -> bytes:
    """cosign's simple-signing payload for the lazy manifest, naming its source in ``optional``."""
    doc = {"critical": {"identity": {"docker-reference": reference},
                        "image": {"docker-manifest-digest": lazy_digest},
                        "type": COSIGN_TYPE},
           "optional": {ANN_SOURCE: source_digest}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def payload_vouches(data: bytes, lazy_digest: str, source_digest: str) -> bool:
    """True if the payload is a cosign image signature of ``lazy_digest`` and names no other source."""
    try:
        doc = json.loads(data)
        crit = doc["critical"]
        if crit["type"] != COSIGN_TYPE or crit["image"]["docker-manifest-digest"] != lazy_digest:
            return False
        src = (doc.get("optional") or {}).get(ANN_SOURCE)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    return src is None or src == source_digest


def sign_lazy_image(store: ImageStore, lazy: Descriptor, source_digest: str, private_key: str | os.PathLike,
                    created: str | None = None) -> Descriptor:
    """Attach a cosign signature of ``lazy`` (in ``store``) as its referrer; returns its descriptor."""
    key = load_private_key(private_key)
    body = payload(lazy.digest, source_digest, getattr(store, "name", "") or "")
    sig = base64.b64encode(sign_bytes(body, key)).decode()
    payload_digest = store.put_blob_bytes(body)  # type: ignore[attr-defined]
    store.put_blob_bytes(mt.EMPTY_JSON)  # type: ignore[attr-defined]
    m = Manifest(
        config=Descriptor(mt.OCI_EMPTY, mt.EMPTY_JSON_DIGEST, 2, data="e30="),
        layers=[Descriptor(mt.COSIGN_SIMPLESIGNING, payload_digest, len(body),
                           annotations={mt.ANN_COSIGN_SIGNATURE: sig})],
        subject=Descriptor(lazy.media_type, lazy.digest, lazy.size),
        artifact_type=mt.COSIGN_SIGNATURE_ARTIFACT,
        annotations={mt.ANN_CREATED: created} if created else {},
    )
    return add_referrer(store, m.to_bytes(), mt.OCI_MANIFEST)


def cosign_tag(digest: str) -> str:
    """cosign's signature tag for a digest: ``sha256-<hex>.sig``."""
    alg, hexd = parse_digest(digest)
    return f"{alg}-{hexd}.sig"


def _signature_manifests(store: ImageStore, lazy_digest: str) -> list[str]:
    refs = [d.digest for d in list_referrers(store, lazy_digest, mt.COSIGN_SIGNATURE_ARTIFACT)]
    return refs[:MAX_SIGNATURE_MANIFESTS - 1] + [cosign_tag(lazy_digest)]


def _load_keys(paths: list[str | os.PathLike]) -> list[tuple[str, PublicKey]]:
    keys = []
    for p in paths:
        try:
            keys.append((str(p), load_public_key(p)))
        except ConfigError as e:
            log.warning("ignoring trusted key %s", e)
    return keys


def signed_by(store: ImageStore, lazy_digest: str, source_digest: str,
              public_keys: list[str | os.PathLike]) -> str | None:
    """The key file whose cosign signature vouches that ``lazy_digest`` is the lazy image of
    ``source_digest`` (the lazy manifest's subject is checked too), or None. Bounded work."""
    keys = _load_keys(public_keys)
    if not keys:
        return None
    for ref in _signature_manifests(store, lazy_digest):
        try:
            data, desc = store.get_manifest(ref)
            m = parse_manifest(data, desc.media_type)
        except (BdError, ValueError) as e:
            log.debug("signature manifest %s of %s unusable: %s", ref, lazy_digest, e)
            continue
        if not isinstance(m, Manifest) or (m.subject is not None and m.subject.digest != lazy_digest):
            continue
        for layer in m.layers[:MAX_LAYERS]:
            key = _verify_layer(store, layer, lazy_digest, source_digest, keys)
            if key is not None and _subject_is(store, lazy_digest, source_digest):
                return key
    return None


def _verify_layer(store: ImageStore, layer: Descriptor, lazy_digest: str, source_digest: str,
                  keys: list[tuple[str, PublicKey]]) -> str | None:
    if layer.media_type != mt.COSIGN_SIMPLESIGNING or layer.size > MAX_PAYLOAD_SIZE:
        return None
    try:
        sig = base64.b64decode(layer.annotations.get(mt.ANN_COSIGN_SIGNATURE, ""), validate=True)
        with store.open_blob(layer.digest, layer.size) as f:
            body = f.read()  # the size is enforced and the digest checked at EOF
    except (binascii.Error, BdError, OSError) as e:
        log.debug("signature payload %s unusable: %s", layer.digest, e)
        return None
    if not sig or not payload_vouches(body, lazy_digest, source_digest):
        return None
    for name, key in keys:
        if verify_bytes(body, sig, key):
            return name
    return None


def _subject_is(store: ImageStore, lazy_digest: str, source_digest: str) -> bool:
    try:
        data, desc = store.get_manifest(lazy_digest)
        m = parse_manifest(data, desc.media_type)
    except (BdError, ValueError):
        return False
    ok = m.subject is not None and m.subject.digest == source_digest
    if not ok:
        log.warning("lazy manifest %s is signed, but its subject is not %s", lazy_digest, source_digest)
    return ok
