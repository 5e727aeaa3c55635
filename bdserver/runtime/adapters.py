"""Thin glue for the CLI commands that run in-process: `convert` and `inspect`.

Kept here (not in convert/ or erofs/) because they combine several packages with the node's
config: the trust record of "converted here" lives in the daemon's state dir.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from bdserver.daemon.config import Config


def convert(cfg: Config, source: str, dest: str | None) -> dict[str, Any]:
    """Convert SOURCE to its lazy image; push it as a referrer of SOURCE (or to DEST)."""
    from bdserver.convert.image import convert_image
    from bdserver.convert.publish import publish
    from bdserver.daemon.registry_source import open_store, registry_kw, trust_policy
    from bdserver.oci.layout import OCILayout
    from bdserver.oci.reference import parse_reference

    r = parse_reference(source)
    src = open_store(r.store_ref(), cfg)
    os.makedirs(cfg.state_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="convert-", dir=cfg.state_dir) as td:
        lay = OCILayout(os.path.join(td, "layout"))
        res = convert_image(src, r.target or "latest", lay, None, tmpdir=td)
        pub = publish(lay, res.digest, source=r, dest=dest, progress=False, registry_kw=registry_kw(cfg))
    trust_policy(cfg).record_converted(res.digest, res.subject.digest, source)
    return {
        "lazy": res.digest,
        "source": res.subject.digest,
        "destination": pub.destination,
        "uploaded": len(pub.uploaded),
        "device_bytes": res.device_blocks * 4096,
        "summary": f"{pub.destination} (lazy image of {source} {res.subject.digest}; "
                   f"{res.device_blocks * 4096} byte device; {len(pub.uploaded)} blobs uploaded)",
    }


def inspect_image(cfg: Config, image: str) -> dict[str, Any]:
    """An EROFS image file: its superblock and tree summary; a reference: its trusted lazy image."""
    if os.path.exists(image):
        from bdserver.erofs.inspect import format_summary, inspect_path

        s = inspect_path(image)
        return {**s, "summary": format_summary(s)}
    from bdserver.daemon.registry_source import open_store, trust_policy
    from bdserver.errors import NoLazyImageError
    from bdserver.oci.model import parse_manifest
    from bdserver.oci.reference import parse_reference
    from bdserver.oci.trust import discover_lazy_image

    r = parse_reference(image)
    store = open_store(r.store_ref(), cfg)
    try:
        source, lazy = discover_lazy_image(store, r, trust_policy(cfg))
    except NoLazyImageError as exc:
        return {"reference": str(r), "lazy": None, "summary": f"{r}: {exc}"}
    data, _ = store.get_manifest(lazy.digest)
    m = parse_manifest(data, lazy.media_type)
    layers = [{"digest": d.digest, "size": d.size, "media_type": d.media_type,
               "annotations": dict(d.annotations or {})} for d in m.layers]
    lines = [f"{r}: source {source.digest}", f"  lazy image {lazy.digest} ({len(layers)} layers)"]
    for d in layers:
        lines.append(f"    {d['digest'][:19]}  {d['size']:>12}  {d['media_type']}")
    return {"reference": str(r), "source": source.digest, "lazy": lazy.digest, "layers": layers,
            "summary": "\n".join(lines)}
