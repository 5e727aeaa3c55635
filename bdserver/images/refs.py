"""Which references a caller may name: the node admin anything, a pod author registry images only.

Light on purpose (the CLI checks a reference here before it talks to the daemon).
"""

from __future__ import annotations

import enum
import os

from bdserver.errors import BadReference, BdError, PolicyError
from bdserver.oci.reference import Reference, parse_reference


class Origin(str, enum.Enum):
    ADMIN = "admin"  # the CLI or config of the node admin (root)
    POD = "pod"  # a pod author: runtime annotations, snapshotter labels


def file_path(ref: str) -> str | None:
    """The path of a ``file:`` reference (or of an absolute path to an existing file), else None."""
    if ref.startswith("file:"):
        return ref[len("file:"):]
    if ref.startswith("/") and os.path.isfile(ref):
        return ref
    return None


def check_reference(ref: str, origin: Origin) -> Reference | str:
    """Parse ``ref`` and apply the origin's rules; a ``file:`` path comes back as a str."""
    if origin is Origin.POD and ref.startswith(("file:", "oci:", "/", ".")):
        raise PolicyError(f"{ref!r}: a pod may only name a registry image, not a path on the node")
    path = file_path(ref)
    if path is not None:
        return path
    try:
        r = parse_reference(ref)
    except BdError as exc:
        raise BadReference(str(exc)) from None
    if origin is Origin.POD and r.is_layout:
        raise PolicyError(f"{ref!r}: a pod may only name a registry image, not a path on the node")
    return r
