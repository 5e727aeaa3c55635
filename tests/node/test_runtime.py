"""`bdserver run` with the real runc, and the OCI hook driven by runc itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pytest

from bdserver import mounts
from bdserver.daemon.protocol import call
from bdserver.errors import DeviceBusy, PolicyError
from tests.fixtures.layers import build_oci_layout
from tests.fixtures.proxy import FaultProxy
from tests.fixtures.registry import start_registry
from tests.node.conftest import REPO, mkfs_erofs

if shutil.which("runc") is None:  # installed by `make setup`: a missing one is a setup bug, not a skip
    pytest.fail("runc is missing: run kernel-setup/install-packages", pytrace=False)


@pytest.fixture
def busybox_image(tmp_path: Path) -> Path:
    bb = shutil.which("busybox")
    assert bb is not None, "busybox is missing: run kernel-setup/install-packages (busybox-static)"
    src = tmp_path / "bbsrc"
    (src / "bin").mkdir(parents=True)
    (src / "etc").mkdir()
    shutil.copy(bb, src / "bin" / "busybox")
    for c in ("sh", "cat", "echo", "ls", "id"):
        os.symlink("busybox", src / "bin" / c)
    (src / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    (src / "marker").write_text("from the lazy image\n")
    return mkfs_erofs(tmp_path / "bb.erofs", src)


def _busybox_layer(path: Path, etc_link: str | None = None) -> Path:
    """busybox + sh/cat/echo/ls/id links + /marker; /etc a directory, or a symlink to ``etc_link``."""
    bb = shutil.which("busybox")
    assert bb is not None, "busybox is missing: run kernel-setup/install-packages (busybox-static)"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("bin",) + (() if etc_link else ("etc",)):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        tf.add(bb, "bin/busybox")
        for c in ("sh", "cat", "echo", "ls", "id", "test"):
            ti = tarfile.TarInfo(f"bin/{c}")
            ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
            tf.addfile(ti)
        body = b"from the lazy image\n"
        ti = tarfile.TarInfo("marker")
        ti.size = len(body)
        tf.addfile(ti, __import__("io").BytesIO(body))
        if etc_link:
            ti = tarfile.TarInfo("etc")
            ti.type, ti.linkname = tarfile.SYMTYPE, etc_link
            tf.addfile(ti)
    return path


@dataclass
class BusyboxRegistry:
    host: str
    url: str
    victim: Path  # an existing host dir the hostile image's /etc points at; must stay empty

    def ref(self, name: str) -> str:
        return f"{self.host}/{name}:v1"


@pytest.fixture(scope="module")
def bb_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BusyboxRegistry]:
    """A real registry with `plain` (busybox) and `evil` (the same, with /etc -> a host path)."""
    base = tmp_path_factory.mktemp("bbreg")
    victim = Path(f"/tmp/bdserver-victim-{os.getpid()}")
    victim.mkdir()
    reg = start_registry(base / "registry")
    try:
        for name, link in (("plain", None), ("evil", str(victim))):
            layer = _busybox_layer(base / f"{name}.tar", link)
            reg.push_layout(build_oci_layout([layer], base / f"layout-{name}"), "latest", name, "v1")
        yield BusyboxRegistry(reg.host, reg.url, victim)
    finally:
        reg.stop()
        shutil.rmtree(victim, ignore_errors=True)


def test_run_executes_in_the_image(daemon, busybox_image: Path) -> None:
    p = daemon.cli("run", f"file:{busybox_image}", "--", "/bin/sh", "-c",
                   "cat /marker; echo written > /new; cat /new; id -u; ls /proc/self >/dev/null && echo proc")
    assert p.stdout.split("\n")[:4] == ["from the lazy image", "written", "0", "proc"]
    assert daemon.json("ls") == []  # everything cleaned up
    assert not [m for m in mounts.list_mounts() if m.target.startswith(str(daemon.base))]
    p = daemon.cli("run", f"file:{busybox_image}", "--", "/bin/sh", "-c", "exit 3", check=False)
    assert p.returncode == 3


def test_what_a_container_prints_never_changes_how_it_runs(daemon, busybox_image: Path) -> None:
    """An image that prints runc's cgroup-failure words and fails is not run again outside runc."""
    p = daemon.cli("run", f"file:{busybox_image}", "--", "/bin/sh", "-c",
                   "echo pid=$$; echo 'container_linux.go:380: starting container process caused: "
                   "cgroup: operation not permitted' >&2; exit 1", check=False)
    assert p.returncode == 1
    assert p.stdout == "pid=1\n"  # once, and as PID 1 of its own namespace: never rerun as host root
    assert "chroot" not in p.stderr
    assert daemon.json("ls") == []


def test_unsafe_chroot_is_explicit_and_says_what_it_gives_up(daemon, busybox_image: Path) -> None:
    p = daemon.cli("run", "--unsafe-chroot", f"file:{busybox_image}", "--", "/bin/sh", "-c", "echo pid=$$")
    assert p.stdout.startswith("pid=") and p.stdout != "pid=1\n"  # no PID namespace: it says so
    assert "no namespaces" in p.stderr and "host root" in p.stderr


