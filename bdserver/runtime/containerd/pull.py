"""`bdserver pull REF`: containerd's image record for REF with nothing downloaded but manifest and config.

What `ctr-remote image rpull` does for stargz, through containerd's own gRPC API (no Go client):
under a lease, the index (if any), the platform's manifest and its config go into containerd's
content store with the GC labels its own pull writes; each layer is prepared on the `bdserver`
snapshotter with the remote-snapshot labels (`containerd.io/snapshot.ref` = chain ID and the
`containerd.io/snapshot/cri.*` labels), which the snapshotter answers with ALREADY_EXISTS after
committing the layer lazily; the config is labelled with the top snapshot (so containerd's GC
keeps the chain while the image exists); then the image record points at the manifest. Layer
blobs never enter the content store: `ctr run --snapshotter bdserver REF` needs only the chain.

A layer the snapshotter does not commit lazily (no trusted lazy image) gets a plain active
snapshot instead, and `bdserver pull` unpacks it the way containerd's own pull does: the blob into
the content store, containerd's Diff service applies it onto the snapshot's mounts, the result
must match the config's diff ID, then Commit under the chain ID.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from bdserver.digest import sha256_digest
from bdserver.errors import BadReference, ContainerdError, FormatError, IntegrityError
from bdserver.runtime.containerd.remote import (CRI_IMAGE_LAYERS, CRI_IMAGE_REF, CRI_LAYER, CRI_MANIFEST,
                                                SNAPSHOT_REF, chain_ids)

log = logging.getLogger(__name__)

SNAPSHOTTER = "bdserver"
LEASE_TTL = dt.timedelta(hours=1)
UNAVAILABLE_WAIT_S = 10.0
LABEL_MAX = 4096


WRITE_CHUNK = 1 << 20


@dataclass
class PullResult:
    name: str
    manifest: str
    chain: list[str]
    layers: int
    unpacked: int  # layers downloaded and unpacked (no trusted lazy image)

    def to_json(self) -> dict[str, Any]:
        return {"image": self.name, "manifest": self.manifest, "top_snapshot": self.chain[-1] if self.chain else "",
                "layers": self.layers, "unpacked": self.unpacked, "snapshotter": SNAPSHOTTER}


@dataclass
class _Image:
    top: tuple[bytes, Any] | None  # the index the tag names, if any
    manifest: tuple[bytes, Any]
    config: bytes
    layers: list[Any]  # layer descriptors, bottom first
    diff_ids: list[str]
    chain: list[str]


def _fetch_image(store: Any, ref: Any) -> _Image:
    from bdserver.oci.model import Index, parse_manifest

    data, desc = store.get_manifest(ref.target or "latest")
    top = None
    m = parse_manifest(data, desc.media_type)
    if isinstance(m, Index):
        top = (data, desc)
        pick = m.select_platform()
        data, desc = store.get_manifest(pick.digest)
        m = parse_manifest(data, desc.media_type)
        if isinstance(m, Index):
            raise FormatError(f"{ref}: an index inside an index is not supported")
    if sha256_digest(data) != desc.digest:
        raise IntegrityError(f"{ref}: manifest does not match its digest {desc.digest}")
    with store.open_blob(m.config.digest, m.config.size) as f:
        config = f.read()
    if sha256_digest(config) != m.config.digest:
        raise IntegrityError(f"{ref}: image config does not match its digest {m.config.digest}")
    try:
        diff_ids = list(json.loads(config)["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{ref}: image config has no rootfs.diff_ids ({exc})") from None
    if len(diff_ids) != len(m.layers):
        raise FormatError(f"{ref}: {len(m.layers)} layers but {len(diff_ids)} diff IDs")
    return _Image(top, (data, desc), config, list(m.layers), diff_ids, chain_ids(diff_ids))


def _layers_label(layers: list[str]) -> str:
    """As containerd's CRI plugin writes it: this layer and the ones above, as many as fit in a label."""
    out = ""
    for d in layers:
        item = d if not out else "," + d
        if len(CRI_IMAGE_LAYERS) + len(out) + len(item) > LABEL_MAX:
            break
        out += item
    return out


