"""Debian's podman runs containers on a lazily mounted rootfs through bdserver's hook (lab only).

The README's command: ``podman run --hooks-dir bdserver/runtime/hooks.d/podman --annotation
org.bdserver.image=REF --rootfs EMPTY_DIR [CMD...]``. On the development machine podman cannot
start any container (runc may not raise RLIMIT_NOFILE/NPROC there), so this runs in the lab guest,
everything private to the test: a registry on the guest's loopback holding a busybox image with a
full run config (converted to a lazy image, trusted by digest), a daemon with its own state, and
podman with its own storage, run and tmp dirs, an empty containers.conf, cgroupfs, file events and
no network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from bdserver import mounts
from tests.fixtures.appimage import CMD_OUTPUT, push_app_image, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow]

# What podman itself writes into a --rootfs directory before any hook runs: /etc/mtab, and with
# --user passwd and group entries (libpod generatePasswdAndGroup). Anything else there would be the
# image or runc's mount points written below the lazy mount instead of onto it.
PODMAN_OWN = {"etc", "etc/mtab", "etc/passwd", "etc/group"}


@dataclass
class World:
    ref: str
    lazy_digest: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if os.environ.get("BDSERVER_LAB") != "1":
        pytest.skip("podman starts containers only inside the lab (vagrant/lab): runc may not set rlimits here")
    assert shutil.which("podman"), "podman is missing: run kernel-setup/install-packages"
    from tests.fixtures.registry import start_registry
    from tests.fixtures.converter import convert_cli

    base = tmp_path_factory.mktemp("podman-world")
    reg = start_registry(base / "registry")
    try:
        ref = push_app_image(reg, base)
        yield World(ref, convert_cli(base, ref)["lazy"])
    finally:
        reg.stop()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A private tmpfs for the daemon and podman: the guest's /tmp is itself an overlay, which
    overlayfs refuses as an upper dir; and podman wants a runroot path under 50 characters."""
    from tests.node.conftest import cleanup_mounts

    base = Path(tempfile.mkdtemp(prefix="bdpm-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700,size=1g", "bdserver-podman-test", str(base)], check=True)
    try:
        yield base
    finally:
        cleanup_mounts(base)
        base.rmdir()


@pytest.fixture
def daemon(scratch: Path, world: World) -> Iterator[object]:
    from tests.node.conftest import REPO, Daemon

    base = scratch / "d"
    base.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BDSERVER_")}
    env.update(BDSERVER_CONFIG=str(base / "config.toml"), PYTHONPATH=str(REPO))
    d = Daemon(base, env)
    d.write_config(f'daemon_start_wait_s = 120.0\n[trust]\nallowed = ["{world.lazy_digest}"]\n')
    d.start()
    try:
        yield d
    finally:
        if d.pid() is not None:
            d.stop()


