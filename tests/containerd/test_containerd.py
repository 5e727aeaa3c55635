"""containerd with the bdserver proxy snapshotter, end to end: `bdserver pull`, `ctr run`, the snapshot
chain, clean removal, restarts of either side, a plain (non-lazy) image, and CRI's PullImage."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from bdserver import mounts
from tests.containerd.conftest import NAMESPACE, Containerd
from tests.fixtures.layers import build_oci_layout, debian_layers, small_tar_layer
from tests.fixtures.proxy import FaultProxy
from tests.fixtures.registry import start_registry
from tests.fixtures.converter import convert_cli

pytestmark = pytest.mark.slow

MARKER = b"hello from a lazily pulled containerd image\n"


def _busybox_layer(path: Path) -> Path:
    """A tiny runnable layer: Debian's static busybox as /bin/sh and /bin/cat."""
    bb = shutil.which("busybox")
    assert bb is not None, "busybox is missing: run kernel-setup/install-packages (busybox-static)"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(bb, "bin/busybox")
        for name in ("sh", "cat"):
            ti = tarfile.TarInfo(f"bin/{name}")
            ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
            tf.addfile(ti)
        for d in ("tmp", "proc", "dev", "sys", "etc"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
    return path


@dataclass
class World:
    base: Path
    registry: object
    proxy: FaultProxy
    lazy: str  # the app image's trusted lazy manifest digest
    lazy_blob_bytes: int  # all blobs of the lazy image

    def ref(self, repo: str) -> str:
        return f"{self.proxy.host}/{repo}:v1"

    def trust_toml(self) -> str:
        return f'[trust]\nallowed = ["{self.lazy}"]\n'


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("ctrd-world")
    reg = start_registry(base / "registry")
    proxy = FaultProxy(reg.url)
    try:
        top = small_tar_layer(base / "top.tar", {"marker": MARKER, "srv/app/data": os.urandom(4096) * 64})
        build_oci_layout([*debian_layers(), top], base / "layout-app")
        reg.push_layout(base / "layout-app", "latest", "app", "v1")
        res = convert_cli(base, f"{reg.host}/app:v1")
        plain = small_tar_layer(base / "plain.tar", {"marker": b"plain image\n"})
        build_oci_layout([_busybox_layer(base / "busybox.tar"), plain], base / "layout-plain")
        reg.push_layout(base / "layout-plain", "latest", "plain", "v1")
        build_oci_layout(debian_layers(), base / "layout-base")  # the app's first 3 layers, no lazy image
        reg.push_layout(base / "layout-base", "latest", "base", "v1")
        from bdserver.oci.registry import RegistryClient

        client = RegistryClient(reg.host, hosts_dirs=[], docker_config="/nonexistent")
        try:
            data, _ = client.repository("app").get_manifest(res["lazy"])
        finally:
            client.close()
        man = json.loads(data)
        total = sum(int(d["size"]) for d in man["layers"])
        yield World(base, reg, proxy, res["lazy"], total)
    finally:
        proxy.stop()
        reg.stop()


@pytest.fixture
def daemon(daemon, world: World):  # noqa: F811 - the node daemon, trusting the app's lazy image
    daemon.write_config(world.trust_toml())
    return daemon


@pytest.fixture
def ctrd(containerd: Containerd, world: World) -> Containerd:
    containerd.trust_plain_http(world.proxy.host)
    return containerd


def _snapshots(ctrd: Containerd, namespace: str = NAMESPACE) -> list[tuple[str, str, str]]:
    """(key, parent, kind) rows of `ctr snapshots --snapshotter bdserver ls`."""
    out = ctrd.ctr("snapshots", "--snapshotter", "bdserver", "ls", namespace=namespace).stdout.splitlines()[1:]
    rows = []
    for line in out:
        f = line.split()
        rows.append((f[0], f[1] if len(f) == 3 else "", f[-1]))
    return rows


def _backend_rows(daemon) -> list[tuple]:
    db = sqlite3.connect(f"file:{daemon.state_dir / 'containerd' / 'metadata.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT key, kind FROM snapshots").fetchall()
    finally:
        db.close()


def _nothing_left(daemon, ctrd: Containerd, tmp_path: Path, namespace: str = NAMESPACE) -> None:
    assert daemon.json("ls") == [], "a device is still attached"
    assert _backend_rows(daemon) == [], "snapshot metadata left behind"
    assert not [m.target for m in mounts.list_mounts() if m.target.startswith(str(tmp_path))], "mounts left"
    assert list((daemon.state_dir / "containerd" / "snapshots").iterdir()) == []
    assert ctrd.ctr("content", "ls", "-q", namespace=namespace).stdout.split() == []


def _wait_status(ctrd: Containerd, cid: str, want: str) -> None:
    for _ in range(300):  # bounded: 30 s
        for line in ctrd.ctr("tasks", "ls").stdout.splitlines()[1:]:
            f = line.split()
            if f and f[0] == cid and f[-1] == want:
                return
        time.sleep(0.1)
    raise AssertionError(f"task {cid} never became {want}: {ctrd.ctr('tasks', 'ls').stdout}")


def _remove_all(ctrd: Containerd, ref: str, *cids: str) -> None:
    for cid in cids:
        ctrd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        for _ in range(100):
            if ctrd.ctr("tasks", "delete", cid, check=False).returncode == 0 or \
                    "not found" in ctrd.ctr("tasks", "ls").stdout:
                break
            time.sleep(0.1)
        ctrd.ctr("containers", "delete", cid)
    ctrd.ctr("images", "rm", "--sync", ref)


def test_pull_then_run_is_lazy(world: World, daemon, ctrd: Containerd, tmp_path: Path) -> None:
    ref = world.ref("app")
    daemon.stop()  # `bdserver pull` starts it, and waits out containerd's redial of the snapshotter
    world.proxy.stats.reset()
    r = daemon.json("pull", ref, "--address", ctrd.address, "--namespace", NAMESPACE)
    assert r["layers"] == 4 and r["unpacked"] == 0 and r["snapshotter"] == "bdserver"
    pulled = world.proxy.stats.bytes("/blobs/")
    assert pulled < 100_000, f"pull fetched {pulled} blob bytes (layers?)"
    # A view of the top, made on the snapshotter's own socket while containerd is down (its GC
    # removes backend snapshots it does not know): the image's EROFS tree, read-only; removing it
    # detaches the device at once.
    import grpc

    from bdserver.runtime.containerd.api import snapshots_grpc, snapshots_pb2 as pb

    ctrd.stop()
    with grpc.insecure_channel(f"unix://{ctrd.snapshotter_socket}") as ch:
        api = snapshots_grpc.SnapshotsStub(ch)
        view = api.View(pb.ViewSnapshotRequest(snapshotter="bdserver", key="view1", parent=r["top_snapshot"]),
                        timeout=60).mounts
        assert [(m.type, "ro" in m.options) for m in view] == [("bind", True)], view
        assert (Path(view[0].source) / "marker").read_bytes() == MARKER
        assert [d["kind"] for d in daemon.json("ls")] == ["lazy"]
        api.Remove(pb.RemoveSnapshotRequest(snapshotter="bdserver", key="view1"), timeout=60)
    assert daemon.json("ls") == [], "the last snapshot using the device is gone: the device too"
    ctrd.start()
    p = ctrd.ctr("run", "--rm", "--snapshotter", "bdserver", ref, "lazy1", "cat", "/marker")
    assert p.stdout.encode() == MARKER
    fetched = world.proxy.stats.bytes("/blobs/")
    print(f"\ncontainerd lazy pull + run: {fetched} of {world.lazy_blob_bytes} blob bytes fetched "
          f"({100 * fetched / world.lazy_blob_bytes:.1f} %)")
    assert fetched < 0.3 * world.lazy_blob_bytes
    rows = _snapshots(ctrd)
    assert len(rows) == 4 and all(k == "Committed" for _, _, k in rows)
    by_key = {k: p for k, p, _ in rows}
    top = r["top_snapshot"]
    chain = [top]
    while by_key.get(chain[-1]):
        chain.append(by_key[chain[-1]])
    assert len(chain) == 4 and set(chain) == set(by_key), "the snapshots form one chain up to the top"
    ctrd.ctr("images", "rm", "--sync", ref)
    _nothing_left(daemon, ctrd, tmp_path)


def _task_pid(ctrd: Containerd, cid: str) -> int:
    for line in ctrd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        f = line.split()
        if f and f[0] == cid:
            return int(f[1])
    raise AssertionError(f"no task {cid}")


@pytest.mark.parametrize("restart", ["bdserver", "containerd"])
def test_restart_keeps_container_running(restart: str, world: World, daemon, ctrd: Containerd,
                                         tmp_path: Path) -> None:
    ref = world.ref("app")
    daemon.cli("pull", ref, "--address", ctrd.address, "--namespace", NAMESPACE)
    ctrd.ctr("run", "-d", "--snapshotter", "bdserver", ref, "long1", "sh", "-c",
             "cat /marker > /tmp/seen.new && mv /tmp/seen.new /tmp/seen; exec sleep 1000")
    _wait_status(ctrd, "long1", "RUNNING")
    seen: list[Path] = []
    for _ in range(600):  # bounded: 60 s for the lazy first reads of sh, cat and mv
        seen = [p for p in (daemon.state_dir / "containerd" / "snapshots").glob("*/fs/tmp/seen")]
        if seen:
            break
        time.sleep(0.1)
    assert seen and seen[0].read_bytes() == MARKER, "the container read its image (the file is in its upper dir)"
    pid = _task_pid(ctrd, "long1")
    if restart == "bdserver":
        daemon.stop()
        daemon.start()
        for _ in range(300):  # containerd redials its proxy with a backoff of up to 3 s: bounded wait, 30 s
            if ctrd.ctr("snapshots", "--snapshotter", "bdserver", "ls", check=False).returncode == 0:
                break
            time.sleep(0.1)
    else:
        ctrd.restart()
    _wait_status(ctrd, "long1", "RUNNING")
    os.kill(pid, 0)  # the same process, still there
    assert _task_pid(ctrd, "long1") == pid
    if restart == "containerd":  # its rootfs reads on, data not read before included
        p = ctrd.ctr("tasks", "exec", "--exec-id", "e1", "long1", "sh", "-c", "cat /tmp/seen; wc -c < /srv/app/data")
        assert p.stdout.encode() == MARKER + b"262144\n"
    # (after a bdserver restart the FUSE backend's old connection is gone: the running container
    # keeps running, but data it had not read yet gives EIO; ublk and TCMU devices survive restarts)
    # the snapshotter still answers from its persistent metadata, and a second container starts
    assert len(_snapshots(ctrd)) == 5  # 4 layers + the running container's active snapshot
    p = ctrd.ctr("run", "--rm", "--snapshotter", "bdserver", ref, "after1", "cat", "/marker")
    assert p.stdout.encode() == MARKER
    assert [d["kind"] for d in daemon.json("ls")] == ["lazy"], "one device for the image, shared"
    _remove_all(ctrd, ref, "long1")
    _nothing_left(daemon, ctrd, tmp_path)


def test_a_device_the_restarted_daemon_could_not_reopen_is_attached_again(world: World, daemon, ctrd: Containerd,
                                                                         tmp_path: Path) -> None:
    ref = world.ref("app")
    daemon.cli("pull", ref, "--address", ctrd.address, "--namespace", NAMESPACE)
    ctrd.ctr("containers", "create", "--snapshotter", "bdserver", ref, "made1")  # its snapshot mounts the image
    assert [d["status"] for d in daemon.json("ls")] == ["attached"]
    daemon.stop()
    shutil.rmtree(daemon.base / "cache")
    world.proxy.inject("status", status=404, count=10_000, match="/blobs/")
    try:
        daemon.start()
        assert [d["status"] for d in daemon.json("ls")] == ["error"], "the registry was gone: no device"
    finally:
        world.proxy.clear_faults()
    for _ in range(300):  # containerd redials the restarted snapshotter: bounded wait, 30 s
        if ctrd.ctr("snapshots", "--snapshotter", "bdserver", "ls", check=False).returncode == 0:
            break
        time.sleep(0.1)
    p = ctrd.ctr("run", "--rm", "--snapshotter", "bdserver", ref, "again1", "cat", "/marker")
    assert p.stdout.encode() == MARKER, "a new container never gets the empty mount point of a failed device"
    assert [d["status"] for d in daemon.json("ls")] == ["attached"]
    ctrd.ctr("containers", "delete", "made1")
    ctrd.ctr("images", "rm", "--sync", ref)
    _nothing_left(daemon, ctrd, tmp_path)


def test_image_without_lazy_image_unpacks_plainly(world: World, daemon, ctrd: Containerd, tmp_path: Path) -> None:
    ref = world.ref("plain")
    r = daemon.json("pull", ref, "--address", ctrd.address, "--namespace", NAMESPACE)  # downloads and unpacks, like containerd's pull
    assert (r["layers"], r["unpacked"]) == (2, 2)
    p = ctrd.ctr("run", "--rm", "--snapshotter", "bdserver", ref, "plain1", "cat", "/marker")
    assert p.stdout == "plain image\n"
    assert daemon.json("ls") == [], "plain layers need no device"
    assert len(_snapshots(ctrd)) == 2
    ctrd.ctr("images", "rm", "--sync", ref)
    _nothing_left(daemon, ctrd, tmp_path)
    # containerd's own pull unpacks into the same snapshotter
    ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "bdserver", ref)
    p = ctrd.ctr("run", "--rm", "--snapshotter", "bdserver", ref, "plain2", "cat", "/marker")
    assert p.stdout == "plain image\n"
    ctrd.ctr("images", "rm", "--sync", ref)
    _nothing_left(daemon, ctrd, tmp_path)