class _Containerd:
    """The few containerd services `pull` uses, with the namespace (and lease) on every call."""

    def __init__(self, address: str, namespace: str) -> None:
        import grpc

        from bdserver.runtime.containerd import api

        self.grpc, self.api = grpc, api
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.address = address
        self.meta: list[tuple[str, str]] = [("containerd-namespace", namespace)]
        self.content = api.content_grpc.ContentStub(self.channel)
        self.images = api.images_grpc.ImagesStub(self.channel)
        self.leases = api.leases_grpc.LeasesStub(self.channel)
        self.snapshots = api.snapshots_grpc.SnapshotsStub(self.channel)
        self.diff = api.diff_grpc.DiffStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(self, what: str, fn: Any, request: Any, *, ok: tuple[str, ...] = ()) -> Any:
        """One unary call; statuses in ``ok`` come back as their code name, others raise ContainerdError.
        UNAVAILABLE is retried for a while: containerd redials a restarted snapshotter with a backoff."""
        deadline = time.monotonic() + UNAVAILABLE_WAIT_S
        while True:
            try:
                return fn(request, metadata=self.meta, timeout=120)
            except self.grpc.RpcError as exc:
                code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
                if code in ok:
                    return code
                detail = exc.details() if hasattr(exc, "details") else str(exc)
                if code == "UNAVAILABLE" and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                if code == "UNAVAILABLE":
                    raise ContainerdError(f"containerd at {self.address}, or its bdserver snapshotter, is not "
                                          f"reachable ({detail})") from None
                raise ContainerdError(f"containerd refused {what}: {code}: {detail}") from None

    def put_content(self, data: bytes, labels: dict[str, str]) -> str:
        digest = sha256_digest(data)
        pb = self.api.content_pb2
        req = pb.WriteContentRequest(action=pb.COMMIT, ref=f"bdserver-pull-{digest}", total=len(data),
                                     expected=digest, data=data, labels=labels)
        return self._write(iter([req]), digest, labels)

    def put_stream(self, f: Any, digest: str, size: int, labels: dict[str, str]) -> str:
        """A blob streamed in chunks; containerd checks size and digest at the commit."""
        pb = self.api.content_pb2

        def requests() -> Any:
            offset = 0
            while chunk := f.read(WRITE_CHUNK):
                yield pb.WriteContentRequest(action=pb.WRITE, ref=f"bdserver-pull-{digest}", total=size,
                                             expected=digest, offset=offset, data=chunk)
                offset += len(chunk)
            yield pb.WriteContentRequest(action=pb.COMMIT, ref=f"bdserver-pull-{digest}", total=size,
                                         expected=digest, offset=offset, labels=labels)

        return self._write(requests(), digest, labels)

    def _write(self, requests: Any, digest: str, labels: dict[str, str]) -> str:
        pb = self.api.content_pb2
        try:
            for _ in self.content.Write(requests, metadata=self.meta, timeout=3600):
                pass
        except self.grpc.RpcError as exc:
            if exc.code() != self.grpc.StatusCode.ALREADY_EXISTS:
                raise ContainerdError(f"containerd refused content {digest}: {exc.code().name}: {exc.details()}") \
                    from None
            if labels:
                from google.protobuf import field_mask_pb2

                info = pb.Info(digest=digest, labels=labels)
                mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
                self.call(f"labels of {digest}", self.content.Update, pb.UpdateRequest(info=info, update_mask=mask))
        return digest


def pull(cfg: Any, ref_text: str, address: str, namespace: str) -> PullResult:
    from bdserver.oci.reference import parse_reference
    from bdserver.runtime.containerd.service import image_access

    ref = parse_reference(ref_text) if not ref_text.startswith(("file:", "/")) else None
    if ref is None or ref.is_layout:
        exc = BadReference(f"{ref_text}: `bdserver pull` takes registry references (containerd pulls from registries)")
        exc.hint = "write HOST[:PORT]/REPO[:TAG|@DIGEST]"
        raise exc
    open_store, _ = image_access(cfg)
    store = open_store(ref.store_ref())
    img = _fetch_image(store, ref)
    man_data, man_desc = img.manifest
    ctd = _Containerd(address, namespace)
    api = ctd.api
    lease = f"bdserver-pull-{uuid.uuid4().hex[:16]}"
    expire = (dt.datetime.now(dt.timezone.utc) + LEASE_TTL).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        ctd.call("a lease", ctd.leases.Create,
                 api.leases_pb2.CreateRequest(id=lease, labels={"containerd.io/gc.expire": expire}))
        ctd.meta.append(("containerd-lease", lease))
        unpacked = _prepare_layers(ctd, store, ref_text, man_desc.digest, img)
        chain_top = img.chain[-1] if img.chain else ""
        cfg_labels = {f"containerd.io/gc.ref.snapshot.{SNAPSHOTTER}": chain_top} if chain_top else {}
        config_digest = ctd.put_content(img.config, cfg_labels)
        man_labels = {"containerd.io/gc.ref.content.config": config_digest}
        man_labels.update({f"containerd.io/gc.ref.content.l.{i}": d.digest for i, d in enumerate(img.layers)})
        ctd.put_content(man_data, man_labels)
        target = man_desc
        if img.top is not None:
            top_data, target = img.top
            ctd.put_content(top_data, {"containerd.io/gc.ref.content.m.0": man_desc.digest})
        _record_image(ctd, str(ref), target)
    finally:
        try:
            if len(ctd.meta) > 1:
                ctd.meta.pop()
                ctd.call("lease removal", ctd.leases.Delete, api.leases_pb2.DeleteRequest(id=lease), ok=("NOT_FOUND",))
        finally:
            ctd.close()
    return PullResult(str(ref), man_desc.digest, img.chain, len(img.layers), unpacked)


