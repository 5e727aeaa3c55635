"""What names a cache entry: a layer blob's chunks as verified by ONE chunk index.

Cached bytes are trusted bytes, so an entry must say what verified them. A lazy image names a
layer by its blob digest, but its chunks are checked against the chunk index that the same lazy
image names; anyone who can publish a trusted lazy image can pair a popular layer digest with an
index (and bytes) of their own. Keyed by the blob digest alone, their bytes would become hits for
every other image using that layer (cache poisoning). An entry is therefore named by the blob
digest AND the chunk-index digest: the index fixes every chunk's offsets and SHA-256, so what an
entry holds is exactly what that index accepts, whoever fetched it. Images that agree on both
share the entry (conversion is deterministic, so the same layer gives the same pair); any other
index gets an entry of its own and can neither read nor replace it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_DIGEST_RE = re.compile(r"^(sha256):([0-9a-f]{64})$|^(sha512):([0-9a-f]{128})$")


def split_digest(digest: str) -> tuple[str, str]:
    """`algo:hex` -> (algo, hex); refuses anything that could escape the cache directory."""
    m = _DIGEST_RE.match(digest or "")
    if not m:
        raise ValueError(f"malformed digest {digest!r}")
    return (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))


@dataclass(frozen=True)
class CacheKey:
    """A layer blob (`blob`) read through the chunk index whose payload has digest `index`."""

    blob: str
    index: str

    def __post_init__(self) -> None:
        split_digest(self.blob)
        split_digest(self.index)

    @property
    def name(self) -> str:
        """One string for pins and logs."""
        return f"{self.blob}+{self.index}"

    def relpath(self) -> str:
        """`<blob algo>/<blob hex>/<index algo>-<index hex>` below the entries directory."""
        algo, hexd = split_digest(self.blob)
        ialgo, ihex = split_digest(self.index)
        return os.path.join(algo, hexd, f"{ialgo}-{ihex}")

    @classmethod
    def from_parts(cls, algo: str, hexd: str, leaf: str) -> "CacheKey | None":
        """The key of an entry directory found on disk, or None for anything else there."""
        ialgo, _, ihex = leaf.partition("-")
        try:
            return cls(f"{algo}:{hexd}", f"{ialgo}:{ihex}")
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.blob} (index {self.index})"
