"""`bdserver optimize`: record a start trace of a lazy image and publish it beside the image.

The container runs (runc, the image's own entrypoint when no command is given) on a device the
daemon attaches with a private, empty chunk cache and no replay, so every chunk the start
needs is read through the daemon as on a fresh node; the daemon logs each read, and when the
command exits (or the timeout passes, and it is killed) the reads become a start trace: the
chunks read, first access first, per layer blob. ``--from-stats DEVICE`` takes the trace of a
device that already ran a real workload instead. The trace is pushed as a referrer of the lazy
image and trusted on this node (it was recorded here); other nodes trust it by the same policy
as lazy images (allow-list its digest, or sign it).
"""

from __future__ import annotations

import os
from typing import Any

from bdserver.blob.starttrace import StartTrace
from bdserver.config import Config
from bdserver.daemon.client import request
from bdserver.errors import FormatError
from bdserver.fsutil import atomic_write
from bdserver.runtime.run import TIMED_OUT, run_container

DEFAULT_TIMEOUT_S = 60.0


def record(cfg: Config, ref: str, cmd: list[str], *, backend: str = "", timeout: float = DEFAULT_TIMEOUT_S
           ) -> dict[str, Any]:
    """Run the container on a cold device and return the daemon's trace of it (see manager.trace),
    with the container's exit ``status`` (124: killed at the timeout)."""
    got: dict[str, Any] = {}
    status = run_container(cfg, ref, cmd, backend, timeout=timeout, mount_options={"cold": True, "replay": False},
                           before_umount=lambda m: got.update(request(cfg, "trace", {"key": m["id"]})))
    got["status"] = status
    return got


def optimize(cfg: Config, ref: str | None, cmd: list[str], *, backend: str = "", timeout: float = DEFAULT_TIMEOUT_S,
             from_stats: str | None = None, output: str | None = None, publish: bool = True) -> dict[str, Any]:
    """Record (or take from a running device) a start trace; write it to ``output``; publish it."""
    if from_stats:
        rec = request(cfg, "trace", {"key": from_stats})
        rec["status"] = 0
    else:
        assert ref is not None
        rec = record(cfg, ref, cmd, backend=backend, timeout=timeout)
    trace = StartTrace.parse(rec["trace"].encode(), name="recorded start trace")
    out: dict[str, Any] = {k: rec.get(k) for k in ("id", "ref", "lazy", "source", "chunks", "reads", "read_bytes",
                                                    "status", "log_full")}
    out["timed_out"] = rec["status"] == TIMED_OUT
    if rec["status"] not in (0, TIMED_OUT):
        out["published"] = False
        out["summary"] = (f"the container exited with status {rec['status']}; no start trace published "
                          f"({len(trace)} chunks were read)")
        return out
    if not len(trace):
        raise FormatError(f"{rec['ref']}: the start read nothing from the lazy layers; there is no trace to publish")
    if output:
        atomic_write(os.path.abspath(output), trace.to_bytes())
        out["output"] = os.path.abspath(output)
    out["published"] = False
    if publish:
        from bdserver.images.services import NodeServices
        from bdserver.images.starttrace import publish_trace
        from bdserver.oci.reference import parse_reference

        pub = publish_trace(NodeServices.from_config(cfg), parse_reference(rec["ref"]), rec["lazy"], trace)
        out.update(pub, published=True)
    how = "killed at the timeout" if out["timed_out"] else "exited 0"
    where = out.get("destination") or out.get("output") or "not published"
    out["summary"] = (f"start trace of {rec['ref']}: {len(trace)} chunks from {rec['reads']} reads "
                      f"({rec['read_bytes']} bytes) while the container ran ({how}): {where}")
    return out
