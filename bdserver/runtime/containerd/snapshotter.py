"""containerd's snapshotter semantics over bdserver devices (no gRPC here: service.py maps it).

Two kinds of committed layers:

* lazy: a layer of an image with a trusted lazy image, committed on Prepare with the
  remote-snapshot labels (remote.py) without a download; the caller sees AlreadyExists. The image's
  whole chain lives in ONE device; the top layer's tree is that device's EROFS mount.
* plain: everything else, exactly like containerd's overlayfs snapshotter: containerd unpacks the
  tar layer into the active snapshot's directory and commits it.

An active or view snapshot is an overlay (or a bind mount) whose lowers are the plain layers above
the chain's first lazy layer and then that image's EROFS mount (lowers.py: attached on the first
snapshot that needs it, detached with the last). A chain whose first lazy layer is layer k < top
of its image (image B is the first k layers of an image A pulled before it) gets A's layer views
k..1 instead of A's whole tree.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bdserver.errors import SnapshotBusy, SnapshotExists, SnapshotInvalid, SnapshotNotFound
from bdserver.runtime.containerd.lowers import ImageLowers
from bdserver.runtime.containerd.metadata import ACTIVE, COMMITTED, VIEW, MetadataStore, RemoteLayer, Snapshot
from bdserver.runtime.containerd.remote import CRI_LAYER, SNAPSHOT_REF, RemoteResolver

log = logging.getLogger(__name__)

LAZY_LABEL = "containerd.io/snapshot/bdserver.lazy"  # on lazily committed layers: the image's pinned reference
MAX_LABEL_BYTES = 4096  # containerd's limit for a label's key + value


@dataclass(frozen=True)
class LowerNeed:
    """What a chain needs mounted below its plain layers: an image's tree, or its first layers."""

    image: str
    layer: int | None  # None: the whole image; k: its layers 0..k as views
    labels: tuple[tuple[str, str], ...] = ()  # the lazy layer's labels (they name the image again)


@dataclass
class Mount:
    type: str
    source: str
    options: list[str] = field(default_factory=list)