@dataclass
class Podman:
    base: Path
    hooks: Path
    env: dict[str, str]

    def __call__(self, *args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
        b = self.base
        cmd = ["podman", "--root", str(b / "root"), "--runroot", str(b / "runroot"), "--tmpdir", str(b / "tmp"),
               "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
               "--runtime", "runc", *args]
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert not check or p.returncode == 0, f"{' '.join(cmd)}: {p.returncode}\n{p.stderr}"
        return p

    def rootfs(self, name: str) -> Path:
        """An empty directory for ``--rootfs`` (one per running container: the image is mounted onto it)."""
        d = self.base / "rootfs" / name
        d.mkdir(parents=True)
        return d

    def run(self, *args: str, ref: str, rootfs: Path, cmd: tuple[str, ...] = ("",)) -> subprocess.CompletedProcess:
        """The README's command; ``""`` runs the image's own Cmd."""
        return self("run", "--hooks-dir", str(self.hooks), "--network", "none", "--annotation",
                    f"org.bdserver.image={ref}", *args, "--rootfs", str(rootfs), *cmd)

    def left_in_rootfs_dirs(self) -> list[str]:
        """What is in the --rootfs directories beyond podman's own files (PODMAN_OWN)."""
        out = []
        for d in (self.base / "rootfs").iterdir():
            out += [f"{d.name}/{p.relative_to(d)}" for p in d.rglob("*") if str(p.relative_to(d)) not in PODMAN_OWN]
        return out


@pytest.fixture
def podman(scratch: Path, daemon) -> Iterator[Podman]:
    """podman with private storage, run and config dirs; the hook dir is the shipped podman hook
    with this checkout's interpreter and the test daemon's config."""
    from tests.node.conftest import REPO, cleanup_mounts

    base = scratch / "pm"
    hooks = base / "hooks.d"
    hooks.mkdir(parents=True)
    hook = json.loads((REPO / "bdserver" / "runtime" / "hooks.d" / "podman" / "bdserver.json").read_text())
    hook["hook"].update(path=sys.executable, args=[sys.executable, "-m", "bdserver.cli", "hook"],
                        env=[f"BDSERVER_CONFIG={daemon.env['BDSERVER_CONFIG']}", f"PYTHONPATH={REPO}",
                             "PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
    (hooks / "bdserver.json").write_text(json.dumps(hook))
    (base / "containers.conf").write_text("")  # nothing from the node's /etc/containers
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BDSERVER_", "CONTAINERS_"))}
    env.update(CONTAINERS_CONF=str(base / "containers.conf"))
    pm = Podman(base, hooks, env)
    try:
        yield pm
    finally:
        pm("rm", "--all", "--force", timeout=300)
        cleanup_mounts(base)


def failures(daemon) -> str:  # type: ignore[no-untyped-def]
    """The daemon's refusals and errors (podman does not show what a hook printed)."""
    log = daemon.state_dir / "bdserver.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return "\n".join(ln for ln in lines if "request failed" in ln or '"level": "error"' in ln)[-3000:]


def residue(daemon) -> list[str]:  # type: ignore[no-untyped-def]
    """What bdserver left: devices, mounts of its own dirs, upper dirs."""
    left = [f"device {d['id']} {d['mounts']}" for d in daemon.json("ls")]
    left += [f"mount {m.target}" for m in mounts.list_mounts() if m.target.startswith(str(daemon.base))]
    containers = daemon.base / "state" / "containers"
    return left + ([str(p) for p in containers.iterdir()] if containers.is_dir() else [])


def assert_nothing_left(daemon, podman: Podman) -> None:  # type: ignore[no-untyped-def]
    wait_for("bdserver left nothing behind", lambda: residue(daemon) == [])
    assert not [m.target for m in mounts.list_mounts() if m.target.startswith(str(podman.base / "rootfs"))]
    assert podman.left_in_rootfs_dirs() == []


def test_podman_runs_the_image_command_on_the_lazy_rootfs(world: World, daemon, podman: Podman) -> None:
    rootfs = podman.rootfs("a")
    # "": the image's own Cmd, behind its Entrypoint, as its User, in its WorkingDir, with its Env
    p = podman.run("--rm", ref=world.ref, rootfs=rootfs)
    assert (p.returncode, p.stdout.splitlines()) == (7, CMD_OUTPUT), p.stderr + failures(daemon)
    assert_nothing_left(daemon, podman)
    # a command replaces Cmd, the Entrypoint stays; podman's -e and --user win over the image's.
    # The same --rootfs directory again: the first run took everything down before it returned.
    p = podman.run("--rm", "-e", "GREETING=from podman", "--user", "99:98", ref=world.ref, rootfs=rootfs,
                   cmd=("sh", "-c", 'echo "$GREETING"; id -u; id -g; echo $PATH; exit 3'))
    assert p.returncode == 3, p.stderr + failures(daemon)
    assert p.stdout.splitlines() == ['entrypoint: sh -c echo "$GREETING"; id -u; id -g; echo $PATH; exit 3',
                                     "from podman", "99", "98", "/opt/bin:/bin"], p.stderr
    assert_nothing_left(daemon, podman)


def test_the_device_lives_with_the_container_until_podman_rm(world: World, daemon, podman: Podman) -> None:
    p = podman.run("-d", "--name", "long", ref=world.ref, rootfs=podman.rootfs("long"),
                   cmd=("sh", "-c", "echo started > written; exec sleep 600"))  # as app, in /work
    assert p.returncode == 0, p.stderr + failures(daemon)
    pid = podman("inspect", "--format", "{{.State.Pid}}", "long", check=True).stdout.strip()
    [dev] = daemon.json("ls")
    assert dev["kind"] == "lazy" and dev["mounts"] == [str(podman.base / "rootfs" / "long")], dev
    assert dev["owner"].split(":")[0] == pid  # handed to the container's init in createRuntime
    # podman exec never saw the image config: root, in /, unless told otherwise
    p = podman("exec", "long", "sh", "-c", "until [ -e /work/written ]; do sleep 0.1; done; cat /work/written /marker",
               check=True, timeout=180)
    assert p.stdout == "started\nfrom the lazy image\n"
    podman("stop", "--time", "0", "long", check=True)
    podman("rm", "long", check=True)
    assert_nothing_left(daemon, podman)
    # without --rm: the container exits, `podman rm` removes it
    p = podman.run("--name", "short", ref=world.ref, rootfs=podman.rootfs("short"))
    assert p.returncode == 7, p.stderr + failures(daemon)
    podman("rm", "short", check=True)
    assert_nothing_left(daemon, podman)


@pytest.mark.parametrize("failure", ["missing-command", "rlimit-refused", "later-precreate-hook-fails"])
def test_a_failed_create_leaves_nothing(world: World, daemon, podman: Podman, failure: str) -> None:
    """runc fails after createRuntime handed the device to its init (a command the image lacks, an
    rlimit above fs.nr_open), or podman fails before runc ever runs. podman 4.3 runs no poststop
    hook for the last two (and for the first one races the daemon, which collects the device when
    its owner dies). Either way nothing may stay."""
    args: tuple[str, ...] = ("--rm",)
    cmd: tuple[str, ...] = ("",)
    if failure == "missing-command":
        cmd = ("/no/such/command",)
    elif failure == "rlimit-refused":
        limit = int(Path("/proc/sys/fs/nr_open").read_text()) + 1
        args += ("--ulimit", f"nofile={limit}:{limit}")
    else:  # sorted after bdserver.json: runs once the lazy rootfs is mounted
        (podman.hooks / "zz-fail.json").write_text(json.dumps({
            "version": "1.0.0", "hook": {"path": "/bin/false"},
            "when": {"annotations": {"^org\\.bdserver\\.image$": ".+"}}, "stages": ["precreate"]}))
    p = podman.run(*args, ref=world.ref, rootfs=podman.rootfs("r"), cmd=cmd)
    assert p.returncode not in (0, 7), (p.returncode, p.stdout, p.stderr)
    assert "bdserver.cli hook]" not in p.stderr, p.stderr + failures(daemon)  # bdserver's hook did not fail
    assert_nothing_left(daemon, podman)
