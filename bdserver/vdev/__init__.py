"""The virtual device: the device map and its read path (offset -> segment -> cache -> fetch)."""

from bdserver.vdev.device import BLOCK_SIZE, Segment, VirtualDevice
from bdserver.vdev.lazyblob import DEFAULT_FETCH_DEADLINE, LazyBlobSource
from bdserver.vdev.lazyimage import layout_fetcher, open_lazy_image
from bdserver.vdev.pools import FetchPools
from bdserver.vdev.prefetch import Prefetcher
from bdserver.vdev.sources import BytesSource, FileSource

__all__ = [
    "BLOCK_SIZE",
    "DEFAULT_FETCH_DEADLINE",
    "BytesSource",
    "FetchPools",
    "FileSource",
    "LazyBlobSource",
    "Prefetcher",
    "Segment",
    "VirtualDevice",
    "layout_fetcher",
    "open_lazy_image",
]