def _runc_bundle(daemon, bundle: Path, ref: str, args: list[str], mounts_: list[dict] | None = None) -> dict:
    (bundle / "rootfs").mkdir(parents=True)  # empty: the hook supplies the image
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"].update(terminal=False, args=args)
    cfg["root"]["readonly"] = False
    cfg["annotations"] = {"org.bdserver.image": ref}
    cfg["mounts"] += mounts_ or []
    env = [f"BDSERVER_CONFIG={daemon.env['BDSERVER_CONFIG']}", f"PYTHONPATH={REPO}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    hook = {"path": sys.executable, "args": [sys.executable, "-m", "bdserver.cli", "hook"], "env": env, "timeout": 120}
    cfg["hooks"] = {"createRuntime": [hook], "poststop": [hook]}
    (bundle / "config.json").write_text(json.dumps(cfg))
    return cfg


def _runc_run(bundle: Path, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["runc", "--root", str(root), "run", "--bundle", str(bundle), f"hk-{os.getpid()}"],
                          capture_output=True, text=True, timeout=300)


def test_hook_mounts_lazy_rootfs_for_runc(daemon, bb_registry: BusyboxRegistry, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    _runc_bundle(daemon, bundle, bb_registry.ref("plain"), ["/bin/sh", "-c", "cat /marker; echo w > /w; cat /w; ls /dev/null"])
    p = _runc_run(bundle, tmp_path / "runc-root")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:3] == ["from the lazy image", "w", "/dev/null"]
    assert daemon.json("ls") == []  # poststop detached the device
    assert not (bundle / ".bdserver-hook.json").exists()
    assert list((bundle / "rootfs").iterdir()) == [] or all(c.is_dir() for c in (bundle / "rootfs").iterdir())


def test_hook_never_follows_an_image_symlink_onto_the_host(daemon, bb_registry: BusyboxRegistry, tmp_path: Path) -> None:
    """The image's /etc is a symlink to a host path; runc's /etc/hosts bind is moved into the image."""
    hosts = tmp_path / "hosts"
    hosts.write_text("10.0.0.1 from-the-runtime\n")
    bundle = tmp_path / "bundle"
    bind = {"destination": "/etc/hosts", "type": "bind", "source": str(hosts), "options": ["rbind", "ro"]}
    _runc_bundle(daemon, bundle, bb_registry.ref("evil"), ["/bin/sh", "-c", "cat /etc/hosts"], [bind])
    p = _runc_run(bundle, tmp_path / "runc-root")
    assert list(bb_registry.victim.iterdir()) == [], "the hook created a host file through an image symlink"
    assert p.returncode == 0, p.stderr
    assert p.stdout == "10.0.0.1 from-the-runtime\n"  # the container sees the bind, inside its own tree
    assert daemon.json("ls") == []


@pytest.mark.parametrize("ref", ["file:/etc/passwd", "/etc/passwd", "oci:/var/lib/anything:v1", "file:{image}"])
def test_an_annotation_may_only_name_a_registry_image(daemon, busybox_image: Path, tmp_path: Path, ref: str) -> None:
    ref = ref.format(image=busybox_image)
    state = {"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": os.getpid(), "bundle": str(tmp_path),
             "annotations": {"org.bdserver.image": ref}}
    (tmp_path / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}}))
    p = daemon.cli("hook", input=json.dumps(state), check=False)
    assert p.returncode == PolicyError.exit_code and "registry image" in p.stderr, p.stderr
    config = {"root": {"path": str(tmp_path / "orig")}, "annotations": {"org.bdserver.image": ref}}
    p = daemon.cli("hook", "precreate", input=json.dumps(config), check=False)
    assert p.returncode == PolicyError.exit_code
    # the daemon checks too: a hook or client that forgot to still gets the refusal
    daemon.cli("attach", f"file:{busybox_image}")  # the admin may
    with pytest.raises(PolicyError):
        call(str(daemon.socket), "attach", {"ref": ref, "origin": "pod"})
    assert len(daemon.json("ls")) == 1
    assert not (tmp_path / "orig").exists() and not os.path.exists("/var/lib/anything")


def test_concurrent_starts_never_stack_mounts(daemon, bb_registry: BusyboxRegistry, tmp_path: Path) -> None:
    """Two mounts on one target while attach is slow (a 0.3 s registry): one wins, one is refused;
    so do two podman precreates on one --rootfs directory."""
    with FaultProxy(bb_registry.url) as proxy:
        proxy.latency = 0.3
        ref = f"{proxy.host}/plain:v1"
        daemon.cli("ls", check=False)  # no daemon yet
        daemon.start()
        target = tmp_path / "t"
        with ThreadPoolExecutor(2) as ex:
            runs = list(ex.map(lambda _: daemon.cli("mount", ref, str(target), check=False), range(2)))
        assert sorted(p.returncode for p in runs) == [0, DeviceBusy.exit_code], [p.stderr for p in runs]
        assert len([m for m in mounts.list_mounts() if m.target == str(target)]) == 1
        daemon.cli("umount", str(target))
        root = tmp_path / "orig"
        config = {"root": {"path": str(root)}, "annotations": {"org.bdserver.image": ref}}
        with ThreadPoolExecutor(2) as ex:
            outs = list(ex.map(lambda _: daemon.cli("hook", "precreate", input=json.dumps(config), check=False),
                               range(2)))
        assert sorted(p.returncode for p in outs) == [0, DeviceBusy.exit_code], [p.stderr for p in outs]
        assert len([m for m in mounts.list_mounts() if m.target == str(root)]) == 1
        assert len(daemon.json("ls")) == 1
        daemon.cli("umount", str(root))