def test_image_inside_a_lazy_image_mounts_its_layers(world: World, daemon, ctrd: Containerd, tmp_path: Path) -> None:
    """`base` is the first 3 layers of `app`: pulled after app, its chain is app's lazy layers, and its
    containers see those layers only (layer views of app's device), not app's top layer."""
    app, base = world.ref("app"), world.ref("base")
    daemon.cli("pull", app, "--address", ctrd.address, "--namespace", NAMESPACE)
    r = daemon.json("pull", base, "--address", ctrd.address, "--namespace", NAMESPACE)
    assert r["unpacked"] == 0, "every layer of base was already there, lazily"
    p = ctrd.ctr("run", "--rm", "--snapshotter", "bdserver", base, "base1", "sh", "-c",
                 "cat /etc/hostname; test -e /marker || echo no-marker; test -e /srv/app || echo no-app")
    assert p.stdout.split("\n")[:3] == ["bdserver-test", "no-marker", "no-app"]
    p = ctrd.ctr("run", "--rm", "--snapshotter", "bdserver", app, "app1", "cat", "/marker")
    assert p.stdout.encode() == MARKER
    assert len(daemon.json("ls")) <= 1, "one device, app's, at most"
    ctrd.ctr("images", "rm", "--sync", base)
    ctrd.ctr("images", "rm", "--sync", app)
    _nothing_left(daemon, ctrd, tmp_path)
    assert not list((daemon.base / "run" / "containerd" / "lower").glob("*")), "layer views left behind"


