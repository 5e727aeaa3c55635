"""Referrers: find and attach manifests that point at a subject (OCI distribution-spec v1.1).

Lists through the Referrers API where the registry has one, else through the referrers tag
schema (tag ``sha256-<hex>`` holding an image index). Attaching ALWAYS maintains the tag schema
too, because distribution 2.8 (and GHCR, Docker Hub) have no API and because a registry that
gains the API later must import those tags. Works on any ImageStore (a layout too).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from datetime import datetime, timezone

from bdserver.errors import FormatError, NotFoundError, RegistryError
from bdserver.oci import mediatypes as mt
from bdserver.digest import parse_digest, sha256_digest
from bdserver.oci.model import Descriptor, Index, Manifest, parse_manifest
from bdserver.oci.store import ImageStore

log = logging.getLogger(__name__)

TAG_UPDATE_ATTEMPTS = 8
RECHECK_DELAYS = (0.05, 0.15, 0.3)  # seconds (jittered) between post-write confirmations
_TAG_LOCKS: dict[tuple, threading.Lock] = {}
_TAG_LOCKS_GUARD = threading.Lock()


def _tag_lock(store: ImageStore, tag: str) -> threading.Lock:
    """One lock per (repository, tag) in this process: threads never race each other's RMW."""
    name = getattr(store, "name", None)
    host = getattr(getattr(store, "client", None), "host", None)
    path = getattr(store, "path", None)
    key = (host, name, str(path) if path is not None else None, tag) if (name or path) else (id(store), tag)
    with _TAG_LOCKS_GUARD:
        return _TAG_LOCKS.setdefault(key, threading.Lock())


def referrers_tag(subject_digest: str) -> str:
    """``sha256:<hex>`` -> ``sha256-<hex>`` (the fallback tag; hex fits the 128-char tag limit)."""
    alg, hexd = parse_digest(subject_digest)
    return f"{alg}-{hexd}"[:128]


def _created(d: Descriptor) -> float:
    v = d.annotations.get(mt.ANN_CREATED)
    if not v:
        return float("-inf")
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return float("-inf")
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def newest_first(descs: list[Descriptor]) -> list[Descriptor]:
    """Order by ``org.opencontainers.image.created`` (newest first; undated last; digest breaks ties)."""
    return sorted(descs, key=lambda d: (-_created(d), d.digest))


def _tag_index(store: ImageStore, tag: str) -> Index | None:
    try:
        data, desc = store.get_manifest(tag)
    except NotFoundError:
        return None
    try:
        parsed = parse_manifest(data, desc.media_type)
    except FormatError:
        return None
    return parsed if isinstance(parsed, Index) else None


def list_referrers(store: ImageStore, subject_digest: str, artifact_type: str | None = None, *,
                   use_api: bool = True) -> list[Descriptor]:
    """Referrers of ``subject_digest`` (filtered by ``artifact_type``), newest first.

    API first when the store has one (``referrers_api`` returning None means "no API": 404),
    then the tag schema; a missing or malformed tag means "none".
    """
    descs: list[Descriptor] | None = None
    api = getattr(store, "referrers_api", None)
    if use_api and api is not None:
        idx = api(subject_digest, artifact_type)
        if idx is not None:
            descs = idx.manifests
            log.debug("referrers of %s via API: %d", subject_digest, len(descs))
    if descs is None:
        idx = _tag_index(store, referrers_tag(subject_digest))
        descs = idx.manifests if idx is not None else []
        log.debug("referrers of %s via tag schema: %d", subject_digest, len(descs))
    if artifact_type:
        descs = [d for d in descs if d.artifact_type == artifact_type]
    # de-duplicate (API and tag may both list one manifest)
    seen: dict[str, Descriptor] = {}
    for d in descs:
        seen.setdefault(d.digest, d)
    return newest_first(list(seen.values()))


def referrer_descriptor(data: bytes, media_type: str) -> tuple[Descriptor, Descriptor]:
    """(descriptor as listed in a referrers index, subject descriptor) for manifest bytes."""
    parsed = parse_manifest(data, media_type)
    if parsed.subject is None:
        raise FormatError("manifest has no subject; it cannot be a referrer")
    at = parsed.artifact_type
    if at is None and isinstance(parsed, Manifest):
        at = parsed.config.media_type
    desc = Descriptor(media_type=media_type, digest=sha256_digest(data), size=len(data), artifact_type=at,
                      annotations=dict(parsed.annotations))
    return desc, parsed.subject


