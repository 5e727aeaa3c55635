"""`open_image`: one reference -> one opened device, under the node's policy.

Four kinds, decided here and nowhere else:

* ``file:PATH`` (node admin only): a local EROFS image; refused unless it starts with an EROFS
  superblock, so `bdserver mount file:/etc/passwd` fails before anything is attached.
* a registry or ``oci:`` reference with a trusted lazy image: served lazily (lazy.py).
* an EROFS-native image (no lazy image needed) whose layers have chunk indexes: served lazily,
  its merged metadata built here (native.py).
* otherwise converted on the node (onnode.py; EROFS-native layers are fetched whole, tar layers
  converted), still ONE device.

`Origin.POD` marks references a pod author chose (a runtime annotation, a snapshotter label):
those may only name a registry image, and pinning a digest does not make a lazy image trusted.
Everything needed to reopen the SAME bytes after a restart is returned in ``pin``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from bdserver.convert.image import resolve_image_manifest
from bdserver.convert.isolated import convert_isolated
from bdserver.erofs.reader import ErofsImage
from bdserver.errors import FormatError, NoLazyImageError, NotFoundError
from bdserver.images.lazy import ManifestMemo, open_lazy
from bdserver.images.native import load_native, open_native
from bdserver.images.refs import Origin, check_reference
from bdserver.images.saved import read_small_blob, run_config
from bdserver.images.services import NodeServices
from bdserver.oci.reference import Reference
from bdserver.oci.trust import discover_lazy_image
from bdserver.vdev.device import VirtualDevice

log = logging.getLogger(__name__)


@dataclass
class OpenedImage:
    device: VirtualDevice
    kind: str  # "file" | "lazy" | "native" | "converted-on-node"
    pin: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    image_config: dict[str, Any] = field(default_factory=dict)  # OCI config "config" (Env, Cmd, ...)
    cleanup: list[Callable[[], None]] = field(default_factory=list)  # after the device is closed

    def close(self) -> None:
        try:
            self.device.close()
        finally:
            for fn in self.cleanup:
                fn()


def open_image(ref: str, services: NodeServices, pin: dict[str, Any] | None = None, *,
               origin: Origin = Origin.ADMIN, cold: bool = False, replay: bool = True) -> OpenedImage:
    """Open ``ref`` as a device. ``pin`` (from saved state) forces the exact images opened before.
    A lazy image replays its trusted start trace unless ``replay`` is off; ``cold`` gives it a
    private, empty chunk cache (lazy.open_lazy)."""
    target = check_reference(ref, origin)
    if isinstance(target, str):
        return _open_file(target)
    r = target
    if pin and pin.get("kind") == "converted-on-node":
        return _open_converted(r, services, pin["source"], lambda: services.source_store(r))
    if pin and pin.get("kind") == "lazy":
        return _finish_lazy(r, services, None, pin["lazy"], pin.get("source", ""), cold=cold)
    if pin and pin.get("kind") == "native":
        image = load_native(services, pin["source"], lambda: services.source_store(r))
        if image is None:
            raise FormatError(f"{r}: {pin['source']} is not an EROFS-native image")
        return _open_native(r, services, image, lambda: services.source_store(r))
    store = ManifestMemo(services.source_store(r))
    policy = services.trust
    if origin is Origin.POD:  # a pod author pinning a digest proves nothing about its origin
        policy = dataclasses.replace(policy, trust_pinned_reference=False)
    try:
        source, lazy = discover_lazy_image(store, r, policy)
    except NoLazyImageError as exc:
        _, src_desc = resolve_image_manifest(store, r.target or "latest")
        image = load_native(services, src_desc.digest, lambda: store)
        if image is not None and image.lazy:
            return _open_native(r, services, image, lambda: store)
        why = str(exc) if image is None else f"EROFS-native image {src_desc.digest} without chunk indexes"
        log.info("%s: %s; converting on the node", ref, why)
        return _open_converted(r, services, src_desc.digest, lambda: store, why=why)
    return _finish_lazy(r, services, store, lazy.digest, source.digest, cold=cold, replay=replay)


def _open_native(r: Reference, services: NodeServices, image: Any, store: Callable[[], Any]) -> OpenedImage:
    """The lazy device of an EROFS-native image whose layers have chunk indexes."""
    dev = open_native(services, image, store)
    digest = image.digest
    return OpenedImage(dev, "native", {"kind": "native", "source": digest},
                       f"EROFS-native image {digest} of {r}: merged metadata built on the node, layers read lazily",
                       image.image_config)


def _open_file(path: str) -> OpenedImage:
    if not os.path.isfile(path):
        raise NotFoundError(f"no such image file: {path}")
    dev = VirtualDevice.from_files([path])
    try:
        if dev.size < 4096:
            raise FormatError(f"{path} is not an EROFS image (only {dev.size} bytes)")
        ErofsImage(lambda off, n: dev.read(off, min(n, dev.size - off)))  # superblock and checksum
    except FormatError as exc:
        dev.close()
        raise FormatError(f"{path}: {exc}") from None
    except BaseException:
        dev.close()
        raise
    return OpenedImage(dev, "file", {"path": os.path.abspath(path)}, f"local image {path}")


def _finish_lazy(r: Reference, services: NodeServices, store: Any, lazy_digest: str,
                 source_digest: str, *, cold: bool = False, replay: bool = True) -> OpenedImage:
    opened = open_lazy(services, store, lazy_digest, lambda: services.source_store(r), cold=cold, replay=replay)
    pin = {"kind": "lazy", "lazy": lazy_digest, "source": source_digest}
    msg = f"lazy image {lazy_digest} of {r}" + (f"; {opened.trace_note}" if opened.trace_note else "")
    return OpenedImage(opened.device, "lazy", pin, msg, opened.image_config, opened.cleanup)


def _open_converted(r: Reference, services: NodeServices, source_digest: str,
                    store: Callable[[], Any], why: str = "") -> OpenedImage:
    """Download + convert once per source manifest; the result stays under the state dir."""

    def convert(workdir: Any) -> tuple[Any, str]:
        # untrusted tars are parsed in a child under memory, file-size and CPU limits: a bomb fails
        # this attach, never the daemon and its other devices
        local = convert_isolated(str(r.store_ref()), source_digest, workdir,
                                 registry_kw={} if r.is_layout else services.registry)
        st = store()
        m, _ = resolve_image_manifest(st, source_digest)
        config = read_small_blob(st, m.config.digest, m.config.size)
        return local, services.saved.save(config)

    conv, converted = services.conversions.get_or_convert(source_digest, convert)
    data = services.saved.load(conv.config_digest)
    image_config = run_config(data, conv.config_digest) if data is not None else {}
    dev = conv.open_device()
    if converted and why.startswith("EROFS-native"):
        msg = f"{why}: layers were downloaded whole, merged metadata built on the node"
    elif converted:
        msg = f"converted on the node: no trusted lazy image for {r} ({why}); layers were downloaded whole"
    else:
        msg = f"using the on-node conversion of {r} ({source_digest})"
    pin = {"kind": "converted-on-node", "source": source_digest}
    return OpenedImage(dev, "converted-on-node", pin, msg, image_config)
