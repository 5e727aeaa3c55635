"""Turn a reference into a device: the seam between the daemon and oci/, vdev/, convert/.

``file:PATH`` (or an absolute path to an existing file) serves a local EROFS image as a device: what
tests and air-gapped nodes use. Registry and ``oci:`` references go through lazy image discovery
under the trust policy; with no trusted lazy image the layers are converted on the node.
Everything needed to reopen the SAME bytes after a restart is returned in ``pin`` and saved in state.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from bdserver.backends.base import Device
from bdserver.daemon.config import Config
from bdserver.errors import NotFoundError

log = logging.getLogger(__name__)


@dataclass
class OpenedDevice:
    device: Device
    kind: str  # "file" | "lazy" | "converted-on-node"
    pin: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    close: Callable[[], None] | None = None
    image_config: dict[str, Any] = field(default_factory=dict)  # OCI config "config" (Env, Cmd, ...)


class FileDevice:
    """A local file as a device (positional reads are thread-safe)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


def _file_path(ref: str) -> str | None:
    if ref.startswith("file:"):
        return ref[len("file:"):]
    if ref.startswith("/") and os.path.isfile(ref):
        return ref
    return None


def open_source(ref: str, cfg: Config, pin: dict[str, Any] | None = None) -> OpenedDevice:
    """Open ``ref`` as a device. ``pin`` (from saved state) forces the exact images opened before."""
    path = _file_path(ref)
    if path is not None:
        if not os.path.isfile(path):
            raise NotFoundError(f"no such image file: {path}")
        dev = FileDevice(path)
        return OpenedDevice(dev, "file", {"path": os.path.abspath(path)}, f"local image {path}", dev.close)
    from bdserver.daemon import registry_source  # late: needs oci/, vdev/, convert/

    return registry_source.open_registry(ref, cfg, pin)
