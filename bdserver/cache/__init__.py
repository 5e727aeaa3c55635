"""The node's chunk cache: entries bound to the chunk index that verified them, shared,
persistent, bounded, crash-safe."""

from bdserver.cache.keys import CacheKey
from bdserver.cache.pins import Pin
from bdserver.cache.store import DEFAULT_ROOT, CacheStats, ChunkCache, PruneResult

__all__ = ["DEFAULT_ROOT", "CacheKey", "CacheStats", "ChunkCache", "Pin", "PruneResult"]
