"""Fixtures for node tests: real EROFS images, the in-process FUSE backend, a private daemon.

Every test gets its own state dir, run dir, socket and mount points under its tmp_path; teardown
unmounts only what lies under that tmp_path and stops only the daemon it started (by pid).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from bdserver import mounts
from tests.fixtures.converter import convert_cli  # noqa: F401  (re-exported)
from tests.fixtures.trees import assert_same_tree, make_tree, mkfs_erofs  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[2]
BDSERVER = [sys.executable, "-m", "bdserver.cli"]

if os.geteuid() != 0:  # pragma: no cover  (CI and `make test` run as root)
    pytest.fail("node tests need root (mounts, FUSE): run them as root", pytrace=False)



@pytest.fixture
def erofs_image(tmp_path: Path) -> tuple[Path, Path]:
    src = make_tree(tmp_path / "src")
    return mkfs_erofs(tmp_path / "img.erofs", src), src


def cleanup_mounts(prefix: Path) -> None:
    """Unmount everything at or below ``prefix`` (deepest first). Never touches other mounts."""
    p = str(prefix)
    for _ in range(10):
        left = [m.target for m in mounts.list_mounts() if m.target == p or m.target.startswith(p + "/")]
        if not left:
            return
        for t in sorted(left, key=len, reverse=True):
            try:
                mounts.sys_umount(t, mounts.MNT_DETACH)
            except OSError:
                pass


@pytest.fixture
def fuse_backend(tmp_path: Path) -> Iterator[object]:
    from bdserver.backends.base import get_backend

    b = get_backend("fuse")
    ok, why = b.available()
    if not ok:
        pytest.fail(f"FUSE backend unavailable: {why}")
    b.configure(run_dir=str(tmp_path / "run"))
    try:
        yield b
    finally:
        cleanup_mounts(tmp_path / "mnt")
        b.close()
        cleanup_mounts(tmp_path)


def loop_count() -> int:
    return sum(1 for n in os.listdir("/sys/block") if n.startswith("loop"))


def fuse_connections() -> set[str]:
    """Live FUSE connections (mounts fusectl if nobody has; that is the standard state)."""
    d = "/sys/fs/fuse/connections"
    if not any(m.target == d for m in mounts.list_mounts()):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", d], check=False)
    return set(os.listdir(d))


@dataclass
class Daemon:
    """A private bdserver daemon driven through the real CLI (subprocesses)."""

    base: Path
    env: dict[str, str] = field(default_factory=dict)
    extra_config: str = ""

    def write_config(self, extra: str = "") -> None:
        """(Re)write the daemon's config; ``extra`` is TOML appended (e.g. a [trust] table)."""
        self.extra_config = extra or self.extra_config
        b = self.base
        (b / "config.toml").write_text(
            f'state_dir = "{b / "state"}"\nrun_dir = "{b / "run"}"\ncache_dir = "{b / "cache"}"\n'
            'backend = "fuse"\nlog_level = "DEBUG"\n' + self.extra_config
        )

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def socket(self) -> Path:
        return self.base / "run" / "bdserver.sock"

    def cli(self, *args: str, check: bool = True, timeout: float = 300, input: str | None = None
            ) -> subprocess.CompletedProcess:
        p = subprocess.run(BDSERVER + list(args), env=self.env, capture_output=True, text=True, timeout=timeout,
                           input=input, cwd=REPO)
        if check and p.returncode != 0:
            raise AssertionError(f"bdserver {' '.join(args)} failed ({p.returncode}): {p.stderr}{p.stdout}")
        return p

    def json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "--json").stdout)

    def pid(self) -> int | None:
        try:
            return int((self.state_dir / "bdserver.pid").read_text())
        except (OSError, ValueError):
            return None

    def wait_gone(self, pid: int) -> None:
        for _ in range(300):  # bounded: 30 s
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon {pid} did not exit")

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        self.cli("stop", check=False, timeout=60)
        self.wait_gone(pid)

    def kill(self) -> None:
        """Crash the daemon (SIGKILL to the pid it recorded: a process this test started)."""
        pid = self.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        self.wait_gone(pid)

    def start(self) -> None:
        from bdserver.daemon.client import start_daemon
        from bdserver.config import load_config

        old = dict(os.environ)
        os.environ.update(self.env)
        try:
            start_daemon(load_config())
        finally:
            os.environ.clear()
            os.environ.update(old)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    base = tmp_path / "d"
    base.mkdir()
    cfg = base / "config.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BDSERVER_")}
    env["BDSERVER_CONFIG"] = str(cfg)
    env["PYTHONPATH"] = str(REPO)
    d = Daemon(base, env)
    d.write_config()
    try:
        yield d
    finally:
        pid = d.pid()
        if pid is not None:
            try:
                d.stop()
            except Exception:  # noqa: BLE001 - fall back to killing our own daemon by pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        cleanup_mounts(tmp_path)


# A fixture defined beside its helpers (it uses convert_cli above): imported here so that every node
# test can ask for it by name.
from tests.node.small_lazy import small_lazy  # noqa: E402, F401
