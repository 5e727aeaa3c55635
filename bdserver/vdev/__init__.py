"""The virtual device: the device map and its read path (offset -> segment -> cache -> fetch)."""

from bdserver.vdev.device import BLOCK_SIZE, Segment, VirtualDevice
from bdserver.vdev.lazyimage import layout_fetcher, open_lazy_image
from bdserver.vdev.sources import BytesSource, FileSource, LazyBlobSource, Prefetcher

__all__ = [
    "BLOCK_SIZE",
    "BytesSource",
    "FileSource",
    "LazyBlobSource",
    "Prefetcher",
    "Segment",
    "VirtualDevice",
    "layout_fetcher",
    "open_lazy_image",
]