def update_referrers_tag(store: ImageStore, subject_digest: str, add: Descriptor | None = None,
                         remove: str | None = None) -> Descriptor:
    """Read-modify-write the ``sha256-<hex>`` index, keeping other entries.

    Registries without conditional PUT leave a race between concurrent writers; each writer
    re-reads after writing and writes again (bounded) until its change is visible.
    """
    tag = referrers_tag(subject_digest)
    writer = getattr(store, "for_writing", None)
    if writer is not None:
        store = writer()  # read what the upstream holds, not a mirror's copy
    with _tag_lock(store, tag):
        return _update_tag(store, tag, add, remove)


def _read_tag(store: ImageStore, tag: str) -> tuple[Index, bool]:
    """(index held by ``tag``, whether the tag exists); refuses a tag that holds something else."""
    try:
        data, desc = store.get_manifest(tag)
    except NotFoundError:
        return Index(manifests=[]), False
    try:
        parsed = parse_manifest(data, desc.media_type)
    except FormatError:
        parsed = None
    if not isinstance(parsed, Index):
        raise RegistryError(f"tag {tag} exists but is not an image index; refusing to overwrite it")
    return parsed, True


def _update_tag(store: ImageStore, tag: str, add: Descriptor | None, remove: str | None) -> Descriptor:
    """Grow-only merge: write the union of every entry seen during this update (minus ``remove``).

    Without conditional PUT the last writer wins; writing everything ever seen (not just the last
    read) lets concurrent writers restore each other's entries, and post-write re-reads over
    ~0.5 s redo an update that was overwritten. This narrows the race; it cannot close it.
    """
    seen: dict[str, Descriptor] = {}
    if add is not None:
        seen[add.digest] = add
    last: Descriptor | None = None
    wrote = False
    for _attempt in range(TAG_UPDATE_ATTEMPTS):
        idx, existed = _read_tag(store, tag)
        for d in idx.manifests:
            seen.setdefault(d.digest, d)
        seen.pop(remove, None) if remove else None
        have = {d.digest for d in idx.manifests}
        done = set(seen) <= have and (remove is None or remove not in have)
        if done and not wrote:
            if existed:
                return store.resolve(tag)
        if done and wrote and last is not None:
            lost = False
            for delay in RECHECK_DELAYS:
                time.sleep(delay * random.uniform(0.5, 1.5))
                again, _ = _read_tag(store, tag)
                for d in again.manifests:
                    seen.setdefault(d.digest, d)
                seen.pop(remove, None) if remove else None
                have = {d.digest for d in again.manifests}
                if not (set(seen) <= have and (remove is None or remove not in have)):
                    lost = True
                    break
            if not lost:
                return last
            log.info("referrers tag %s lost entries to a concurrent writer; writing the union again", tag)
            continue
        manifests = [d for d in idx.manifests if d.digest != remove]
        manifests += [d for k, d in seen.items() if k not in have]
        new = Index(manifests=manifests, annotations=idx.annotations, extra=idx.extra)
        last = store.put_manifest(new.to_bytes(), mt.OCI_INDEX, tag=tag)
        wrote = True
        log.debug("referrers tag %s: %d entries", tag, len(manifests))
    if last is None:
        last = store.resolve(tag)
    return last


def add_referrer(store: ImageStore, data: bytes, media_type: str, tag: str | None = None) -> Descriptor:
    """Push a manifest that has a ``subject`` and list it in the subject's referrers tag.

    Blobs must already be in the store. Returns the referrer descriptor (artifactType and
    annotations filled in, as a referrers index lists it).
    """
    desc, subject = referrer_descriptor(data, media_type)
    store.put_manifest(data, media_type, tag=tag)
    update_referrers_tag(store, subject.digest, add=desc)
    log.info("attached %s (%s) to %s", desc.digest, desc.artifact_type, subject.digest)
    return desc


def remove_referrer(store: ImageStore, subject_digest: str, digest: str) -> None:
    """Drop ``digest`` from the subject's referrers tag (the manifest itself stays)."""
    update_referrers_tag(store, subject_digest, remove=digest)
