"""One EROFS mount per image, shared by every container of that image: the overlay lower.

Mounted through the daemon's DeviceManager (``mount(ref, target, lower_only=True)`` attaches ONE
device for the image and mounts its EROFS tree; ``umount(target)`` detaches it), so the trust
policy, the cache and restart recovery are the daemon's. Whether an image is mounted is read back
from the manager's ``ls()``, which survives restarts, so this module keeps no state of its own.

A chain that ends inside an image (another image is the first k layers of this one) needs the
first k layers alone: each is a complete EROFS image at its own offset of the same device, mounted
read-only as a *layer view* (EROFS ``fsoffset``) beside the image mount; overlayfs stacks them. The
views go with the image mount.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol, Sequence

from bdserver import mounts

log = logging.getLogger(__name__)

BLOCK = 4096


class Devices(Protocol):
    """The part of daemon.manager.DeviceManager the snapshotter uses."""

    def mount(self, ref: str, target: str, backend: str = "", lower_only: bool = False,
              origin: str = "admin") -> dict[str, Any]: ...
    def umount(self, target: str) -> dict[str, Any]: ...
    def ls(self) -> list[dict[str, Any]]: ...


class ImageLowers:
    def __init__(self, devices: Devices, root: Path) -> None:
        self.devices = devices
        self.root = root
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    def target(self, image: str) -> Path:
        return self.root / hashlib.sha256(image.encode()).hexdigest()[:32]

    def view_target(self, image: str, layer: int) -> Path:
        t = self.target(image)
        return t.with_name(f"{t.name}.layer{layer}")

    def _drop_views(self, image_target: Path) -> None:
        for v in sorted(self.root.glob(f"{image_target.name}.layer*")):
            mounts.unmount(str(v))
            try:
                os.rmdir(v)
            except OSError:
                pass

    def drop_all_views(self) -> None:
        """At start: views made by a previous daemon may sit on a dead connection; they are remade on use."""
        if self.root.is_dir():
            for v in self.root.glob("*.layer*"):
                try:
                    mounts.sys_umount(str(v), mounts.MNT_DETACH)
                except OSError:
                    pass
                try:
                    os.rmdir(v)
                except OSError:
                    pass

    def _lock(self, image: str) -> threading.Lock:
        with self._guard:
            return self._locks[image]

    def mounted(self) -> dict[str, dict[str, Any]]:
        """target -> the device (as ``ls`` describes it) of the image mounts under root."""
        out = {}
        prefix = str(self.root) + os.sep
        for dev in self.devices.ls():
            for t in dev.get("mounts", []):
                if t.startswith(prefix):
                    out[t] = dev
        return out

    def acquire(self, image: str, views: Sequence[tuple[int, int]] = ()) -> str:
        """The image's EROFS mount point, attaching and mounting the device on first use; ``views``
        (first block, blocks) of layers 0..k also get their layer views."""
        target = str(self.target(image))
        with self._lock(image):
            dev = self.mounted().get(target)
            if dev is not None and (dev.get("status") != "attached" or not mounts.is_mountpoint(target)):
                # e.g. a restarted daemon could not reopen it: never hand out the empty directory
                log.warning("snapshotter: %s: device %s is %s; attaching it again", image, dev.get("id"),
                            dev.get("status"))
                self._drop_views(Path(target))
                self.devices.umount(target)
                dev = None
            if dev is None:
                self.root.mkdir(parents=True, exist_ok=True)
                r = self.devices.mount(image, target, lower_only=True, origin="pod")
                log.info("snapshotter: %s mounted at %s (device %s, %s)", image, target, r.get("id"), r.get("kind"))
                dev = self.mounted()[target]
            for k, (start, blocks) in enumerate(views):
                v = str(self.view_target(image, k))
                if not mounts.is_mountpoint(v):
                    mounts.mount_erofs(dev["path"], v, offset=start * BLOCK, size=blocks * BLOCK)
                    log.info("snapshotter: layer %d of %s mounted at %s", k + 1, image, v)
        return target

    def release(self, image: str) -> None:
        target = str(self.target(image))
        with self._lock(image):
            self._drop_views(Path(target))
            if target in self.mounted():
                self.devices.umount(target)
                log.info("snapshotter: %s unmounted and detached", image)
            try:
                os.rmdir(target)
            except OSError:
                pass

    def release_unused(self, in_use: set[str]) -> list[str]:
        """Unmount image mounts that no snapshot needs (after a crash between remove and release)."""
        keep = {str(self.target(i)) for i in in_use}
        dropped = []
        for target in self.mounted():
            if target not in keep:
                self._drop_views(Path(target))
                self.devices.umount(target)
                dropped.append(target)
                try:
                    os.rmdir(target)
                except OSError:
                    pass
        return dropped
