"""bdserver: one lazily fetched EROFS block device per container."""

__version__ = "0.1.0"
