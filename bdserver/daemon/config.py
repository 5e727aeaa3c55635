"""Daemon configuration: defaults < config file (TOML or JSON) < environment.

Environment: BDSERVER_CONFIG (file), BDSERVER_STATE_DIR, BDSERVER_RUN_DIR, BDSERVER_SOCKET,
BDSERVER_CACHE_DIR. Tests give every daemon its own state dir, run dir and socket this way.
The CLI reads the same file to find the socket. Example ``/etc/bdserver/config.toml``::

    state_dir = "/var/lib/bdserver"      # state.json, logs, on-node conversions, trust records
    run_dir = "/run/bdserver"            # socket, FUSE mount, EROFS lower mounts
    snapshotter_socket = "/run/bdserver/containerd-snapshotter.sock"  # containerd proxy_plugins address
    cache_dir = "/var/lib/bdserver/cache"
    cache_max_bytes = 21474836480
    hosts_dir = "/etc/bdserver/certs.d"  # containerd-style <host>/hosts.toml (mirrors, TLS)
    docker_config = "/root/.docker/config.json"
    backend = "auto"                     # auto | ublk | tcmu | fuse
    log_level = "INFO"

    [trust]                              # which lazy images (referrers) may be used
    allowed = ["sha256:..."]             # lazy manifest digests
    allow_files = ["/etc/bdserver/allowed-digests"]
    converted_here = true                # images this node converted (state_dir/trust/converted)
    pinned_reference = true              # REF@<lazy manifest digest>
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bdserver.errors import ConfigError

DEFAULT_CONFIG = "/etc/bdserver/config.toml"


@dataclass
class Config:
    state_dir: str = "/var/lib/bdserver"
    run_dir: str = "/run/bdserver"
    socket: str = ""  # default: <run_dir>/bdserver.sock
    snapshotter_socket: str = ""  # containerd proxy snapshotter; default: <run_dir>/containerd-snapshotter.sock
    cache_dir: str = ""  # default: <state_dir>/cache
    cache_max_bytes: int = 20 * 1024**3
    hosts_dir: str = "/etc/bdserver/certs.d"  # containerd-style hosts.toml tree
    docker_config: str = ""  # default: ~/.docker/config.json
    trust: dict[str, Any] = field(default_factory=lambda: {"mode": "converted-here"})
    backend: str = "auto"
    log_file: str = ""  # default: <state_dir>/bdserver.log
    log_level: str = "INFO"
    source_path: str = ""  # the file this config came from (for spawning the daemon with it)

    def __post_init__(self) -> None:
        self.finish()

    def finish(self) -> None:
        if not self.socket:
            self.socket = os.path.join(self.run_dir, "bdserver.sock")
        if not self.snapshotter_socket:
            self.snapshotter_socket = os.path.join(self.run_dir, "containerd-snapshotter.sock")
        if not self.cache_dir:
            self.cache_dir = os.path.join(self.state_dir, "cache")
        if not self.log_file:
            self.log_file = os.path.join(self.state_dir, "bdserver.log")

    @property
    def state_file(self) -> str:
        return os.path.join(self.state_dir, "state.json")

    @property
    def pid_file(self) -> str:
        return os.path.join(self.state_dir, "bdserver.pid")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_ENV = {
    "BDSERVER_STATE_DIR": "state_dir",
    "BDSERVER_RUN_DIR": "run_dir",
    "BDSERVER_SOCKET": "socket",
    "BDSERVER_CACHE_DIR": "cache_dir",
}


def load_config(path: str | None = None) -> Config:
    """Load the configuration the daemon and the CLI agree on."""
    path = path or os.environ.get("BDSERVER_CONFIG") or None
    values: dict[str, Any] = {}
    src = ""
    if path or os.path.exists(DEFAULT_CONFIG):
        src = os.path.abspath(path or DEFAULT_CONFIG)
        try:
            text = Path(src).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {src}: {exc.strerror}") from exc
        try:
            values = json.loads(text) if src.endswith(".json") else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config {src} is not valid: {exc}") from exc
    known = {f.name for f in fields(Config)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"config {src}: unknown keys {sorted(unknown)}")
    for env, key in _ENV.items():
        if os.environ.get(env):
            values[key] = os.environ[env]
    values["source_path"] = src
    cfg = Config(**values)
    return cfg
