"""Start traces of lazy images on this node: find the trusted one and replay it; publish a new one.

Finding runs beside the other fetches of an attach (the lazy manifest's config, the merged
metadata, the chunk indexes), so a trace costs no round trip of its own before the replay
starts, and the replay starts before the kernel mounts. A trace is an optimisation: when it
cannot be listed, is untrusted, tampered with or too large, the device attaches without it
and the attach message says why.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from bdserver.blob.starttrace import MAX_TRACE_BYTES, StartTrace
from bdserver.config import Config
from bdserver.errors import BdError, NoLazyImageError
from bdserver.images.services import NodeServices
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Descriptor, parse_manifest
from bdserver.oci.prefetch import find_start_trace, publish_start_trace
from bdserver.oci.reference import Reference
from bdserver.oci.store import ImageStore
from bdserver.vdev.device import VirtualDevice
from bdserver.vdev.replay import ReplayLimits, TraceReplay

log = logging.getLogger(__name__)


@dataclass
class FoundTrace:
    trace: StartTrace | None
    digest: str = ""  # the trace manifest
    note: str = ""  # one line for the attach message


def replay_limits(cfg: Config) -> ReplayLimits:
    return ReplayLimits(inflight=max(1, cfg.trace_inflight), run_bytes=cfg.trace_run_bytes,
                        window_bytes=cfg.trace_window_bytes, gap_chunks=cfg.trace_gap_chunks,
                        max_bytes=cfg.trace_max_bytes)


def find_trace(services: NodeServices, store: ImageStore, lazy_digest: str) -> FoundTrace:
    """The trusted start trace of ``lazy_digest``, parsed; never raises (see the module doc)."""
    try:
        found = find_start_trace(store, lazy_digest, services.trust, max_bytes=MAX_TRACE_BYTES)
    except BdError as e:
        log.warning("start traces of %s not listed: %s", lazy_digest, e.user_message())
        return FoundTrace(None, note=f"no start trace (listing failed: {e})")
    refused = "".join(f"; start trace {d} refused: {why}" for d, why in found.refused)
    if found.descriptor is None:
        what = f"{found.untrusted} untrusted" if found.untrusted else "none"
        return FoundTrace(None, note=f"no trusted start trace ({what}){refused}")
    try:
        trace = StartTrace.parse(found.data, name=f"start trace {found.descriptor.digest}")
    except BdError as e:
        log.warning("%s", e.user_message())
        return FoundTrace(None, note=f"start trace {found.descriptor.digest} refused: {e}{refused}")
    return FoundTrace(trace, found.descriptor.digest,
                      f"start trace {found.descriptor.digest} ({len(trace)} chunks, {found.why}){refused}")


def start_replay(services: NodeServices, device: VirtualDevice, found: FoundTrace) -> None:
    """Begin replaying ``found`` on ``device`` (it runs until done or the device closes)."""
    if found.trace is None:
        return
    replay = TraceReplay(found.trace, device.lazy_sources(), services.pools.ahead, replay_limits(services.cfg),
                         name=found.digest)
    device.replay = replay
    replay.start()
    log.info("replaying %s: %d requests for %d of its %d chunks", found.digest, replay.planned_requests,
             replay.planned_chunks, replay.trace_chunks)


def publish_trace(services: NodeServices, ref: Reference, lazy_digest: str, trace: StartTrace) -> dict[str, Any]:
    """Push ``trace`` as a referrer of the lazy manifest ``lazy_digest`` in ``ref``'s repository
    and trust it on this node (it was recorded here)."""
    store = services.source_store(ref)
    data, desc = store.get_manifest(lazy_digest)
    m = parse_manifest(data, desc.media_type)
    if getattr(m, "artifact_type", None) != mt.LAZY_ARTIFACT_TYPE:
        raise NoLazyImageError(f"{lazy_digest} in {ref.repository} is not a lazy image; cannot attach a start trace")
    lazy = Descriptor(desc.media_type, desc.digest, desc.size)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    pushed = publish_start_trace(store, lazy, trace.to_bytes(), created=created)
    services.trust.record_converted(pushed.digest, lazy_digest, str(ref))
    return {"trace": pushed.digest, "lazy": lazy_digest, "chunks": len(trace),
            "destination": f"{ref.name}@{pushed.digest}"}
