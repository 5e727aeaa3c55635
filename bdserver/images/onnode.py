"""On-node conversion: an image with no trusted lazy image is downloaded whole and converted here.

The result is still ONE device ``[meta | layer 1 | ... | layer N]``, kept as local files under
``<state_dir>/converted/<hex of the source manifest digest>/`` with a ``device.json`` that says
where each file sits in the device. Conversions are locked per source (an image that is already
converted opens while another one converts) and collected when unused for ``keep_s`` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from bdserver.convert.image import LocalDevice
from bdserver.digest import parse_digest
from bdserver.errors import FormatError
from bdserver.vdev.device import BLOCK_SIZE, VirtualDevice

log = logging.getLogger(__name__)

RECORD = "device.json"


@dataclass(frozen=True)
class Conversion:
    """A finished on-node conversion: where its files are and the image config's digest."""

    source: str  # source manifest digest
    root: Path
    extents: list[tuple[str, int]]  # (file relative to root, start block)
    config_digest: str

    def open_device(self) -> VirtualDevice:
        return VirtualDevice.from_files([(str(self.root / rel), start) for rel, start in self.extents])


class OnNodeConversions:
    def __init__(self, root: Path, *, keep_s: float) -> None:
        self.root = root
        self.keep_s = keep_s
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self.counts: dict[str, int] = {"ok": 0, "failed": 0}  # conversions by outcome (metrics)

    def _lock(self, source: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(source, threading.Lock())

    def _dir(self, source: str) -> Path:
        _, hexd = parse_digest(source)
        return self.root / hexd

    def find(self, source: str) -> Conversion | None:
        """The finished conversion of ``source`` (its use time refreshed), or None."""
        base = self._dir(source)
        try:
            info = json.loads((base / RECORD).read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise FormatError(f"on-node conversion record {base / RECORD} is corrupt: {exc}") from None
        os.utime(base / RECORD)
        extents = [(str(rel), int(start)) for rel, start in info["extents"]]
        for rel, _ in extents:  # the record is ours, but never let it name a file outside its dir
            if os.path.isabs(rel) or ".." in Path(rel).parts:
                raise FormatError(f"on-node conversion record {base / RECORD} names {rel!r}")
        return Conversion(source, base, extents, info["config"])

    def get_or_convert(self, source: str, convert: Callable[[Path], tuple[LocalDevice, str]]) -> tuple[Conversion, bool]:
        """The conversion of ``source``; ``convert(workdir) -> (device, config digest)`` runs at most
        once at a time per source. Returns (conversion, True if it was converted by this call)."""
        with self._lock(source):
            done = self.find(source)
            if done is not None:
                return done, False
            base = self._dir(source)
            tmp = base.with_name(base.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                local, config_digest = convert(tmp)
                extents = [(os.path.relpath(p, tmp), off // BLOCK_SIZE) for off, _, p in local.extents()]
                (tmp / RECORD).write_text(json.dumps({"extents": extents, "source": source, "config": config_digest}))
                shutil.rmtree(base, ignore_errors=True)
                os.replace(tmp, base)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                self._count("failed")
                raise
            found = self.find(source)
            assert found is not None
            self._count("ok")
            return found, True

    def _count(self, outcome: str) -> None:
        with self._locks_lock:
            self.counts[outcome] += 1

    def collect(self, in_use: Iterable[str], now: float | None = None) -> list[str]:
        """Remove conversions not in ``in_use`` (source digests) and unused for ``keep_s`` seconds,
        and leftovers of interrupted ones. Returns the removed source hex digests."""
        now = time.time() if now is None else now
        keep = {parse_digest(s)[1] for s in in_use}
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        for d in sorted(self.root.iterdir()):
            name = d.name.removesuffix(".tmp")
            if name in keep:
                continue
            lock = self._lock(f"sha256:{name}")
            if not lock.acquire(blocking=False):
                continue  # being converted right now
            try:
                try:
                    used = 0.0 if d.name.endswith(".tmp") else (d / RECORD).stat().st_mtime
                except FileNotFoundError:
                    used = 0.0
                if now - used < self.keep_s:
                    continue
                shutil.rmtree(d, ignore_errors=True)
                removed.append(name)
                log.info("removed the unused on-node conversion %s", name)
            finally:
                lock.release()
        return removed
