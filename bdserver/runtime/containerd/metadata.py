"""The snapshotter's persistent metadata: one sqlite table of snapshots, keyed the way containerd asks.

containerd names snapshots by key (active, view) or name (committed) and links them by parent; it
reads back kind, parent, labels, timestamps and usage. Every change is one sqlite transaction
(WAL, synchronous=FULL), so a crash of the daemon or of containerd leaves either the old or the new
graph. Directories follow the rows: they are made inside the transaction that inserts the row and
removed after the one that deletes it; `orphans()` lists directories without a row (Cleanup).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

VIEW, ACTIVE, COMMITTED = 1, 2, 3  # containerd.services.snapshots.v1.Kind
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE NOT NULL,
    kind INTEGER NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    labels TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    remote TEXT NOT NULL DEFAULT '',  -- JSON RemoteLayer of a lazily committed layer, '' for a plain one
    lower_image TEXT NOT NULL DEFAULT ''  -- active/view: the image whose EROFS mount its overlay needs
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""


@dataclass(frozen=True)
class RemoteLayer:
    """A layer committed without download: the chain up to it lies in ``image``'s device."""

    image: str  # pinned reference host/repo@sha256:<manifest digest>
    layer: int  # index of the layer in the manifest (0 = bottom)
    top: bool  # the chain is the whole image: its tree is the device's EROFS tree

    def to_json(self) -> str:
        return json.dumps({"image": self.image, "layer": self.layer, "top": self.top}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RemoteLayer | None:
        if not text:
            return None
        d = json.loads(text)
        return cls(str(d["image"]), int(d["layer"]), bool(d["top"]))


@dataclass
class Snapshot:
    id: int
    key: str
    kind: int
    parent_id: int | None
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    size: int = 0
    inodes: int = 0
    remote: RemoteLayer | None = None
    lower_image: str = ""
    parent: str = ""  # the parent's key, filled in by the store


class MetadataStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[MetadataStore]:
        """One atomic change; nests (the outermost commits). Holds the store's lock throughout."""
        with self._lock:
            if self._db.in_transaction:
                yield self
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _row(self, row: tuple | None) -> Snapshot | None:
        if row is None:
            return None
        sid, key, kind, parent_id, labels, created, updated, size, inodes, remote, lower, parent = row
        return Snapshot(sid, key, kind, parent_id, json.loads(labels), created, updated, size, inodes,
                        RemoteLayer.from_json(remote), lower, parent or "")

    _SELECT = ("SELECT s.id, s.key, s.kind, s.parent_id, s.labels, s.created, s.updated, s.size, s.inodes, "
               "s.remote, s.lower_image, p.key FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id")

    def get(self, key: str) -> Snapshot | None:
        with self._lock:
            return self._row(self._db.execute(f"{self._SELECT} WHERE s.key = ?", (key,)).fetchone())

    def by_id(self, sid: int) -> Snapshot | None:
        with self._lock:
            return self._row(self._db.execute(f"{self._SELECT} WHERE s.id = ?", (sid,)).fetchone())

    def all(self) -> list[Snapshot]:
        with self._lock:
            rows = self._db.execute(f"{self._SELECT} ORDER BY s.id").fetchall()
        return [s for s in map(self._row, rows) if s is not None]

    def children(self, sid: int) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM snapshots WHERE parent_id = ?", (sid,)).fetchone()[0]

    def users_of(self, image: str) -> int:
        """Active and view snapshots whose overlay needs ``image``'s EROFS mount."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM snapshots WHERE lower_image = ?", (image,)).fetchone()[0]

    def images_in_use(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT lower_image FROM snapshots WHERE lower_image != ''").fetchall()
        return {r[0] for r in rows}

    def insert(self, key: str, kind: int, parent_id: int | None, labels: dict[str, str], *,
               remote: RemoteLayer | None = None, lower_image: str = "") -> int:
        now = time.time()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO snapshots (key, kind, parent_id, labels, created, updated, remote, lower_image) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, kind, parent_id, json.dumps(labels, sort_keys=True), now, now,
                 remote.to_json() if remote else "", lower_image))
            return int(cur.lastrowid)

    def commit(self, sid: int, name: str, labels: dict[str, str], size: int, inodes: int) -> None:
        """An active snapshot becomes committed under ``name`` (same id, same directories)."""
        with self._lock:
            self._db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated = ?, size = ?, inodes = ?, "
                "lower_image = '' WHERE id = ?",
                (name, COMMITTED, json.dumps(labels, sort_keys=True), time.time(), size, inodes, sid))

    def set_labels(self, sid: int, labels: dict[str, str]) -> None:
        with self._lock:
            self._db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                             (json.dumps(labels, sort_keys=True), time.time(), sid))

    def delete(self, sid: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))

    def ids(self) -> set[int]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM snapshots").fetchall()}
