"""Signatures over lazy images: a key-holder vouches that a lazy manifest belongs to its source.

A signature is a referrer of the lazy manifest (artifactType ``application/vnd.bdserver.signature.v1``)
whose one layer holds a detached signature (``openssl dgst -sha256``: RSA or ECDSA keys in PEM)
over the payload ``bdserver-lazy-v1 <lazy digest> <source digest>\\n``. Binding both digests means
a signature cannot be replayed onto another source. openssl does the cryptography, so no Python
crypto dependency is needed; it is installed wherever bdserver runs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path

from bdserver.errors import BdError, FormatError
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Descriptor, Manifest, parse_manifest
from bdserver.oci.referrers import add_referrer, list_referrers
from bdserver.oci.store import ImageStore

log = logging.getLogger(__name__)

SIGNATURE_ARTIFACT_TYPE = "application/vnd.bdserver.signature.v1"
SIGNATURE_LAYER = "application/vnd.bdserver.signature.v1+sig"
ANN_SIG_PAYLOAD = "org.bdserver.signature.payload"
MAX_SIGNATURE_SIZE = 64 * 1024
MAX_SIGNATURES_CHECKED = 16
OPENSSL_TIMEOUT = 30


def payload(lazy_digest: str, source_digest: str) -> bytes:
    return f"bdserver-lazy-v1 {lazy_digest} {source_digest}\n".encode()


def sign_payload(data: bytes, private_key: str | os.PathLike) -> bytes:
    with tempfile.TemporaryDirectory(prefix="bdsig-") as td:
        dp, sp = Path(td) / "payload", Path(td) / "sig"
        dp.write_bytes(data)
        p = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(private_key), "-out", str(sp), str(dp)],
                           capture_output=True, timeout=OPENSSL_TIMEOUT)
        if p.returncode != 0:
            raise BdError(f"openssl could not sign with {private_key}: {p.stderr.decode(errors='replace').strip()}")
        return sp.read_bytes()


def verify_payload(data: bytes, signature: bytes, public_key: str | os.PathLike) -> bool:
    with tempfile.TemporaryDirectory(prefix="bdsig-") as td:
        dp, sp = Path(td) / "payload", Path(td) / "sig"
        dp.write_bytes(data)
        sp.write_bytes(signature)
        try:
            p = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(public_key), "-signature", str(sp),
                                str(dp)], capture_output=True, timeout=OPENSSL_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("openssl verify failed to run: %s", e)
            return False
        return p.returncode == 0


def sign_lazy_image(store: ImageStore, lazy: Descriptor, source_digest: str, private_key: str | os.PathLike,
                    created: str | None = None) -> Descriptor:
    """Attach a signature referrer to ``lazy`` (in ``store``); returns its descriptor."""
    sig = sign_payload(payload(lazy.digest, source_digest), private_key)
    sig_digest = store.put_blob_bytes(sig)  # type: ignore[attr-defined]
    store.put_blob_bytes(mt.EMPTY_JSON)  # type: ignore[attr-defined]
    ann = {ANN_SIG_PAYLOAD: payload(lazy.digest, source_digest).decode().strip()}
    if created:
        ann[mt.ANN_CREATED] = created
    m = Manifest(
        config=Descriptor(mt.OCI_EMPTY, mt.EMPTY_JSON_DIGEST, 2, data="e30="),
        layers=[Descriptor(SIGNATURE_LAYER, sig_digest, len(sig))],
        subject=Descriptor(lazy.media_type, lazy.digest, lazy.size),
        artifact_type=SIGNATURE_ARTIFACT_TYPE,
        annotations=ann,
    )
    return add_referrer(store, m.to_bytes(), mt.OCI_MANIFEST)


def signed_by(store: ImageStore, lazy_digest: str, source_digest: str,
              public_keys: list[str | os.PathLike]) -> str | None:
    """The key file that signed (lazy, source), or None. Bounded work per candidate."""
    if not public_keys:
        return None
    want = payload(lazy_digest, source_digest)
    for d in list_referrers(store, lazy_digest, SIGNATURE_ARTIFACT_TYPE)[:MAX_SIGNATURES_CHECKED]:
        try:
            data, desc = store.get_manifest(d.digest)
            m = parse_manifest(data, desc.media_type)
            if not isinstance(m, Manifest) or m.subject is None or m.subject.digest != lazy_digest:
                continue
            layers = [x for x in m.layers if x.media_type == SIGNATURE_LAYER and x.size <= MAX_SIGNATURE_SIZE]
            if not layers:
                continue
            with store.open_blob(layers[0].digest, layers[0].size) as f:
                sig = f.read()
        except (BdError, FormatError, OSError) as e:
            log.info("signature %s unusable: %s", d.digest, e)
            continue
        for key in public_keys:
            if verify_payload(want, sig, key):
                return str(key)
    return None