def test_pinning_the_lazy_manifest_earns_no_trust(world: World, daemon) -> None:  # noqa: F811
    """A pod names images; naming the lazy manifest by digest must not make it trusted (the daemon's
    `pinned_reference` trust is for the node admin's own references)."""
    import grpc

    from bdserver.runtime.containerd.api import snapshots_grpc, snapshots_pb2 as pb
    from bdserver.runtime.containerd.remote import chain_ids

    daemon.write_config("[trust]\nallowed = []\npinned_reference = true\n")
    daemon.start()
    from bdserver.oci.registry import RegistryClient

    client = RegistryClient(world.registry.host, hosts_dirs=[], docker_config="/nonexistent")
    try:
        repo = client.repository("app")
        man = json.loads(repo.get_manifest(world.lazy)[0])
        diff_ids = json.loads(repo.read_blob(man["config"]["digest"], man["config"]["size"]))["rootfs"]["diff_ids"]
    finally:
        client.close()
    labels = {"containerd.io/snapshot.ref": chain_ids(diff_ids)[0],
              "containerd.io/snapshot/cri.image-ref": f"{world.proxy.host}/app@{world.lazy}",
              "containerd.io/snapshot/cri.manifest-digest": world.lazy,
              "containerd.io/snapshot/cri.layer-digest": man["layers"][0]["digest"]}
    with grpc.insecure_channel(f"unix://{daemon.base / 'run' / 'containerd-snapshotter.sock'}") as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        api = snapshots_grpc.SnapshotsStub(ch)
        r = api.Prepare(pb.PrepareSnapshotRequest(snapshotter="bdserver", key="pinned", labels=labels), timeout=60)
        assert r.mounts[0].type == "bind", "a plain snapshot to unpack into, not a lazy commit"
        api.Remove(pb.RemoveSnapshotRequest(snapshotter="bdserver", key="pinned"), timeout=30)


