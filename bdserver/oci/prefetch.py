"""Start traces in registries: publish one as a referrer of its lazy image, and find the trusted one.

A start trace (blob/starttrace.py) is an OCI artifact: a manifest with artifactType
``application/vnd.bdserver.prefetch.v1``, the empty config, ONE layer holding the trace, and
``subject`` = the lazy manifest it was recorded on. It is found the way the lazy image is
(Referrers API, else the ``sha256-<hex>`` tag) and trusted under the same policy
(trust.TrustPolicy): its manifest digest allow-listed, recorded on this node, or signed by a
configured key for that lazy image. Anyone who can push to the repository can add a referrer,
so an untrusted trace is never fetched; a trusted one whose bytes do not match its digest, or
that is larger than the cap, is refused, and the next trusted one is tried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from bdserver.digest import verify_bytes
from bdserver.errors import BdError, FormatError
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Descriptor, Manifest, parse_manifest
from bdserver.oci.referrers import add_referrer, list_referrers
from bdserver.oci.store import ImageStore
from bdserver.oci.trust import MAX_SIGNATURE_CANDIDATES, TrustPolicy

log = logging.getLogger(__name__)

MAX_TRACE_BLOB = 4 << 20  # bytes of one trace blob (blob/starttrace.MAX_TRACE_BYTES)


@dataclass
class TraceLookup:
    """What `find_start_trace` saw: the trusted trace (or None), and why others were not used."""

    descriptor: Descriptor | None = None  # the trace manifest
    data: bytes = b""  # the trace blob, verified against its digest
    why: str = ""  # why it is trusted
    refused: list[tuple[str, str]] = field(default_factory=list)  # trusted but unusable: (digest, why)
    untrusted: int = 0


def publish_start_trace(store: ImageStore, lazy: Descriptor, trace: bytes, *, created: str | None = None
                        ) -> Descriptor:
    """Push ``trace`` as a referrer of the lazy manifest ``lazy``; returns the trace manifest's
    descriptor (as a referrers index lists it)."""
    if len(trace) > MAX_TRACE_BLOB:
        raise FormatError(f"start trace of {len(trace)} bytes is larger than {MAX_TRACE_BLOB}")
    digest = store.put_blob_bytes(trace)  # type: ignore[attr-defined]
    store.put_blob_bytes(mt.EMPTY_JSON)  # type: ignore[attr-defined]
    m = Manifest(
        config=Descriptor(mt.OCI_EMPTY, mt.EMPTY_JSON_DIGEST, 2, data="e30="),
        layers=[Descriptor(mt.PREFETCH_TRACE, digest, len(trace))],
        subject=Descriptor(lazy.media_type or mt.OCI_MANIFEST, lazy.digest, lazy.size),
        artifact_type=mt.PREFETCH_ARTIFACT_TYPE,
        annotations={mt.ANN_CREATED: created} if created else {},
    )
    return add_referrer(store, m.to_bytes(), mt.OCI_MANIFEST)


def _load(store: ImageStore, cand: Descriptor, lazy_digest: str, max_bytes: int) -> bytes:
    """The trace blob of candidate ``cand``, after checking its manifest; FormatError or
    IntegrityError (typed, one line) when it is not a usable trace of ``lazy_digest``."""
    data, desc = store.get_manifest(cand.digest)  # verified against the digest
    m = parse_manifest(data, desc.media_type)
    if not isinstance(m, Manifest) or m.artifact_type != mt.PREFETCH_ARTIFACT_TYPE:
        raise FormatError("not a start trace manifest")
    if m.subject is None or m.subject.digest != lazy_digest:
        raise FormatError(f"its subject is not {lazy_digest}")
    if len(m.layers) != 1 or m.layers[0].media_type != mt.PREFETCH_TRACE:
        raise FormatError(f"expected one {mt.PREFETCH_TRACE} layer")
    layer = m.layers[0]
    if layer.size > max_bytes:
        raise FormatError(f"the trace is {layer.size} bytes; at most {max_bytes} are accepted")
    parts: list[bytes] = []
    n = 0
    with store.open_blob(layer.digest, layer.size) as f:
        while piece := f.read(1 << 16):  # to EOF: the verifying reader checks the digest there
            n += len(piece)
            if n > max_bytes:
                raise FormatError(f"the trace is larger than {max_bytes} bytes")
            parts.append(piece)
    return verify_bytes(b"".join(parts), layer.digest, layer.size, what=f"start trace {layer.digest}")


def find_start_trace(store: ImageStore, lazy_digest: str, policy: TrustPolicy, *,
                     max_bytes: int = MAX_TRACE_BLOB) -> TraceLookup:
    """The newest trusted, usable start trace of the lazy manifest ``lazy_digest`` in ``store``.

    Candidates the policy accepts without the network (allow-list, recorded here) come first,
    then, with keys configured, up to MAX_SIGNATURE_CANDIDATES others by their signatures. An
    untrusted candidate is never fetched. Registry failures of the listing propagate (the caller
    attaches without a trace)."""
    out = TraceLookup()
    cands = list_referrers(store, lazy_digest, mt.PREFETCH_ARTIFACT_TYPE)  # newest first

    def attempt(cand: Descriptor, why: str) -> bool:
        try:
            out.data = _load(store, cand, lazy_digest, max_bytes)
        except BdError as e:
            out.refused.append((cand.digest, str(e)))
            log.warning("start trace %s of %s refused: %s", cand.digest, lazy_digest, e.user_message())
            return False
        out.descriptor, out.why = cand, why
        return True

    decided = [(c, *policy.decide(c.digest, lazy_digest)) for c in cands]  # no network
    rest = [c for c, ok, _ in decided if not ok]
    out.untrusted = len(rest)
    for cand, ok, why in decided:
        if ok and attempt(cand, why):
            return out
    if policy.keys():
        for cand in rest[:MAX_SIGNATURE_CANDIDATES]:
            ok, why = policy.check_signatures(store, cand.digest, lazy_digest)
            if ok:
                out.untrusted -= 1
                if attempt(cand, why):
                    return out
    if out.untrusted:
        log.info("ignoring %d untrusted start trace(s) of %s", out.untrusted, lazy_digest)
    return out
