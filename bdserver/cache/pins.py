"""Pins: what eviction must not touch, visible to every process on the node.

A pin is a small JSON file under `<root>/pins/` naming its owner (pid + process start time, so a
reused pid does not keep a dead owner's pins alive) and what it holds: a whole blob (its digest)
or a chunk entry (`CacheKey.name`), and for an entry either all of it or a list of chunk indexes.
Pins of dead owners are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from itertools import count
from typing import Iterable

_counter = count()
_counter_lock = threading.Lock()


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # field 22 (starttime); the command name (field 2) may contain spaces, so split after ')'
    rest = stat[stat.rindex(b")") + 2 :].split()
    return rest[19].decode() if len(rest) > 19 else None


@dataclass(frozen=True)
class PinRecord:
    digest: str  # a whole blob's digest or a chunk entry's CacheKey.name
    chunks: frozenset[int] | None  # None: all of it
    pid: int = field(default_factory=os.getpid)
    start: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "digest": self.digest,
                "chunks": None if self.chunks is None else sorted(self.chunks),
                "pid": self.pid,
                "start": self.start if self.start is not None else _start_time(self.pid),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "PinRecord":
        d = json.loads(text)
        chunks = d.get("chunks")
        return cls(str(d["digest"]), None if chunks is None else frozenset(int(c) for c in chunks), int(d["pid"]), d.get("start"))

    def owner_alive(self) -> bool:
        if self.pid == os.getpid():
            return True
        st = _start_time(self.pid)
        return st is not None and (self.start is None or st == self.start)


class Pin:
    """A held pin; `release()` (or leaving the `with` block) removes it. Idempotent."""

    def __init__(self, pins_dir: str, record: PinRecord) -> None:
        with _counter_lock:
            n = next(_counter)
        self.record = record
        self.path = os.path.join(pins_dir, f"{record.pid}.{threading.get_ident()}.{n}.json")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(record.to_json())
        os.rename(tmp, self.path)

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "Pin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class PinSet:
    """All live pins, folded per digest: None = whole blob pinned, else the pinned chunks."""

    by_digest: dict[str, set[int] | None] = field(default_factory=dict)

    def add(self, rec: PinRecord) -> None:
        if rec.chunks is None or self.by_digest.get(rec.digest, set()) is None:
            self.by_digest[rec.digest] = None
        else:
            cur = self.by_digest.setdefault(rec.digest, set())
            assert cur is not None
            cur.update(rec.chunks)

    def whole(self, digest: str) -> bool:
        return digest in self.by_digest and self.by_digest[digest] is None

    def chunk(self, digest: str, i: int) -> bool:
        if digest not in self.by_digest:
            return False
        s = self.by_digest[digest]
        return s is None or i in s


def load_pins(pins_dir: str, *, cleanup: bool = True) -> PinSet:
    ps = PinSet()
    try:
        names = os.listdir(pins_dir)
    except FileNotFoundError:
        return ps
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(pins_dir, name)
        try:
            with open(path) as f:
                rec = PinRecord.from_json(f.read())
        except (OSError, ValueError, KeyError, TypeError):
            continue  # vanished or half-written: a racing release/creation
        if rec.owner_alive():
            ps.add(rec)
        elif cleanup:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    return ps


def make_record(digest: str, chunks: Iterable[int] | None) -> PinRecord:
    return PinRecord(digest, None if chunks is None else frozenset(chunks), os.getpid(), _start_time(os.getpid()))