def _prepare_layers(ctd: _Containerd, store: Any, ref_text: str, manifest: str, img: _Image) -> int:
    """Each layer lazily if the snapshotter can, else unpacked; returns how many were unpacked."""
    pb = ctd.api.snapshots_pb2
    digests = [d.digest for d in img.layers]
    unpacked = 0
    for i, (layer, chain) in enumerate(zip(img.layers, img.chain)):
        if ctd.call("stat", ctd.snapshots.Stat, pb.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key=chain),
                    ok=("NOT_FOUND",)) != "NOT_FOUND":
            continue  # already there (another image, an earlier pull)
        labels = {SNAPSHOT_REF: chain, CRI_IMAGE_REF: ref_text, CRI_MANIFEST: manifest, CRI_LAYER: layer.digest,
                  CRI_IMAGE_LAYERS: _layers_label(digests[i:])}
        key = f"extract-{uuid.uuid4().hex[:12]} {chain}"
        r = ctd.call(f"the snapshot of layer {i + 1}", ctd.snapshots.Prepare,
                     pb.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key=key,
                                               parent=img.chain[i - 1] if i else "", labels=labels),
                     ok=("ALREADY_EXISTS",))
        if r == "ALREADY_EXISTS":
            continue  # committed lazily
        try:
            _unpack(ctd, store, layer, img.diff_ids[i], list(r.mounts))
            ctd.call(f"the commit of layer {i + 1}", ctd.snapshots.Commit,
                     pb.CommitSnapshotRequest(snapshotter=SNAPSHOTTER, name=chain, key=key,
                                              labels={SNAPSHOT_REF: chain}),
                     ok=("ALREADY_EXISTS",))
        except BaseException:
            ctd.call("removal of an unfinished snapshot", ctd.snapshots.Remove,
                     pb.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=key), ok=("NOT_FOUND",))
            raise
        unpacked += 1
    if unpacked:
        log.info("%s: %d of %d layers had no trusted lazy image and were unpacked", ref_text, unpacked,
                 len(img.layers))
    return unpacked


def _unpack(ctd: _Containerd, store: Any, layer: Any, diff_id: str, mounts: list[Any]) -> None:
    """What containerd's unpacker does for one layer: blob into content, Diff.Apply onto the mounts."""
    api = ctd.api
    with store.open_blob(layer.digest, layer.size) as f:
        ctd.put_stream(f, layer.digest, layer.size, {"containerd.io/uncompressed": diff_id})
    desc = api.descriptor_pb2.Descriptor(media_type=layer.media_type, digest=layer.digest, size=layer.size)
    applied = ctd.call(f"unpacking layer {layer.digest}", ctd.diff.Apply, api.diff_pb2.ApplyRequest(diff=desc,
                                                                                                   mounts=mounts))
    if applied.applied.digest != diff_id:
        raise IntegrityError(f"layer {layer.digest} unpacked to {applied.applied.digest}, "
                             f"but the image config says {diff_id}")


def _record_image(ctd: _Containerd, name: str, target: Any) -> None:
    api = ctd.api
    desc = api.descriptor_pb2.Descriptor(media_type=target.media_type, digest=target.digest, size=target.size)
    image = api.images_pb2.Image(name=name, target=desc)
    r = ctd.call(f"image {name}", ctd.images.Create, api.images_pb2.CreateImageRequest(image=image),
                 ok=("ALREADY_EXISTS",))
    if r == "ALREADY_EXISTS":
        from google.protobuf import field_mask_pb2

        ctd.call(f"image {name}", ctd.images.Update,
                 api.images_pb2.UpdateImageRequest(image=image, update_mask=field_mask_pb2.FieldMask(paths=["target"])))
