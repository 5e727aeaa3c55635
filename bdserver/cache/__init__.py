"""The node's chunk cache: content-addressed by blob digest, shared, persistent, bounded, crash-safe."""

from bdserver.cache.pins import Pin
from bdserver.cache.store import DEFAULT_ROOT, CacheStats, ChunkCache, PruneResult

__all__ = ["DEFAULT_ROOT", "CacheStats", "ChunkCache", "Pin", "PruneResult"]
