"""containerd's Snapshots gRPC service on a unix socket, served from inside `bdserver serve`.

containerd reaches it as a proxy plugin (``[proxy_plugins.bdserver] type = "snapshot"``,
``address`` = the config's ``snapshotter_socket``). Every request is answered: typed errors map to
the gRPC statuses containerd's clients test for (errdefs: NotFound, AlreadyExists,
FailedPrecondition, InvalidArgument), anything unexpected to INTERNAL with one line, and the
daemon lives on.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

from bdserver.errors import (BdError, ConfigError, NotFoundError, RegistryError, SnapshotBusy, SnapshotExists,
                             SnapshotInvalid, SnapshotNotFound)

log = logging.getLogger(__name__)

LIST_BATCH = 100


def _code(exc: BaseException) -> Any:
    import grpc

    for cls, code in ((SnapshotNotFound, grpc.StatusCode.NOT_FOUND), (SnapshotExists, grpc.StatusCode.ALREADY_EXISTS),
                      (SnapshotBusy, grpc.StatusCode.FAILED_PRECONDITION),
                      (SnapshotInvalid, grpc.StatusCode.INVALID_ARGUMENT),
                      (NotFoundError, grpc.StatusCode.NOT_FOUND), (RegistryError, grpc.StatusCode.UNAVAILABLE)):
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN if isinstance(exc, BdError) else grpc.StatusCode.INTERNAL


def _servicer(sn: Any) -> Any:
    from google.protobuf import empty_pb2

    from bdserver.runtime.containerd.api import mount_pb2, snapshots_grpc, snapshots_pb2 as pb

    def info(s: Any) -> Any:
        i = pb.Info(name=s.key, parent=s.parent, kind=s.kind, labels=s.labels)
        i.created_at.FromNanoseconds(int(s.created * 1e9))
        i.updated_at.FromNanoseconds(int(s.updated * 1e9))
        return i

    def mounts(ms: list[Any]) -> list[Any]:
        return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in ms]

    def answer(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
        def handler(_self: Any, request: Any, context: Any) -> Any:
            try:
                return fn(request, context)
            except BaseException as exc:  # noqa: BLE001 - every request gets a status, the daemon survives
                code = _code(exc)
                msg = str(exc) if isinstance(exc, BdError) else f"internal error: {exc!r}"
                if code.name in ("INTERNAL", "UNKNOWN"):
                    log.exception("snapshotter: %s failed", fn.__name__)
                else:
                    log.info("snapshotter: %s: %s", fn.__name__, msg)
                context.abort(code, msg)
        handler.__name__ = fn.__name__
        return handler

    def Prepare(r: Any, _c: Any) -> Any:
        return pb.PrepareSnapshotResponse(mounts=mounts(sn.prepare(r.key, r.parent, dict(r.labels))))

    def View(r: Any, _c: Any) -> Any:
        return pb.ViewSnapshotResponse(mounts=mounts(sn.view(r.key, r.parent, dict(r.labels))))

    def Mounts(r: Any, _c: Any) -> Any:
        return pb.MountsResponse(mounts=mounts(sn.mounts(r.key)))

    def Commit(r: Any, _c: Any) -> Any:
        sn.commit(r.name, r.key, dict(r.labels))
        return empty_pb2.Empty()

    def Remove(r: Any, _c: Any) -> Any:
        sn.remove(r.key)
        return empty_pb2.Empty()

    def Stat(r: Any, _c: Any) -> Any:
        return pb.StatSnapshotResponse(info=info(sn.stat(r.key)))

    def Update(r: Any, _c: Any) -> Any:
        paths = list(r.update_mask.paths) if r.HasField("update_mask") else []
        return pb.UpdateSnapshotResponse(info=info(sn.update(r.info.name, dict(r.info.labels), paths)))

    def Usage(r: Any, _c: Any) -> Any:
        size, inodes = sn.usage(r.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    def Cleanup(_r: Any, _c: Any) -> Any:
        log.info("snapshotter: cleanup %s", sn.cleanup())
        return empty_pb2.Empty()

    def List(_r: Any, _c: Any) -> Iterator[Any]:
        # Filters are not applied: containerd re-checks every entry it walks (metadata/snapshot.go).
        infos = [info(s) for s in sn.list()]
        return iter([pb.ListSnapshotsResponse(info=infos[i:i + LIST_BATCH])
                     for i in range(0, len(infos), LIST_BATCH)] or [pb.ListSnapshotsResponse()])

    methods = {f.__name__: answer(f) for f in (Prepare, View, Mounts, Commit, Remove, Stat, Update, Usage,
                                              Cleanup, List)}
    return type("BdserverSnapshots", (snapshots_grpc.SnapshotsServicer,), methods)()


class SnapshotterService:
    """The snapshotter (its metadata under ``<state_dir>/containerd``) and its gRPC server."""

    def __init__(self, socket_path: str, state_dir: str, run_dir: str, devices: Any, resolver: Any) -> None:
        from bdserver.runtime.containerd.lowers import ImageLowers
        from bdserver.runtime.containerd.snapshotter import Snapshotter

        self.socket_path = socket_path
        lowers = ImageLowers(devices, Path(run_dir) / "containerd" / "lower")
        lowers.drop_all_views()
        self.snapshotter = Snapshotter(Path(state_dir) / "containerd", lowers, resolver)
        self._server: Any = None

    def start(self) -> None:
        import grpc

        from bdserver.runtime.containerd.api import snapshots_grpc

        os.makedirs(os.path.dirname(self.socket_path), mode=0o700, exist_ok=True)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="snapshotter"))
        snapshots_grpc.add_SnapshotsServicer_to_server(_servicer(self.snapshotter), self._server)
        # Only root (containerd) may connect. The socket is bound inside a fresh 0700 directory, made
        # 0600 and only then renamed into place: no window where others could connect, and no
        # process-wide umask change while the daemon's other threads create files.
        private = tempfile.mkdtemp(prefix=".s", dir=os.path.dirname(self.socket_path) or ".")
        bound = os.path.join(private, "s")
        try:
            if not self._server.add_insecure_port(f"unix:{bound}"):
                raise ConfigError(f"cannot listen on {self.socket_path} (a unix socket path must stay under 108 bytes)")
            self._server.start()
            os.chmod(bound, 0o600)
            os.replace(bound, self.socket_path)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        log.info("snapshotter: serving containerd's Snapshots API on %s", self.socket_path)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=5).wait(10)
            self._server = None
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass
        self.snapshotter.close()


def image_access(cfg: Any) -> tuple[Callable[[Any], Any], Callable[[], Any]]:
    """(open the store a reference lives in, the trust policy): the daemon's own, as its attach path
    uses them; the one place this package reaches into the daemon's image plumbing. Image references
    reach the snapshotter from pod specs, so pinning a digest earns no trust here (the
    `pinned_reference` rule is for the node admin's references)."""
    from bdserver.images.services import NodeServices

    services = NodeServices.from_config(cfg)
    return services.source_store, lambda: replace(services.trust, trust_pinned_reference=False)


def start_snapshotter(cfg: Any, devices: Any) -> Callable[[], None]:
    """A daemon service (see daemon.server.serve): starts in the background so that it never delays the
    control socket; a failure is logged and leaves the rest of the daemon working. Returns its stop."""
    from bdserver.runtime.containerd.remote import RemoteResolver

    holder: dict[str, SnapshotterService] = {}
    done = threading.Event()

    def run() -> None:
        try:
            resolver = RemoteResolver(*image_access(cfg))
            svc = SnapshotterService(cfg.snapshotter_socket, cfg.state_dir, cfg.run_dir, devices, resolver)
            svc.start()
            holder["svc"] = svc
        except Exception as exc:  # noqa: BLE001 - the block device service must not die with the snapshotter
            log.error("snapshotter: not started: %s", exc.user_message() if isinstance(exc, BdError) else exc)
        finally:
            done.set()

    threading.Thread(target=run, name="snapshotter-start", daemon=True).start()

    def stop() -> None:
        done.wait(30)
        svc = holder.pop("svc", None)
        if svc is not None:
            svc.stop()

    return stop
