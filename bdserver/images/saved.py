"""Small immutable blobs the node keeps by digest: lazy manifests and image configs.

A restarted daemon re-attaches its devices from these without a single registry request. They
live under ``<state_dir>/manifests`` and are verified against their digest every time they are
loaded, so a corrupt or edited file is an IntegrityError, never a different image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from bdserver.digest import parse_digest, sha256_digest, verify_bytes
from bdserver.errors import FormatError
from bdserver.fsutil import atomic_write

MAX_SAVED_BLOB = 4 << 20  # manifests and configs; distribution refuses larger manifests too


def read_small_blob(store: Any, digest: str, size: int, cap: int = MAX_SAVED_BLOB) -> bytes:
    """A whole small blob (a config) from an ImageStore, refusing more than ``cap`` bytes."""
    if size > cap:
        raise FormatError(f"blob {digest} is {size} bytes; at most {cap} are read whole")
    parts: list[bytes] = []
    n = 0
    with store.open_blob(digest, size) as f:
        while piece := f.read(1 << 16):  # to EOF: the verifying reader checks the digest there
            n += len(piece)
            if n > cap:
                raise FormatError(f"blob {digest} is larger than {cap} bytes")
            parts.append(piece)
    return verify_bytes(b"".join(parts), digest, size)


class SavedBlobs:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, digest: str) -> Path:
        alg, hexd = parse_digest(digest)
        return self.root / f"{alg}-{hexd}"

    def save(self, data: bytes) -> str:
        digest = sha256_digest(data)
        p = self._path(digest)
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(p, data)
        return digest

    def load(self, digest: str) -> bytes | None:
        try:
            data = self._path(digest).read_bytes()
        except FileNotFoundError:
            return None
        return verify_bytes(data, digest, what=f"saved blob {self._path(digest)}")

    def get(self, digest: str, fetch: Callable[[], bytes]) -> bytes:
        """The blob from disk, else ``fetch()``-ed, verified against ``digest`` and saved."""
        data = self.load(digest)
        if data is None:
            data = verify_bytes(fetch(), digest)
            self.save(data)
        return data

    def image_config(self, digest: str, fetch: Callable[[], bytes]) -> dict[str, Any]:
        """The run settings of an OCI image config, fetched and saved if not here yet."""
        return run_config(self.get(digest, fetch), digest)


def run_config(data: bytes, digest: str) -> dict[str, Any]:
    """The ``config`` object of an OCI image config (Env, Cmd, User, ...); {} when it has none."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise FormatError(f"image config {digest} is not JSON: {exc}") from None
    section = doc.get("config") if isinstance(doc, dict) else None
    return dict(section) if isinstance(section, dict) else {}
