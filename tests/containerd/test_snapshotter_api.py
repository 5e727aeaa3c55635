"""The snapshotter's gRPC API straight on its socket (as containerd's proxy calls it): the snapshot
graph, persistence across a daemon restart, and containerd's statuses for bad requests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from bdserver.runtime.containerd.api import snapshots_grpc, snapshots_pb2 as pb
from tests.node.conftest import cleanup_mounts, daemon  # noqa: F401  (fixture)

S = "bdserver"


@pytest.fixture
def api(daemon) -> Iterator[snapshots_grpc.SnapshotsStub]:  # noqa: F811
    daemon.start()
    sock = daemon.base / "run" / "containerd-snapshotter.sock"
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield snapshots_grpc.SnapshotsStub(ch)


def _status(fn, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn(request, timeout=30)
    return ei.value.code()


def _mount_tree(mounts, target: Path) -> None:
    """Mount what the snapshotter answered, as containerd's mount package would."""
    from bdserver import mounts as m

    target.mkdir(parents=True, exist_ok=True)
    for mt in mounts:
        opts = [o for o in mt.options if o not in ("rbind", "rw", "ro")]
        flags = (4096 | 16384) if mt.type == "bind" else 0  # MS_BIND | MS_REC
        m.sys_mount(mt.source, str(target), mt.type, flags, ",".join(opts) or None)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_graph_persists_across_daemon_restart(how: str, api, daemon, tmp_path: Path) -> None:  # noqa: F811
    m = api.Prepare(pb.PrepareSnapshotRequest(snapshotter=S, key="a", labels={"x": "1"})).mounts
    assert [x.type for x in m] == ["bind"]
    fs = Path(m[0].source)
    (fs / "file").write_text("layer a\n")
    api.Commit(pb.CommitSnapshotRequest(snapshotter=S, name="A", key="a"))
    m = api.Prepare(pb.PrepareSnapshotRequest(snapshotter=S, key="b", parent="A")).mounts
    assert m[0].type == "overlay" and any(o.startswith("lowerdir=") for o in m[0].options)
    target = tmp_path / "mnt"
    _mount_tree(m, target)
    try:
        assert (target / "file").read_text() == "layer a\n"
        (target / "new").write_text("in b\n")
    finally:
        cleanup_mounts(target)
    assert api.Usage(pb.UsageRequest(snapshotter=S, key="b")).size > 0
    stray = daemon.state_dir / "containerd" / "snapshots" / "999"  # as a crash between mkdir and commit leaves
    (stray / "fs").mkdir(parents=True)
    daemon.stop() if how == "stop" else daemon.kill()
    daemon.start()
    with grpc.insecure_channel(f"unix://{daemon.base / 'run' / 'containerd-snapshotter.sock'}") as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        api2 = snapshots_grpc.SnapshotsStub(ch)
        info = api2.Stat(pb.StatSnapshotRequest(snapshotter=S, key="b")).info
        assert (info.name, info.parent, info.kind) == ("b", "A", pb.ACTIVE)
        a = api2.Stat(pb.StatSnapshotRequest(snapshotter=S, key="A")).info
        assert a.kind == pb.COMMITTED and a.labels == {} and a.created_at.seconds > 0
        listed = [i.name for r in api2.List(pb.ListSnapshotsRequest(snapshotter=S)) for i in r.info]
        assert sorted(listed) == ["A", "b"]
        upd = api2.Update(pb.UpdateSnapshotRequest(
            snapshotter=S, info=pb.Info(name="A", labels={"k": "v"}), update_mask={"paths": ["labels.k"]})).info
        assert upd.labels == {"k": "v"}
        api2.Cleanup(pb.CleanupRequest(snapshotter=S))
        assert not stray.exists(), "Cleanup removes directories that no snapshot owns"
        assert api2.Mounts(pb.MountsRequest(snapshotter=S, key="b")).mounts[0].type == "overlay"
        api2.Remove(pb.RemoveSnapshotRequest(snapshotter=S, key="b"))
        api2.Remove(pb.RemoveSnapshotRequest(snapshotter=S, key="A"))
        assert list(api2.List(pb.ListSnapshotsRequest(snapshotter=S)))[0].info == []
    assert os.listdir(daemon.state_dir / "containerd" / "snapshots") == []


def test_bad_requests_get_containerds_statuses(api, daemon) -> None:  # noqa: F811
    C = grpc.StatusCode
    assert _status(api.Stat, pb.StatSnapshotRequest(snapshotter=S, key="nope")) == C.NOT_FOUND
    assert _status(api.Mounts, pb.MountsRequest(snapshotter=S, key="nope")) == C.NOT_FOUND
    assert _status(api.Remove, pb.RemoveSnapshotRequest(snapshotter=S, key="nope")) == C.NOT_FOUND
    assert _status(api.Usage, pb.UsageRequest(snapshotter=S, key="nope")) == C.NOT_FOUND
    assert _status(api.Prepare, pb.PrepareSnapshotRequest(snapshotter=S, key="k", parent="nope")) == C.NOT_FOUND
    assert _status(api.Commit, pb.CommitSnapshotRequest(snapshotter=S, name="n", key="nope")) == C.NOT_FOUND
    api.Prepare(pb.PrepareSnapshotRequest(snapshotter=S, key="k"))
    assert _status(api.Prepare, pb.PrepareSnapshotRequest(snapshotter=S, key="k")) == C.ALREADY_EXISTS
    assert _status(api.View, pb.ViewSnapshotRequest(snapshotter=S, key="v", parent="k")) == C.INVALID_ARGUMENT
    api.Commit(pb.CommitSnapshotRequest(snapshotter=S, name="K", key="k"))
    assert _status(api.Commit, pb.CommitSnapshotRequest(snapshotter=S, name="K2", key="K")) == C.FAILED_PRECONDITION
    api.Prepare(pb.PrepareSnapshotRequest(snapshotter=S, key="child", parent="K"))
    assert _status(api.Commit, pb.CommitSnapshotRequest(snapshotter=S, name="K", key="child")) == C.ALREADY_EXISTS
    assert _status(api.Remove, pb.RemoveSnapshotRequest(snapshotter=S, key="K")) == C.FAILED_PRECONDITION
    assert _status(api.Update, pb.UpdateSnapshotRequest(snapshotter=S, info=pb.Info(name="K", parent="x"),
                                                        update_mask={"paths": ["parent"]})) == C.INVALID_ARGUMENT
    # remote-snapshot labels may name registry images only: never a host path or a layout
    for bad in ("file:/etc/shadow", "oci:/var/lib/x:latest"):
        labels = {"containerd.io/snapshot.ref": "sha256:" + "a" * 64, "containerd.io/snapshot/cri.image-ref": bad,
                  "containerd.io/snapshot/cri.manifest-digest": "sha256:" + "b" * 64}
        assert _status(api.Prepare, pb.PrepareSnapshotRequest(snapshotter=S, key="r", labels=labels)) \
            == C.INVALID_ARGUMENT
    assert _status(api.Prepare, pb.PrepareSnapshotRequest(snapshotter=S, key="")) == C.INVALID_ARGUMENT
    # none of it hurt the daemon or left anything half-made
    assert daemon.json("ls") == []
    names = sorted(i.name for r in api.List(pb.ListSnapshotsRequest(snapshotter=S)) for i in r.info)
    assert names == ["K", "child"]
