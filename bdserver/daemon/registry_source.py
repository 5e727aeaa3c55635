"""Registry and ``oci:`` references -> ONE device: the trusted lazy image, else converted on the node.

Lazy: tag -> source manifest -> (trust policy) lazy manifest -> `vdev.lazyimage.open_lazy_image` over
the registry's ranged reads and the node's shared chunk cache. The lazy manifest and image config
are kept in the state dir (verified by digest on reload), so that a restarted daemon re-attaches
without a single registry request when the cache holds the chunks it needs.

No trusted lazy image: the tar layers are downloaded whole and converted here
(`convert.image.convert_layers_to_device`); the result, kept under the state dir, is still ONE
device ``[meta | layer 1 | ... | layer N]``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from bdserver.digest import sha256_digest
from bdserver.daemon.config import Config
from bdserver.daemon.sources import OpenedDevice
from bdserver.errors import IntegrityError, NoLazyImageError
from bdserver.fsutil import atomic_write

log = logging.getLogger(__name__)

_caches: dict[str, Any] = {}
_caches_lock = threading.Lock()
_convert_lock = threading.Lock()


def chunk_cache(cfg: Config) -> Any:
    """One ChunkCache per cache dir in this process (it is shared with other processes on disk)."""
    from bdserver.cache import ChunkCache

    with _caches_lock:
        c = _caches.get(cfg.cache_dir)
        if c is None:
            c = _caches[cfg.cache_dir] = ChunkCache(cfg.cache_dir, cap_bytes=int(cfg.cache_max_bytes))
        return c


def trust_policy(cfg: Config) -> Any:
    from bdserver.oci.trust import TrustPolicy

    t = cfg.trust or {}
    return TrustPolicy(
        state_dir=Path(cfg.state_dir),
        allowed=set(t.get("allowed", [])),
        allow_files=[Path(p) for p in t.get("allow_files", [])],
        trust_converted_here=bool(t.get("converted_here", True)),
        trust_pinned_reference=bool(t.get("pinned_reference", True)),
    )


def registry_kw(cfg: Config) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if cfg.hosts_dir and os.path.isdir(cfg.hosts_dir):
        kw["hosts_dirs"] = [cfg.hosts_dir]
    if cfg.docker_config:
        kw["docker_config"] = cfg.docker_config
    return kw


def open_store(ref: Any, cfg: Config) -> Any:
    from bdserver.oci.store import open_store as _open

    return _open(ref, **({} if ref.is_layout else registry_kw(cfg)))


def _blob_dir(cfg: Config) -> Path:
    return Path(cfg.state_dir) / "manifests"


def _save_blob(cfg: Config, data: bytes) -> str:
    d = sha256_digest(data)
    p = _blob_dir(cfg) / d.replace(":", "-")
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, data)
    return d


def _load_blob(cfg: Config, digest: str) -> bytes | None:
    p = _blob_dir(cfg) / digest.replace(":", "-")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None
    if sha256_digest(data) != digest:
        raise IntegrityError(f"saved manifest {p} does not match its digest")
    return data


def _image_config(store: Any, config_digest: str, config_size: int, cfg: Config) -> dict[str, Any]:
    data = _load_blob(cfg, config_digest)
    if data is None:
        with store.open_blob(config_digest, config_size) as f:
            data = f.read()
        if sha256_digest(data) != config_digest:
            raise IntegrityError(f"image config {config_digest} does not match its digest")
        _save_blob(cfg, data)
    try:
        return dict(json.loads(data).get("config") or {})
    except (ValueError, AttributeError):
        return {}


class _ManifestMemo:
    """The store, remembering manifests fetched by digest (immutable content): the lazy manifest
    fetched while discovering it is not fetched a second time to open it. Everything else is
    passed through."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._memo: dict[str, tuple[bytes, Any]] = {}

    def get_manifest(self, ref: str) -> tuple[bytes, Any]:
        hit = self._memo.get(ref)
        if hit is not None:
            return hit
        data, desc = self._store.get_manifest(ref)
        digest = getattr(desc, "digest", None)
        if isinstance(digest, str) and digest.startswith("sha256:") and \
                sha256_digest(data) == digest:
            self._memo[digest] = (data, desc)
        return data, desc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def prefetcher() -> Any:
    """Fetch-ahead for a device's misses; tunable by BDSERVER_PREFETCH_CHUNKS (0: off),
    BDSERVER_PREFETCH_INFLIGHT and BDSERVER_PREFETCH_RUN (chunks per request)."""
    from bdserver.vdev.sources import Prefetcher

    def env(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            log.warning("%s=%r is not an integer; using %d", name, os.environ.get(name), default)
            return default

    return Prefetcher(chunks=env("BDSERVER_PREFETCH_CHUNKS", 12), max_inflight=env("BDSERVER_PREFETCH_INFLIGHT", 12),
                      run=env("BDSERVER_PREFETCH_RUN", 1))


def open_registry(ref: str, cfg: Config, pin: dict[str, Any] | None) -> OpenedDevice:
    from bdserver.oci.reference import parse_reference

    r = parse_reference(ref)
    if pin and pin.get("kind") == "converted-on-node":
        return _open_converted(r, cfg, pin["source"], None)
    if pin and pin.get("kind") == "lazy":
        return _open_lazy(r, cfg, pin["lazy"], pin.get("source", ""), None)
    store = _ManifestMemo(open_store(r.store_ref(), cfg))
    from bdserver.oci.trust import discover_lazy_image

    try:
        source, lazy = discover_lazy_image(store, r, trust_policy(cfg))
    except NoLazyImageError as exc:
        log.info("%s: no trusted lazy image (%s); converting on the node", ref, exc)
        from bdserver.convert.image import resolve_image_manifest

        _, src_desc = resolve_image_manifest(store, r.target or "latest")
        return _open_converted(r, cfg, src_desc.digest, store, why=str(exc))
    return _open_lazy(r, cfg, lazy.digest, source.digest, store)


def _open_lazy(r: Any, cfg: Config, lazy_digest: str, source_digest: str, store: Any) -> OpenedDevice:
    from bdserver.oci.model import parse_manifest
    from bdserver.vdev.lazyimage import open_lazy_image

    store = store or open_store(r.store_ref(), cfg)
    data = _load_blob(cfg, lazy_digest)
    if data is None:
        data, desc = store.get_manifest(lazy_digest)
        if sha256_digest(data) != lazy_digest:
            raise IntegrityError(f"lazy manifest {lazy_digest} does not match its digest")
        _save_blob(cfg, data)
    man = parse_manifest(data, "application/vnd.oci.image.manifest.v1+json")
    image_config = _image_config(store, man.config.digest, man.config.size, cfg)
    note = getattr(store, "note_size", None)
    if note is not None:  # sizes from the descriptors: no HEAD per blob before its ranged reads
        for d in man.layers:
            if d.size >= 0:
                note(d.digest, d.size)
    dev = open_lazy_image(man, store.read_range, chunk_cache(cfg), prefetch=prefetcher())
    pin = {"kind": "lazy", "lazy": lazy_digest, "source": source_digest}
    return OpenedDevice(dev, "lazy", pin, f"lazy image {lazy_digest} of {r}", dev.close, image_config)


def _open_converted(r: Any, cfg: Config, source_digest: str, store: Any, why: str = "") -> OpenedDevice:
    """Download + convert once per source manifest; the result stays under the state dir."""
    from bdserver.vdev.device import VirtualDevice

    hexd = source_digest.split(":", 1)[1]
    base = Path(cfg.state_dir) / "converted" / hexd
    done = base / "device.json"
    with _convert_lock:
        if not done.exists():
            from bdserver.convert.image import convert_layers_to_device, resolve_image_manifest

            store = store or open_store(r.store_ref(), cfg)
            tmp = base.with_name(hexd + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            local = convert_layers_to_device(store, source_digest, tmp)
            m, _ = resolve_image_manifest(store, source_digest)
            cfg_data = store.read_blob(m.config.digest, m.config.size) if hasattr(store, "read_blob") else \
                store.open_blob(m.config.digest, m.config.size).read()
            extents = [(os.path.relpath(p, tmp), off // 4096) for off, _, p in local.extents()]
            (tmp / "device.json").write_text(json.dumps({"extents": extents, "source": source_digest,
                                                         "config": _save_blob(cfg, cfg_data)}))
            shutil.rmtree(base, ignore_errors=True)
            os.replace(tmp, base)
            converted = True
        else:
            converted = False
    info = json.loads(done.read_text())
    dev = VirtualDevice.from_files([(str(base / rel), start) for rel, start in info["extents"]])
    image_config: dict[str, Any] = {}
    cdata = _load_blob(cfg, info["config"])
    if cdata:
        try:
            image_config = dict(json.loads(cdata).get("config") or {})
        except (ValueError, AttributeError):
            pass
    if converted:
        msg = f"converted on the node: no trusted lazy image for {r} ({why}); layers were downloaded whole"
    else:
        msg = f"using the on-node conversion of {r} ({source_digest})"
    pin = {"kind": "converted-on-node", "source": source_digest}
    return OpenedDevice(dev, "converted-on-node", pin, msg, dev.close, image_config)


def prune_cache(cfg: Config) -> dict[str, Any]:
    res = chunk_cache(cfg).prune()
    return {"pruned_bytes": res.freed_bytes, "dropped_blobs": res.dropped_blobs, "used_bytes": res.used_bytes}


def cache_stats(cfg: Config) -> dict[str, Any]:
    c = _caches.get(cfg.cache_dir)
    if c is None:
        return {}
    s = c.stats() if callable(getattr(c, "stats", None)) else getattr(c, "_stats", None)
    if s is None:
        return {}
    return s if isinstance(s, dict) else {k: getattr(s, k) for k in getattr(s, "__dataclass_fields__", {})}