def _field(num: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    out, n = bytearray([num << 3 | 2]), len(payload)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n]) + payload


def test_cri_pull_image_is_lazy(world: World, daemon, ctrd: Containerd, tmp_path: Path) -> None:
    """CRI's ImageService.PullImage with snapshotter = "bdserver" and snapshot annotations on.

    Debian ships no CRI API protos (k8s.io/cri-api), so the two messages are encoded by hand:
    PullImageRequest{image: ImageSpec{image: REF}} and PullImageResponse{image_ref}."""
    import grpc

    ref = world.ref("app")
    world.proxy.stats.reset()
    with grpc.insecure_channel(f"unix://{ctrd.address}") as ch:
        call = ch.unary_unary("/runtime.v1.ImageService/PullImage", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        reply = call(_field(1, _field(1, ref.encode())), timeout=300)
    assert reply[:1] == b"\x0a" and b"sha256:" in reply, reply
    pulled = world.proxy.stats.bytes("/blobs/")
    print(f"\nCRI PullImage fetched {pulled} blob bytes of {world.lazy_blob_bytes}")
    assert pulled < 100_000, f"CRI pull fetched {pulled} blob bytes: layers were downloaded"
    rows = _snapshots(ctrd, "k8s.io")
    assert len(rows) == 4 and all(k == "Committed" for _, _, k in rows)
    assert daemon.json("ls") == [], "pulling attaches nothing; the first container does"
    for name in ctrd.ctr("images", "ls", "-q", namespace="k8s.io").stdout.split():
        ctrd.ctr("images", "rm", "--sync", name, namespace="k8s.io")
    _nothing_left(daemon, ctrd, tmp_path, "k8s.io")
