"""The CLI commands that run in-process rather than in the daemon: `convert` and `inspect`.

They combine several packages with the node's configuration (the "converted here" trust record
lives in the state dir), so they live beside the opener rather than in convert/ or erofs/.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from bdserver.convert.image import DEFAULT_COMPRESSION, convert_image
from bdserver.convert.publish import publish
from bdserver.errors import NoLazyImageError
from bdserver.images.services import NodeServices
from bdserver.oci.layout import OCILayout
from bdserver.oci.model import parse_manifest
from bdserver.oci.reference import parse_reference
from bdserver.oci.trust import discover_lazy_image


def convert(services: NodeServices, source: str, dest: str | None, *, compress: str | None = None) -> dict[str, Any]:
    """Convert SOURCE to its lazy image; push it as a referrer of SOURCE (or to DEST). `compress`:
    how tar layers store file data (convert.image.COMPRESSIONS; None: the default)."""
    r = parse_reference(source)
    src = services.source_store(r)
    state_dir = services.cfg.state_dir
    os.makedirs(state_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="convert-", dir=state_dir) as td:
        lay = OCILayout(os.path.join(td, "layout"))
        res = convert_image(src, r.target or "latest", lay, None, tmpdir=td, compress=compress or DEFAULT_COMPRESSION)
        pub = publish(lay, res.digest, source=r, dest=dest, progress=False, registry_kw=services.registry)
    services.trust.record_converted(res.digest, res.subject.digest, source)
    return {
        "lazy": res.digest,
        "source": res.subject.digest,
        "destination": pub.destination,
        "uploaded": len(pub.uploaded),
        "device_bytes": res.device_blocks * 4096,
        "summary": f"{pub.destination} (lazy image of {source} {res.subject.digest}; "
                   f"{res.device_blocks * 4096} byte device; {len(pub.uploaded)} blobs uploaded)",
    }


def inspect(services: NodeServices, image: str) -> dict[str, Any]:
    """An EROFS image file: its superblock and tree summary; a reference: its trusted lazy image."""
    if os.path.exists(image):
        from bdserver.erofs.inspect import format_summary, inspect_path

        s = inspect_path(image)
        return {**s, "summary": format_summary(s)}
    r = parse_reference(image)
    store = services.source_store(r)
    try:
        source, lazy = discover_lazy_image(store, r, services.trust)
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
