"""Copy an image (index, manifests, blobs) between ImageStores, digests preserved.

skopeo re-compresses layers unless told not to, which breaks ``subject`` links; this copies bytes
as they are (manifests never re-serialised), so referrers stay valid. Used for tests, the demo
and for moving sources and lazy images between layouts and registries.
"""

from __future__ import annotations

import base64
import io
import logging

from bdserver.errors import FormatError
from bdserver.oci.model import Descriptor, Index, Manifest, parse_manifest
from bdserver.oci.store import ImageStore

log = logging.getLogger(__name__)

MAX_DEPTH = 4  # index -> manifest (-> nested index) is all the spec uses


def copy_image(src: ImageStore, dst: ImageStore, ref: str, dst_tag: str | None = None, *,
               mount_from: str | None = None, _depth: int = 0) -> Descriptor:
    """Copy ``ref`` (tag or digest in ``src``) and everything it references to ``dst``.

    ``dst_tag`` tags the top manifest; children go by digest. ``mount_from`` names a repository
    on the destination registry to mount blobs from. Returns the top descriptor (same digest).
    """
    if _depth > MAX_DEPTH:
        raise FormatError(f"{ref}: manifests nested more than {MAX_DEPTH} deep")
    data, desc = src.get_manifest(ref)
    parsed = parse_manifest(data, desc.media_type)
    if isinstance(parsed, Index):
        for child in parsed.manifests:
            copy_image(src, dst, child.digest, None, mount_from=mount_from, _depth=_depth + 1)
    else:
        assert isinstance(parsed, Manifest)
        for b in [parsed.config, *parsed.layers]:
            if b.urls:
                continue  # foreign layers stay where they are
            if dst.has_blob(b.digest):
                continue
            if b.data is not None and b.size <= 64:
                dst.put_blob(io.BytesIO(base64.b64decode(b.data)), b.digest, b.size)
                continue
            with src.open_blob(b.digest, b.size) as f:
                put = dst.put_blob
                if mount_from is not None and hasattr(dst, "mount_blob"):
                    put(f, b.digest, b.size, mount_from=mount_from)  # type: ignore[call-arg]
                else:
                    put(f, b.digest, b.size)
    out = dst.put_manifest(data, desc.media_type, tag=dst_tag)
    log.debug("copied %s (%s)", desc.digest, desc.media_type)
    return Descriptor(media_type=desc.media_type, digest=out.digest, size=out.size,
                      artifact_type=out.artifact_type)
