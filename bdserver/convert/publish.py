"""Publish a lazy image from a local OCI layout to a registry (or another layout).

The converter writes the lazy image into a scratch layout; this pushes its blobs (skipping
those the destination has, mounting from other repositories when told where they may be) and
its manifest, as a referrer of the source manifest (tag schema always maintained) or to an
explicit DEST. Progress goes to stderr: one line per blob, or a bar when stderr is a TTY.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from bdserver.errors import FormatError
from bdserver.oci.layout import OCILayout
from bdserver.oci.model import Descriptor, Manifest, parse_manifest
from bdserver.oci.reference import Reference, parse_reference
from bdserver.oci.referrers import referrer_descriptor, referrers_tag, update_referrers_tag
from bdserver.oci.store import ImageStore, open_store

log = logging.getLogger(__name__)


class Progress:
    """Byte progress for a push: a redrawn bar on a TTY, plain lines otherwise, silent if disabled."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True):
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0
        self._t0 = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        if self.tty and time.monotonic() - self._last > 0.1:
            self._last = time.monotonic()
            pct = min(100.0, 100.0 * self.done / self.total)
            bar = "#" * int(pct / 4)
            self.stream.write(f"\r[{bar:<25}] {pct:5.1f}% {self.done / 1e6:8.1f}/{self.total / 1e6:.1f} MB")
            self.stream.flush()

    def note(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + msg + "\n")
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def finish(self, msg: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.note(f"{msg} ({time.monotonic() - self._t0:.1f}s)")


class _Counting(io.RawIOBase):
    def __init__(self, f: BinaryIO, progress: Progress):
        super().__init__()
        self.f, self.p = f, progress

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.f.seekable()

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, off: int, whence: int = 0) -> int:
        return self.f.seek(off, whence)

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        b = self.f.read(n)
        self.p.advance(len(b))
        return b

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


@dataclass
class PublishResult:
    lazy: Descriptor  # as listed in the referrers index (artifactType, annotations)
    destination: str  # reference of the pushed manifest (repo@digest)
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    referrers_tag: str | None = None
    registry_has_referrers_api: bool = False  # the registry answered OCI-Subject
    signature: str | None = None  # digest of the signature referrer (sign_key=)


def _blob_descriptors(m: Manifest) -> list[Descriptor]:
    return [m.config, *m.layers]


def publish(layout: OCILayout | str, lazy_ref: str, source: str | Reference | None = None, *,
            dest: str | Reference | None = None, mount_from: list[str] | None = None,
            progress: bool | Progress = True, registry_kw: dict | None = None,
            dest_store: ImageStore | None = None, sign_key: str | None = None) -> PublishResult:
    """Push the lazy manifest ``lazy_ref`` (tag or digest in ``layout``).

    Without ``dest`` it goes to ``source``'s repository by digest, as a referrer of the source
    manifest. With ``dest`` (``HOST/REPO[:TAG]`` or ``oci:PATH[:TAG]``) it goes there (tagged
    if a tag is given) and the referrers tag is maintained there too. ``mount_from`` lists
    repositories on the same registry that may already hold identical layer blobs.
    ``sign_key`` (PEM private key) attaches a signature referrer that nodes whose TrustPolicy
    lists the public key accept (bdserver.oci.signing).
    """
    lay = layout if isinstance(layout, OCILayout) else OCILayout(layout, create=False)
    data, desc = lay.get_manifest(lazy_ref)
    m = parse_manifest(data, desc.media_type)
    if not isinstance(m, Manifest):
        raise FormatError(f"{lay.path}:{lazy_ref} is an index; publish pushes one lazy manifest")
    if m.subject is None:
        raise FormatError(f"{lay.path}:{lazy_ref} has no subject; it is not a lazy image")
    target = dest if dest is not None else source
    if target is None:
        raise ValueError("publish needs a source or a dest")
    tref = parse_reference(target) if isinstance(target, str) else target
    tag = tref.tag if dest is not None else None
    store = dest_store or open_store(tref.store_ref(), create=dest is not None, **(registry_kw or {}))
    writer = getattr(store, "for_writing", None)
    if writer is not None:
        store = writer()  # existence checks must ask the push target, not a mirror
    mount_from = list(mount_from or [])
    if dest is not None and source is not None:
        sref = parse_reference(source) if isinstance(source, str) else source
        if not sref.is_layout and not tref.is_layout and sref.host == tref.host and sref.repository != tref.repository \
                and sref.repository not in mount_from:
            mount_from.append(sref.repository)  # same registry: a blob already there is mounted, not sent
    blobs = _blob_descriptors(m)
    prog = progress if isinstance(progress, Progress) else Progress(sum(b.size for b in blobs), enabled=progress)
    res = PublishResult(lazy=desc, destination="")
    for b in blobs:
        short = b.digest[7:19]
        if store.has_blob(b.digest):
            res.skipped.append(b.digest)
            prog.advance(b.size)
            prog.note(f"{short}: already there ({b.size} bytes)")
            continue
        mounted = False
        put = getattr(store, "mount_blob", None)
        for repo in mount_from:
            if put is not None and repo != getattr(store, "name", None):
                try:
                    mounted = store.mount_blob(b.digest, repo)  # type: ignore[attr-defined]
                except Exception as e:  # noqa: BLE001 - a failed mount only means "upload it"
                    log.info("mount of %s from %s failed: %s", b.digest, repo, e)
                if mounted:
                    break
        if mounted:
            res.mounted.append(b.digest)
            prog.advance(b.size)
            prog.note(f"{short}: mounted from {repo}")
            continue
        with lay.open_blob(b.digest, b.size) as f:
            store.put_blob(_Counting(f, prog), b.digest, b.size)  # type: ignore[arg-type]
        res.uploaded.append(b.digest)
        res.bytes_uploaded += b.size
        prog.note(f"{short}: uploaded {b.size} bytes")
    ref_desc, subject = referrer_descriptor(data, desc.media_type)
    store.put_manifest(data, desc.media_type, tag=tag)
    res.registry_has_referrers_api = bool(getattr(store, "last_oci_subject", None))
    idx = update_referrers_tag(store, subject.digest, add=ref_desc)
    res.lazy = ref_desc
    if sign_key:
        from bdserver.oci.signing import sign_lazy_image

        res.signature = sign_lazy_image(store, ref_desc, subject.digest, sign_key).digest
        prog.note(f"signed with {sign_key}: {res.signature}")
    res.referrers_tag = referrers_tag(subject.digest)
    res.destination = f"{tref.name}@{desc.digest}"
    prog.finish(f"pushed {res.destination} (referrer of {subject.digest}; "
                f"{len(res.uploaded)} uploaded, {len(res.skipped)} present, {len(res.mounted)} mounted)")
    log.debug("referrers index now %s", idx.digest)
    return res
