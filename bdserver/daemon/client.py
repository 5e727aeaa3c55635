"""The CLI side of the control socket: call the daemon, start it when `attach`/`mount` need it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from bdserver.config import Config
from bdserver.daemon.protocol import call
from bdserver.errors import DaemonError, DaemonNotRunning



def request(cfg: Config, op: str, args: dict[str, Any] | None = None, *, autostart: bool = False) -> Any:
    try:
        return call(cfg.socket, op, args)
    except ConnectionError:
        if not autostart:
            raise DaemonNotRunning(f"the bdserver daemon is not running (no answer on {cfg.socket})") from None
    start_daemon(cfg)
    try:
        return call(cfg.socket, op, args)
    except ConnectionError as exc:
        raise DaemonError(f"the daemon started but does not answer on {cfg.socket}") from exc


def ping(cfg: Config) -> dict[str, Any] | None:
    try:
        return call(cfg.socket, "ping", timeout=5)
    except (ConnectionError, DaemonError, OSError):
        return None


def start_daemon(cfg: Config) -> int:
    """Spawn `bdserver serve` detached (own session) and wait, bounded, until its socket answers."""
    os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
    cmd = [sys.executable, "-m", "bdserver.cli", "serve"]
    if cfg.source_path:
        cmd += ["--config", cfg.source_path]
    out_path = os.path.join(cfg.state_dir, "daemon.out")
    with open(out_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                close_fds=True)
    deadline = time.monotonic() + cfg.daemon_start_wait_s
    while time.monotonic() < deadline:
        if ping(cfg) is not None:
            return proc.pid
        if proc.poll() is not None:
            tail = _tail(out_path)
            if "already uses" not in tail:  # lost a start race: the winner will answer soon
                raise DaemonError(f"the daemon exited while starting (status {proc.returncode}): {tail}")
        time.sleep(0.1)
    raise DaemonError(f"the daemon did not answer on {cfg.socket} within {cfg.daemon_start_wait_s:.0f}s (pid {proc.pid})")


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").strip().splitlines()
        return lines[-1][-300:] if lines else ""
    except OSError:
        return ""
