"""The node's shared parts, built once from the typed Config and passed down (no module singletons).

One `NodeServices` per process that opens images: the daemon builds it at start and closes it at
exit; the in-process CLI commands build their own. It owns the chunk cache (shared with other
processes on disk), the trust policy, the registry options, the saved manifests and the on-node
conversions, and turns a reference into the `ImageStore` it lives in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bdserver.cache import ChunkCache
from bdserver.config import Config
from bdserver.images.onnode import OnNodeConversions
from bdserver.images.saved import SavedBlobs
from bdserver.oci.reference import Reference
from bdserver.oci.store import ImageStore, open_store
from bdserver.oci.trust import TrustPolicy
from bdserver.vdev import FetchPools, Prefetcher


def trust_policy(cfg: Config) -> TrustPolicy:
    """The `[trust]` table as a policy (fails closed: unknown keys and wrong types are ConfigError)."""
    return TrustPolicy.from_config(cfg.trust, Path(cfg.state_dir))


def registry_options(cfg: Config) -> dict[str, Any]:
    """Keyword arguments for every RegistryClient this node makes."""
    kw: dict[str, Any] = {"fetch_deadline_s": cfg.fetch_deadline_s}
    if cfg.token_realms:
        kw["token_realms"] = cfg.token_realms
    if cfg.hosts_dir and os.path.isdir(cfg.hosts_dir):
        kw["hosts_dirs"] = [cfg.hosts_dir]
    if cfg.docker_config:
        kw["docker_config"] = cfg.docker_config
    return kw


@dataclass
class NodeServices:
    cfg: Config
    trust: TrustPolicy
    registry: dict[str, Any]
    saved: SavedBlobs
    conversions: OnNodeConversions
    _cache: ChunkCache | None = field(default=None, repr=False)
    pools: FetchPools = field(default_factory=FetchPools, repr=False)  # threads of every lazy device here

    @classmethod
    def from_config(cls, cfg: Config) -> "NodeServices":
        return cls(
            cfg=cfg,
            trust=trust_policy(cfg),
            registry=registry_options(cfg),
            saved=SavedBlobs(Path(cfg.state_dir) / "manifests"),
            conversions=OnNodeConversions(Path(cfg.state_dir) / "converted", keep_s=cfg.converted_keep_s),
        )

    @property
    def cache(self) -> ChunkCache:
        """The node chunk cache (opened on first use: `inspect` and `convert` never need it)."""
        if self._cache is None:
            self._cache = ChunkCache(self.cfg.cache_dir, cap_bytes=int(self.cfg.cache_max_bytes))
        return self._cache

    def scratch_cache(self) -> tuple[ChunkCache, Callable[[], None]]:
        """A private, empty chunk cache under the state dir and the function that removes it."""
        root = Path(self.cfg.state_dir) / "scratch"
        root.mkdir(parents=True, exist_ok=True)
        d = tempfile.mkdtemp(prefix="cache-", dir=root)
        cache = ChunkCache(d, cap_bytes=int(self.cfg.cache_max_bytes))

        def drop() -> None:
            cache.close()
            shutil.rmtree(d, ignore_errors=True)

        return cache, drop

    def prefetcher(self) -> Prefetcher:
        """Fetch-ahead for one device's misses (config: prefetch_chunks, _inflight, _run)."""
        c = self.cfg
        return Prefetcher(chunks=c.prefetch_chunks, max_inflight=c.prefetch_inflight, run=c.prefetch_run)

    def source_store(self, ref: Reference) -> ImageStore:
        """The store an image is READ from: never created by reading it."""
        return open_store(ref.store_ref(), create=False, **({} if ref.is_layout else self.registry))

    def cache_stats(self) -> dict[str, Any]:
        return self._cache.stats() if self._cache is not None else {}

    def prune_cache(self) -> dict[str, Any]:
        res = self.cache.prune()
        return {"pruned_bytes": res.freed_bytes, "dropped_blobs": res.dropped_blobs, "used_bytes": res.used_bytes}