def _check_labels(labels: dict[str, str]) -> None:
    for k, v in labels.items():
        if not k or len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES:
            raise SnapshotInvalid(f"label {k[:64]!r}: empty key, or key and value longer than {MAX_LABEL_BYTES} bytes")


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes in allocated blocks, inodes) under path, hardlinks counted once (containerd's fs.DiskUsage)."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def count(p: str) -> None:
        nonlocal size
        try:
            st = os.lstat(p)
        except OSError:
            return
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512

    count(str(path))
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            count(os.path.join(dirpath, name))
    return size, len(seen)


class Snapshotter:
    def __init__(self, root: Path, lowers: ImageLowers, resolver: RemoteResolver | None) -> None:
        self.root = root
        self.snapshots_dir = root / "snapshots"
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        self.meta = MetadataStore(root / "metadata.db")
        self.lowers = lowers
        self.resolver = resolver

    def close(self) -> None:
        self.meta.close()

    # -- helpers -----------------------------------------------------------------------------------
    def _dir(self, sid: int) -> Path:
        return self.snapshots_dir / str(sid)

    def _get(self, key: str) -> Snapshot:
        if not key:
            raise SnapshotInvalid("empty snapshot key")
        s = self.meta.get(key)
        if s is None:
            raise SnapshotNotFound(f"snapshot {key} does not exist")
        return s

    def _chain_lowers(self, top: Snapshot | None) -> tuple[list[str], LowerNeed | None]:
        """Lower directories of the chain ending at ``top`` (top first) and the image mount ending it."""
        dirs: list[str] = []
        s = top
        while s is not None:
            if s.remote is not None:
                image = s.remote.image
                if s.remote.top:
                    return [*dirs, str(self.lowers.target(image))], LowerNeed(image, None)
                views = [str(self.lowers.view_target(image, k)) for k in range(s.remote.layer, -1, -1)]
                return [*dirs, *views], LowerNeed(image, s.remote.layer, tuple(sorted(s.labels.items())))
            dirs.append(str(self._dir(s.id) / "fs"))
            s = self.meta.by_id(s.parent_id) if s.parent_id is not None else None
        return dirs, None

    def _acquire(self, need: LowerNeed | None) -> None:
        if need is None:
            return
        if need.layer is None:
            self.lowers.acquire(need.image)
            return
        img = self.resolver.lookup(dict(need.labels)) if self.resolver is not None else None
        if img is None or len(img.spans) <= need.layer:
            raise SnapshotBusy(f"the chain ends at layer {need.layer + 1} inside the lazy device of {need.image}, "
                               "whose lazy image no longer says where its layers lie")
        self.lowers.acquire(need.image, img.spans[:need.layer + 1])

    def _mounts(self, s: Snapshot) -> list[Mount]:
        if s.remote is not None:
            raise SnapshotBusy(f"snapshot {s.key} is a lazily committed layer; make a view of it to read it")
        d = self._dir(s.id)
        parent = self.meta.by_id(s.parent_id) if s.parent_id is not None else None
        lowers, _ = self._chain_lowers(parent)
        if s.kind == COMMITTED:
            lowers = [str(d / "fs"), *lowers]
        if s.kind == ACTIVE:
            if not lowers:
                return [Mount("bind", str(d / "fs"), ["rbind", "rw"])]
            return [Mount("overlay", "overlay", ["index=off", f"workdir={d / 'work'}", f"upperdir={d / 'fs'}",
                                                 f"lowerdir={':'.join(lowers)}"])]
        if not lowers:
            return [Mount("bind", str(d / "fs"), ["rbind", "ro"])]
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ["rbind", "ro"])]
        return [Mount("overlay", "overlay", ["index=off", f"lowerdir={':'.join(lowers)}"])]

    # -- the API -------------------------------------------------------------------------------------
    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        target = labels.get(SNAPSHOT_REF, "")
        if target and self.resolver is not None:
            remote = self._remote_layer(key, parent, labels, target)
            if remote is not None:
                self._commit_remote(key, parent, labels, target, remote)
        return self._create(key, parent, labels, ACTIVE)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(key, parent, labels, VIEW)

    def _remote_layer(self, key: str, parent: str, labels: dict[str, str], target: str) -> RemoteLayer | None:
        assert self.resolver is not None
        img = self.resolver.lookup(labels)
        if img is None:
            return None
        if target not in img.chain:
            raise SnapshotInvalid(f"{SNAPSHOT_REF}={target} is not a layer chain of {img.image}")
        i = img.chain.index(target)
        if labels.get(CRI_LAYER) not in (None, img.layers[i]):
            raise SnapshotInvalid(f"{CRI_LAYER}={labels[CRI_LAYER]} is not layer {i + 1} of {img.image}")
        want_parent = img.chain[i - 1] if i else ""
        p = self.meta.get(parent) if parent else None
        if parent and p is None:
            raise SnapshotNotFound(f"parent snapshot {parent} does not exist")
        have = (p.labels.get(SNAPSHOT_REF, want_parent) if p else "")
        if have != want_parent:
            raise SnapshotInvalid(f"parent {parent} is chain {have or 'none'}, but layer {i + 1} of {img.image} "
                                  f"sits on {want_parent or 'nothing'}")
        return RemoteLayer(img.image, i, i == len(img.chain) - 1)

    def _commit_remote(self, key: str, parent: str, labels: dict[str, str], target: str,
                       remote: RemoteLayer) -> None:
        _check_labels(labels)
        with self.meta.transaction():
            if self.meta.get(key) is not None:
                raise SnapshotExists(f"snapshot {key} already exists")
            if self.meta.get(target) is None:
                p = self.meta.get(parent) if parent else None
                if p is not None and p.kind != COMMITTED:
                    raise SnapshotInvalid(f"parent {parent} is not a committed snapshot")
                self.meta.insert(target, COMMITTED, p.id if p else None, {**labels, LAZY_LABEL: remote.image},
                                 remote=remote)
                log.info("snapshotter: committed %s lazily (layer %d of %s)", target, remote.layer + 1, remote.image)
        raise SnapshotExists(f"target snapshot {target} was committed from the lazy image of {remote.image}")

    def _create(self, key: str, parent: str, labels: dict[str, str], kind: int) -> list[Mount]:
        if not key:
            raise SnapshotInvalid("empty snapshot key")
        _check_labels(labels)
        with self.meta.transaction():
            if self.meta.get(key) is not None:
                raise SnapshotExists(f"snapshot {key} already exists")
            p = self._get(parent) if parent else None
            if p is not None and p.kind != COMMITTED:
                raise SnapshotInvalid(f"parent {parent} is not a committed snapshot")
            _, need = self._chain_lowers(p)
            image = need.image if need else ""
            sid = self.meta.insert(key, kind, p.id if p else None, labels, lower_image=image)
            d = self._dir(sid)
            shutil.rmtree(d, ignore_errors=True)  # a directory left by a crash before its row committed
            (d / "fs").mkdir(parents=True)
            (d / "work").mkdir()
        if need:
            try:
                self._acquire(need)
            except BaseException:
                self.remove(key)
                raise
        s = self.meta.by_id(sid)
        assert s is not None
        return self._mounts(s)

    def mounts(self, key: str) -> list[Mount]:
        s = self._get(key)
        if s.lower_image and s.parent_id is not None:  # e.g. after a reboot lost the mount
            self._acquire(self._chain_lowers(self.meta.by_id(s.parent_id))[1])
        return self._mounts(s)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        if not name:
            raise SnapshotInvalid("empty snapshot name")
        _check_labels(labels)
        with self.meta.transaction():
            s = self._get(key)
            if s.kind != ACTIVE:
                raise SnapshotBusy(f"snapshot {key} is not active")
            if self.meta.get(name) is not None:
                raise SnapshotExists(f"snapshot {name} already exists")
            size, inodes = disk_usage(self._dir(s.id) / "fs")
            self.meta.commit(s.id, name, labels, size, inodes)
        self._release(s.lower_image)

    def remove(self, key: str) -> None:
        with self.meta.transaction():
            s = self._get(key)
            if self.meta.children(s.id):
                raise SnapshotBusy(f"cannot remove snapshot {key}: it has children")
            self.meta.delete(s.id)
        shutil.rmtree(self._dir(s.id), ignore_errors=True)
        self._release(s.lower_image)

    def _release(self, image: str) -> None:
        if image and self.meta.users_of(image) == 0:
            self.lowers.release(image)

    def stat(self, key: str) -> Snapshot:
        return self._get(key)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """containerd's field mask: none or "labels" replaces all labels; "labels.K" sets or drops K."""
        _check_labels(labels)
        with self.meta.transaction():
            s = self._get(key)
            new = dict(s.labels)
            if not paths or "labels" in paths:
                new = dict(labels)
            for p in paths:
                if p == "labels":
                    continue
                if not p.startswith("labels."):
                    raise SnapshotInvalid(f"cannot update field {p!r} of snapshot {key} (only labels are mutable)")
                k = p[len("labels."):]
                if k in labels:
                    new[k] = labels[k]
                else:
                    new.pop(k, None)
            self.meta.set_labels(s.id, new)
            out = self.meta.by_id(s.id)
        assert out is not None
        return out

    def usage(self, key: str) -> tuple[int, int]:
        s = self._get(key)
        if s.kind == COMMITTED:
            return s.size, s.inodes
        return disk_usage(self._dir(s.id) / "fs")

    def list(self) -> list[Snapshot]:
        return self.meta.all()

    def cleanup(self) -> dict[str, int]:
        """Directories without a row (a crash mid-change) and image mounts no snapshot needs."""
        ids = self.meta.ids()
        removed = 0
        for d in self.snapshots_dir.iterdir():
            if not d.name.isdigit() or int(d.name) not in ids:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        dropped = self.lowers.release_unused(self.meta.images_in_use())
        return {"directories": removed, "image_mounts": len(dropped)}
