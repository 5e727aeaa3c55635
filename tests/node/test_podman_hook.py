"""The podman hook stages, called the way podman 4.3 calls them, against a real registry and daemon.

podman itself runs containers only in the lab (tests/lab/test_podman.py). Here each stage gets what
podman and runc hand it: precreate the proposed config on stdin (its parent process is podman),
createRuntime runc's state (``pid`` = the container's init, here a ``sleep``), poststop podman's
state after cleanup. That tests, where it is cheap, that a hook device lives exactly as long as
the process that owns it, whichever stage never comes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from bdserver import mounts
from bdserver.runtime.bundle import DEFAULT_PATH
from tests.fixtures.appimage import RUN_CONFIG, push_app_image, wait_for
from tests.fixtures.registry import start_registry
from tests.node.conftest import BDSERVER, REPO

ANN = "org.bdserver.image"


@pytest.fixture(scope="module")
def app_ref(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("app")
    reg = start_registry(base / "registry")
    try:
        yield push_app_image(reg, base)
    finally:
        reg.stop()


def podman_config(root: Path, ref: str, args: list[str], **process: object) -> dict:
    """What podman proposes for ``podman run --rootfs ROOT --annotation org.bdserver.image=REF ARGS``."""
    proc = {"args": args, "env": [DEFAULT_PATH, "TERM=xterm", "HOSTNAME=c0ffee"], "cwd": "/",
            "user": {"uid": 0, "gid": 0, "umask": 18}, **process}
    return {"ociVersion": "1.0.2-dev", "process": proc, "root": {"path": str(root)},
            "annotations": {"io.container.manager": "libpod", ANN: ref}}


def precreate(daemon, config: dict, *, parent_exits: bool = False) -> dict:  # type: ignore[no-untyped-def]
    """The precreate stage; ``parent_exits``: run from a shell that exits right after it (podman dying)."""
    if not parent_exits:
        return json.loads(daemon.cli("hook", "precreate", input=json.dumps(config)).stdout)
    hook = " ".join(BDSERVER + ["hook", "precreate"])
    p = subprocess.run(["sh", "-c", f"{hook}; exit $?"], input=json.dumps(config), env=daemon.env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


class Container:
    """A container as the hook sees it: a bundle (podman's userdata dir) and an init process."""

    def __init__(self, base: Path, cid: str, config: dict) -> None:
        self.cid, self.bundle = cid, base / cid
        self.bundle.mkdir()
        (self.bundle / "config.json").write_text(json.dumps(config))
        self.init = subprocess.Popen(["sleep", "600"])
        self.annotations = config["annotations"]

    def state(self, status: str) -> str:
        return json.dumps({"ociVersion": "1.0.2-dev", "id": self.cid, "status": status, "pid": self.init.pid,
                           "bundle": str(self.bundle), "annotations": self.annotations})

    def exit(self) -> None:
        if self.init.poll() is None:
            os.kill(self.init.pid, signal.SIGKILL)  # the process this test started
        self.init.wait(30)


@pytest.fixture
def containers(tmp_path: Path) -> Iterator[list[Container]]:
    made: list[Container] = []
    yield made
    for c in made:
        c.exit()


def test_precreate_applies_the_image_config_and_poststop_undoes_it(daemon, app_ref: str, tmp_path: Path,
                                                                   containers: list[Container]) -> None:
    root = tmp_path / "rootfs"  # podman's --rootfs directory
    root.mkdir()
    out = precreate(daemon, podman_config(root, app_ref, [""]))  # "": the image's own Cmd
    p = out["process"]
    assert p["args"] == RUN_CONFIG["Entrypoint"] + RUN_CONFIG["Cmd"]
    assert p["user"] == {"uid": 1234, "gid": 2345, "umask": 18} and p["cwd"] == "/work"
    assert p["env"] == ["PATH=/opt/bin:/bin", "GREETING=hello from the image config", "TERM=xterm",
                        "HOSTNAME=c0ffee"]
    assert out["root"]["path"] == str(root) and (root / "marker").read_text() == "from the lazy image\n"
    [dev] = daemon.json("ls")
    assert dev["mounts"] == [str(root)] and dev["owner"].split(":")[0] == str(os.getpid())  # podman's, for now

    c = Container(tmp_path, "c1", out)
    containers.append(c)
    daemon.cli("hook", input=c.state("creating"))  # createRuntime: the container's init takes it over
    assert daemon.json("ls")[0]["owner"].split(":")[0] == str(c.init.pid)
    daemon.cli("hook", input=c.state("stopped"))  # poststop
    assert daemon.json("ls") == [] and not mounts.is_mountpoint(str(root))
    assert list(root.iterdir()) == []  # the --rootfs directory stays, empty

    # a command replaces Cmd behind the Entrypoint; podman's own -e, --user and --workdir stay
    other = tmp_path / "other"
    out = precreate(daemon, podman_config(other, app_ref, ["sh", "-c", "true"], cwd="/tmp",
                                          user={"uid": 99, "gid": 98},
                                          env=["GREETING=from podman", "PATH=/x"]))
    p = out["process"]
    assert p["args"] == ["/bin/entry", "sh", "-c", "true"] and p["cwd"] == "/tmp"
    assert p["user"] == {"uid": 99, "gid": 98} and p["env"] == ["PATH=/x", "GREETING=from podman"]
    daemon.cli("umount", str(other))
    assert not other.exists()  # the daemon made the mount point, and removed it

    plain = {"root": {"path": "rootfs"}, "process": {"args": ["sh"]}}  # no annotation: untouched
    assert json.loads(daemon.cli("hook", "precreate", input=json.dumps(plain)).stdout) == plain


def test_a_start_that_never_reaches_create_leaves_nothing(daemon, app_ref: str, tmp_path: Path) -> None:
    """podman fails (or dies) after precreate and before runc runs: no poststop ever comes."""
    root = tmp_path / "made-by-the-daemon"
    precreate(daemon, podman_config(root, app_ref, [""]), parent_exits=True)
    wait_for("the device of a start whose podman is gone is detached", lambda: daemon.json("ls") == [])
    assert not root.exists() and not mounts.is_mountpoint(str(root))
    assert "is gone" in (daemon.state_dir / "bdserver.log").read_text()


def test_the_device_goes_with_the_init_and_a_late_poststop_spares_the_next(daemon, app_ref: str, tmp_path: Path,
                                                                        containers: list[Container]) -> None:
    """runc failed after createRuntime (its init is killed) and podman runs no poststop: the daemon
    detaches. A poststop that does come late never takes down the next container on that directory."""
    root = tmp_path / "rootfs"
    root.mkdir()
    first = Container(tmp_path, "first", precreate(daemon, podman_config(root, app_ref, [""])))
    containers.append(first)
    daemon.cli("hook", input=first.state("creating"))
    first.exit()
    wait_for("the device of a dead init is detached", lambda: daemon.json("ls") == [])
    assert not mounts.is_mountpoint(str(root))

    second = Container(tmp_path, "second", precreate(daemon, podman_config(root, app_ref, [""])))
    containers.append(second)
    daemon.cli("hook", input=second.state("creating"))
    [dev] = daemon.json("ls")
    daemon.cli("hook", input=first.state("stopped"))  # the first container's poststop, late
    assert daemon.json("ls") == [dev] and (root / "marker").exists()
    daemon.cli("hook", input=second.state("stopped"))
    assert daemon.json("ls") == [] and not mounts.is_mountpoint(str(root))


def test_a_restarted_daemon_collects_devices_whose_owner_died_meanwhile(daemon, app_ref: str, tmp_path: Path,
                                                                       containers: list[Container]) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    c = Container(tmp_path, "c1", precreate(daemon, podman_config(root, app_ref, [""])))
    containers.append(c)
    daemon.cli("hook", input=c.state("creating"))
    daemon.stop()
    c.exit()
    daemon.start()
    wait_for("the restarted daemon detaches the device of a dead init", lambda: daemon.json("ls") == [])
    assert not mounts.is_mountpoint(str(root))
