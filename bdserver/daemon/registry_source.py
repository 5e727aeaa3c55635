"""Registry and oci: references -> device (lazy image, or converted on the node). Filled in as
oci/, vdev/ and convert/ land."""

from __future__ import annotations

from typing import Any

from bdserver.daemon.config import Config
from bdserver.daemon.sources import OpenedDevice
from bdserver.errors import BdError


def open_registry(ref: str, cfg: Config, pin: dict[str, Any] | None) -> OpenedDevice:
    raise BdError(f"cannot open {ref}: registry references are not wired in this build yet")


def prune_cache(cfg: Config) -> dict[str, Any]:
    return {"pruned_bytes": 0}
