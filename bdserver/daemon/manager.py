"""Device lifecycle: attach, mount, umount, detach, ls, stats; saved state and recovery after restart.

One device per container: every `mount` attaches its own device (owned by the mount, detached by
`umount`); `attach` makes a device the caller manages. The table lock is held only for bookkeeping;
opening a source (which may fetch or convert) runs outside it.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from bdserver import mounts
from bdserver.backends.base import BACKEND_NAMES, Attached, Backend, get_backend, pick_backend
from bdserver.config import Config
from bdserver.daemon.logs import device_event
from bdserver.daemon.metrics import Events, MeteredDevice
from bdserver.daemon.owner import Owner
from bdserver.daemon.fdstore import FdStore
from bdserver.daemon.state import DeviceRecord, MountRecord, load_state, save_state
from bdserver.errors import BadTarget, BdError, DeviceBusy, NoSuchDevice, PolicyError
from bdserver.images.opener import OpenedImage, open_image
from bdserver.images.refs import Origin
from bdserver.images.services import NodeServices

log = logging.getLogger(__name__)


@dataclass
class _Live:
    record: DeviceRecord
    opened: OpenedImage
    metered: MeteredDevice
    backend: Backend
    attached: Attached


class DeviceManager:
    def __init__(self, cfg: Config, services: NodeServices, fd_keeper: FdStore | None = None) -> None:
        self.cfg = cfg
        self.services = services
        self.fd_keeper = fd_keeper  # connections that outlive this process (FUSE)
        self.lock = threading.RLock()
        self.records: dict[str, DeviceRecord] = {}
        self.live: dict[str, _Live] = {}
        self.pending: set[str] = set()
        self.pending_targets: set[str] = set()  # mount targets claimed by a mount still attaching
        self.tearing_down: set[str] = set()  # devices an umount or detach is taking down
        self.events = Events()  # counted for the metrics endpoint

    # -- helpers -------------------------------------------------------------------------------
    def _save(self) -> None:
        save_state(self.cfg.state_file, self.records)

    def _new_id(self) -> str:
        n = 0
        while f"bd{n}" in self.records or f"bd{n}" in self.pending:
            n += 1
        return f"bd{n}"

    def _backend(self, name: str) -> Backend:
        b = pick_backend(name or self.cfg.backend)
        b.configure(run_dir=self.cfg.run_dir, fd_keeper=self.fd_keeper, read_ahead_kb=self.cfg.fuse_read_ahead_kb)
        return b

    def find(self, key: str) -> DeviceRecord:
        """A device by id, by device path, or by a mount target."""
        with self.lock:
            if key in self.records:
                return self.records[key]
            real = os.path.realpath(key) if key.startswith("/") else key
            for r in self.records.values():
                if r.path and (r.path == key or os.path.realpath(r.path) == real):
                    return r
                if any(os.path.realpath(m.target) == real for m in r.mounts):
                    return r
        raise NoSuchDevice(f"no device {key!r}")

    def _attach_record(self, rec: DeviceRecord, pin: dict[str, Any] | None, *, cold: bool = False,
                       replay: bool = True) -> tuple[_Live, OpenedImage]:
        opened = open_image(rec.ref, self.services, pin, origin=Origin(rec.origin), cold=cold, replay=replay)
        try:
            backend = self._backend(rec.backend)
            metered = MeteredDevice(opened.device)
            attached = backend.attach(metered, rec.id)
        except BaseException:
            opened.close()
            raise
        rec.backend = backend.name
        rec.path = attached.path
        rec.kind = opened.kind
        rec.pin = opened.pin
        live = _Live(rec, opened, metered, backend, attached)
        return live, opened

    # -- operations ----------------------------------------------------------------------------
    def attach(self, ref: str, backend: str = "", owned_by_mount: bool = False,
               origin: str = Origin.ADMIN.value, owner_pid: int = 0, owner_lease_s: float = 0.0,
               cold: bool = False, replay: bool = True) -> dict[str, Any]:
        """Attach ``ref``; ``origin`` "pod" when a pod author chose it (registry images only).
        ``owner_pid``: detach when that process is gone (or, with ``owner_lease_s``, has not handed
        the device over with `own` within that many seconds). ``cold``: a private, empty chunk cache;
        ``replay``: replay a trusted start trace (both for `bdserver optimize`, which records with a
        cold cache and no replay)."""
        origin = Origin(origin).value
        with self.lock:
            dev_id = self._new_id()
            self.pending.add(dev_id)
        try:
            rec = DeviceRecord(id=dev_id, ref=ref, backend=backend or self.cfg.backend, created=time.time(),
                               owned_by_mount=owned_by_mount, origin=origin,
                               owner=Owner.of(owner_pid, owner_lease_s) if owner_pid else None)
            live, opened = self._attach_record(rec, None, cold=cold, replay=replay)
            with self.lock:
                self.records[dev_id] = rec
                self.live[dev_id] = live
                self._save()
        finally:
            with self.lock:
                self.pending.discard(dev_id)
        log.info("attached %s ref=%s backend=%s path=%s kind=%s", dev_id, ref, rec.backend, rec.path, rec.kind,
                 extra=device_event("attach", rec))
        return {**self._describe(rec), "message": opened.message, "image_config": opened.image_config}

    def _claim_target(self, target: str) -> None:
        """Reserve ``target`` for one mount: checked and claimed under the lock, so two concurrent
        mounts (a slow attach in between) can never stack on one directory."""
        with self.lock:
            busy = target in self.pending_targets or any(
                os.path.realpath(m.target) == os.path.realpath(target) for r in self.records.values() for m in r.mounts)
            if busy or mounts.is_mountpoint(target):
                raise DeviceBusy(f"{target} is already a mount point")
            self.pending_targets.add(target)

    def mount(self, ref: str, target: str, backend: str = "", lower_only: bool = False,
              origin: str = Origin.ADMIN.value, owner_pid: int = 0, owner_lease_s: float = 0.0,
              cold: bool = False, replay: bool = True) -> dict[str, Any]:
        target = os.path.abspath(target)
        self._claim_target(target)
        made = False
        try:
            try:
                made = not os.path.lexists(target)
                os.makedirs(target, exist_ok=True)
            except OSError as exc:
                raise BadTarget(f"cannot create mount point {target}: {exc.strerror}") from None
            if not os.path.isdir(target) or os.path.islink(target):
                raise BadTarget(f"{target} is not a directory")
            info = self.attach(ref, backend, owned_by_mount=True, origin=origin, owner_pid=owner_pid,
                               owner_lease_s=owner_lease_s, cold=cold, replay=replay)
            dev_id = info["id"]
            rec = self.records[dev_id]
            try:
                m = self._do_mount(rec, target, lower_only)
                m.made_target = made
            except BaseException:
                self.detach(dev_id, force=True)
                raise
            with self.lock:
                rec.mounts.append(m)
                self._save()
        except BaseException:
            if made:
                _rmdir(target)
            raise
        finally:
            with self.lock:
                self.pending_targets.discard(target)
        log.info("mounted %s at %s lower_only=%s", dev_id, target, lower_only, extra=device_event("mount", rec))
        return {**self._describe(rec), "target": target, "message": info.get("message", ""),
                "image_config": info.get("image_config", {})}

    def _dirs(self, dev_id: str) -> tuple[str, str, str]:
        lower = os.path.join(self.cfg.run_dir, "mnt", dev_id, "lower")
        cdir = os.path.join(self.cfg.state_dir, "containers", dev_id)
        return lower, os.path.join(cdir, "upper"), os.path.join(cdir, "work")

    def _do_mount(self, rec: DeviceRecord, target: str, lower_only: bool) -> MountRecord:
        if lower_only:
            mounts.mount_erofs(rec.path, target)
            return MountRecord(target=target, lower=target, lower_only=True)
        lower, upper, work = self._dirs(rec.id)
        mounts.mount_erofs(rec.path, lower)
        try:
            mounts.mount_overlay(lower, upper, work, target)
        except BaseException:
            mounts.unmount(lower)
            raise
        return MountRecord(target=target, lower=lower, upper=upper, work=work)

    def _undo_mount(self, m: MountRecord) -> None:
        mounts.unmount(m.target)
        if m.made_target:
            _rmdir(m.target)
        if not m.lower_only:
            mounts.unmount(m.lower)
            for d in (m.lower, os.path.dirname(m.lower)):
                _rmdir(d)
            if m.upper:
                shutil.rmtree(os.path.dirname(m.upper), ignore_errors=True)

    @contextmanager
    def _tearing_down(self, rec: DeviceRecord, owner: str = "") -> Iterator[None]:
        """One teardown per device: an umount or detach racing another (a poststop hook and the
        owner reaper at container exit) gets NoSuchDevice instead of undoing mounts twice. With
        ``owner`` (a token from `own` or attach), only while the device is still that process's:
        a late poststop never takes down a later container's device that reuses the id or target."""
        with self.lock:
            if rec.id in self.tearing_down or self.records.get(rec.id) is not rec:
                raise NoSuchDevice(f"no device {rec.id!r} (already being detached)")
            if owner and (rec.owner is None or rec.owner.token != owner):
                raise NoSuchDevice(f"device {rec.id} no longer belongs to process {owner}")
            self.tearing_down.add(rec.id)
        try:
            yield
        finally:
            with self.lock:
                self.tearing_down.discard(rec.id)

    def umount(self, target: str, owner: str = "") -> dict[str, Any]:
        real = os.path.realpath(target)
        with self.lock:
            rec = next((r for r in self.records.values()
                        if any(os.path.realpath(m.target) == real for m in r.mounts)), None)
        if rec is None:
            raise NoSuchDevice(f"{target} is not mounted by bdserver")
        detached = False
        with self._tearing_down(rec, owner):
            m = next(m for m in rec.mounts if os.path.realpath(m.target) == real)
            self._undo_mount(m)
            with self.lock:
                rec.mounts.remove(m)
                self._save()
            if rec.owned_by_mount and not rec.mounts:
                self._detach(rec)
                detached = True
        log.info("unmounted %s (device %s%s)", target, rec.id, ", detached" if detached else "",
                 extra=device_event("umount", rec))
        return {"target": real, "id": rec.id, "detached": detached}

    def detach(self, key: str, force: bool = False, owner: str = "") -> dict[str, Any]:
        rec = self.find(key)
        if rec.mounts and not force and rec.status != "error":  # a dead device's mounts are only in the way
            raise DeviceBusy(f"device {rec.id} is mounted at {', '.join(m.target for m in rec.mounts)}")
        with self._tearing_down(rec, owner):
            return self._detach(rec)

    def _detach(self, rec: DeviceRecord) -> dict[str, Any]:
        for m in list(rec.mounts):
            try:
                self._undo_mount(m)
            except BdError as exc:
                log.warning("detach %s: unmount %s: %s", rec.id, m.target, exc)
        with self.lock:
            live = self.live.pop(rec.id, None)
            self.records.pop(rec.id, None)
        if live is not None:
            live.backend.detach(live.attached)
            live.opened.close()
        else:
            self._discard(rec)
        with self.lock:
            self._save()
        log.info("detached %s", rec.id, extra=device_event("detach", rec))
        if rec.kind == "converted-on-node":
            self.collect_conversions()
        return {"id": rec.id, "path": rec.path}

    def own(self, key: str, pid: int) -> dict[str, Any]:
        """Hand a device over to process ``pid`` (a container's init, from the hook that created it)."""
        rec = self.find(key)
        with self.lock:
            rec.owner = Owner.of(pid)
            self._save()
        log.info("device %s now lives for pid %d", rec.id, pid)
        return self._describe(rec)

    def reap(self) -> list[str]:
        """Detach the devices whose owner process is gone (or missed its hand-over deadline): a
        container create that failed where no poststop hook runs leaves nothing behind."""
        now = time.time()
        with self.lock:
            gone = [r for r in self.records.values() if r.owner is not None and r.id not in self.tearing_down]
        gone = [r for r in gone if r.owner is not None and r.owner.gone(now)]
        for rec in gone:
            log.info("detaching %s: its owner (pid %d) is gone", rec.id, rec.owner.pid if rec.owner else 0)
            try:
                with self._tearing_down(rec):  # this record, not a later device that reuses its id
                    self._detach(rec)
            except NoSuchDevice:
                pass  # a poststop hook was quicker
            except BdError as exc:
                log.warning("detaching %s for its gone owner failed: %s", rec.id, exc)
        return [r.id for r in gone]

    def _discard(self, rec: DeviceRecord) -> None:
        """The kernel device of a record nobody serves: fail its I/O (EIO) and delete it, so that
        no reader waits forever on a device whose source cannot be reopened."""
        try:
            if rec.backend in BACKEND_NAMES:
                get_backend(rec.backend).discard(rec.id)
        except Exception as exc:  # noqa: BLE001 - reported; detach retries
            log.error("discarding the kernel device of %s failed: %s", rec.id, exc)

    def _describe(self, rec: DeviceRecord) -> dict[str, Any]:
        live = self.live.get(rec.id)
        return {
            "id": rec.id,
            "ref": rec.ref,
            "backend": rec.backend,
            "path": rec.path,
            "kind": rec.kind,
            "size": live.metered.size if live else None,
            "mounts": [m.target for m in rec.mounts],
            "status": rec.status if live or rec.status == "error" else "detached",
            "error": rec.error,
            "owner": rec.owner.token if rec.owner else None,
        }

    def ls(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self._describe(r) for r in sorted(self.records.values(), key=lambda r: r.created)]

    def stats(self, key: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            recs = [self.find(key)] if key else list(self.records.values())
            out = []
            for r in recs:
                live = self.live.get(r.id)
                out.append({**self._describe(r), "stats": live.metered.stats() if live else {}})
            return out

    def trace(self, key: str) -> dict[str, Any]:
        """The start trace of a device so far: the lazy layer chunks its reads touched, first
        access first (from the device's read log), and the lazy image they belong to."""
        rec = self.find(key)
        with self.lock:
            live = self.live.get(rec.id)
        if live is None:
            raise NoSuchDevice(f"device {rec.id} is not being served; nothing was recorded")
        if rec.kind != "lazy":
            raise PolicyError(f"device {rec.id} is {rec.kind or 'not a lazy image'}: a start trace "
                              "needs a lazy image from a registry")
        log_ = live.metered.read_log
        reads = log_.reads()
        trace = live.opened.device.start_trace(reads)
        return {"id": rec.id, "ref": rec.ref, "lazy": rec.pin.get("lazy", ""), "source": rec.pin.get("source", ""),
                "trace": trace.to_bytes().decode(), "chunks": len(trace), "reads": len(reads),
                "read_bytes": sum(n for _, _, n in reads), "log_full": log_.full}

    # -- restart -------------------------------------------------------------------------------
    def recover(self) -> None:
        """Take back the devices in saved state: reopen the pinned images and re-attach under the same
        ids and paths. A device whose backend still serves it from the previous daemon (a FUSE
        connection kept in the fd store) is adopted and its mounts stay: containers keep running.
        Otherwise stale mounts are detached and redone. A device whose source cannot be reopened
        shows as ``error``, loses its mounts and is discarded: its I/O fails instead of hanging."""
        self.records = load_state(self.cfg.state_file)
        for rec in list(self.records.values()):
            keep = False
            try:
                backend = self._backend(rec.backend)
                keep = backend.adoptable(rec.id)
                if not keep:
                    self._unmount_stale(rec)
                live, _ = self._attach_record(rec, rec.pin or None)
                self.live[rec.id] = live
                self._remount(rec, keep=keep and bool(live.attached.extra.get("adopted")))
                rec.status, rec.error = "attached", ""
                log.info("recovered %s ref=%s path=%s mounts=%d%s", rec.id, rec.ref, rec.path, len(rec.mounts),
                         " (adopted: mounts kept)" if keep else "", extra=device_event("recover", rec))
                self.events.add("recovery", "ok")
            except Exception as exc:  # noqa: BLE001 - one bad device must not stop the others
                rec.status, rec.error = "error", str(exc)
                log.error("recover %s failed: %s", rec.id, exc, extra=device_event("recover_failed", rec))
                self.events.add("recovery", "failed")
                if keep:
                    self._unmount_stale(rec)
                self._discard(rec)
        for name in BACKEND_NAMES:
            b = get_backend(name)
            b.configure(run_dir=self.cfg.run_dir, fd_keeper=self.fd_keeper)
            b.end_recovery({r.id for r in self.records.values() if r.backend == name})
        if self.fd_keeper is not None:
            self.fd_keeper.close_unused()
        self._save()
        self.collect_conversions()

    def collect_conversions(self) -> None:
        """Drop on-node conversions that no device uses and that were unused for a while."""
        with self.lock:
            in_use = {r.pin["source"] for r in self.records.values()
                      if r.pin.get("kind") == "converted-on-node" and r.pin.get("source")}
        try:
            self.services.conversions.collect(in_use)
        except OSError as exc:
            log.warning("collecting on-node conversions: %s", exc)

    def _unmount_stale(self, rec: DeviceRecord) -> None:
        for m in rec.mounts:
            for t in ([m.target] if m.lower_only else [m.target, m.lower]):
                if mounts.is_mountpoint(t):
                    log.info("recover %s: detaching stale mount %s", rec.id, t)
                    try:
                        mounts.unmount(t, retries=3)
                    except BdError as exc:
                        log.warning("recover %s: %s", rec.id, exc)

    def _remount(self, rec: DeviceRecord, keep: bool) -> None:
        """Mount what is missing; with ``keep`` the mounts still on the adopted device stay."""
        for m in rec.mounts:
            if keep and all(mounts.is_mountpoint(t) for t in ([m.target] if m.lower_only else [m.target, m.lower])):
                continue
            if m.lower_only:
                mounts.mount_erofs(rec.path, m.target)
            else:
                mounts.mount_erofs(rec.path, m.lower)
                mounts.mount_overlay(m.lower, m.upper, m.work, m.target)

    def shutdown(self) -> None:
        """Stop serving (devices stay in state, to be re-attached by the next daemon). Backends stop
        first, so that no request is answered from a device being closed."""
        with self.lock:
            lives = list(self.live.values())
            self.live.clear()
            used = {id(live.backend) for live in lives}
        for name in ("fuse", "tcmu", "ublk"):
            b = get_backend(name)
            if id(b) in used:
                try:
                    b.close()
                except Exception as exc:  # noqa: BLE001
                    log.warning("backend %s close: %s", name, exc)
        for live in lives:
            try:
                live.opened.close()
            except Exception:  # noqa: BLE001
                pass


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
