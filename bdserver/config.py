"""The node's configuration: defaults < config file (TOML or JSON) < environment.

The daemon, the CLI (to find the socket) and the in-process commands (convert, inspect) read the
same file. It fails closed: an unknown key or a value of the wrong type is a ConfigError naming
it, never a silent default. Environment: BDSERVER_CONFIG (file), BDSERVER_STATE_DIR,
BDSERVER_RUN_DIR, BDSERVER_SOCKET, BDSERVER_CACHE_DIR (tests give every daemon its own dirs this
way). Example ``/etc/bdserver/config.toml``::

    state_dir = "/var/lib/bdserver"      # state.json, logs, on-node conversions, trust records
    run_dir = "/run/bdserver"            # socket, FUSE mount, EROFS lower mounts
    snapshotter_socket = "/run/bdserver/containerd-snapshotter.sock"  # containerd proxy_plugins address
    cache_dir = "/var/lib/bdserver/cache"
    cache_max_bytes = 21474836480
    hosts_dir = "/etc/bdserver/certs.d"  # containerd-style <host>/hosts.toml (mirrors, TLS)
    docker_config = "/root/.docker/config.json"
    backend = "auto"                     # auto | ublk | tcmu | fuse
    log_level = "INFO"
    log_target = "auto"                  # auto (journal under systemd, else file) | journal | file
    log_max_bytes = 10485760             # the log file rotates at this size ...
    log_backups = 3                      # ... keeping this many old files: at most 4 x 10 MiB on disk
    log_repeat_window_s = 60.0           # an identical warning repeats at most once per window (+ count)
    metrics_address = ""                 # Prometheus endpoint, off by default: "127.0.0.1:9717",
                                         # "[::1]:9717" or "unix:/run/bdserver/metrics.sock" (loopback only)
    fetch_deadline_s = 30.0              # a fetch that takes longer fails the read with EIO
    prefetch_chunks = 4                  # fetch-ahead after a miss (0: off; 4 measured best, docs/bench.md)
    prefetch_inflight = 12               # fetch-ahead requests on the wire per device
    prefetch_run = 1                     # chunks per fetch-ahead request
    fuse_read_ahead_kb = 512             # kernel readahead on the FUSE device file (bytes a miss drags in)
    trace_replay = true                  # replay a trusted start trace on attach (bdserver optimize)
    trace_inflight = 8                   # replay requests on the wire per device
    trace_run_bytes = 1048576            # on-blob bytes per replay request at most
    trace_window_bytes = 4194304         # trace order is kept between windows of this many bytes
    trace_gap_chunks = 2                 # chunks outside the trace fetched to merge two runs
    trace_max_bytes = 536870912          # on-blob bytes one replay may pull at most
    converted_keep_s = 604800            # on-node conversions unused this long are removed

    [token_realms]                       # token servers on another host than their registry
    "registry.example.com" = ["auth.example.com"]   # (credentials go to no other host)

    [trust]                              # which lazy images (referrers) may be used; see
    allowed = ["sha256:..."]             # bdserver/oci/README.md for every key
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from bdserver.errors import ConfigError

DEFAULT_CONFIG = "/etc/bdserver/config.toml"
LOG_TARGETS = ("auto", "journal", "file")
MIN_LOG_BYTES = 64 * 1024  # a log file holds at least a few of the longest lines (logs.MAX_LINE)


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
    trust: dict[str, Any] = field(default_factory=dict)  # validated by oci.trust.TrustPolicy.from_config
    token_realms: dict[str, list[str]] = field(default_factory=dict)  # registry -> extra token hosts
    backend: str = "auto"
    log_file: str = ""  # default: <state_dir>/bdserver.log
    log_level: str = "INFO"
    log_target: str = "auto"  # auto | journal | file (daemon/logs.py)
    log_max_bytes: int = 10 * 1024**2
    log_backups: int = 3
    log_repeat_window_s: float = 60.0
    journal_socket: str = "/run/systemd/journal/socket"
    metrics_address: str = ""  # off; else loopback HOST:PORT or unix:PATH (see ListenAddress)
    fetch_deadline_s: float = 30.0
    prefetch_chunks: int = 4
    prefetch_inflight: int = 12
    prefetch_run: int = 1
    fuse_read_ahead_kb: int = 512  # measured: docs/bench.md "Cold start with start traces"
    trace_replay: bool = True
    trace_inflight: int = 8
    trace_run_bytes: int = 1 << 20
    trace_window_bytes: int = 4 << 20
    trace_gap_chunks: int = 2
    trace_max_bytes: int = 512 << 20
    converted_keep_s: float = 7 * 24 * 3600.0
    daemon_start_wait_s: float = 30.0  # how long attach/mount wait for a daemon they started
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
    known = {f.name for f in fields(Config)} - {"source_path"}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"config {src}: unknown keys {sorted(unknown)}")
    _check_types(values, src)
    _check_values(values, src)
    for env, key in _ENV.items():
        if os.environ.get(env):
            values[key] = os.environ[env]
    values["source_path"] = src
    return Config(**values)


def _check_types(values: dict[str, Any], src: str) -> None:
    hints = get_type_hints(Config)
    for key, value in values.items():
        want = hints[key]
        origin = getattr(want, "__origin__", want)
        ok = isinstance(value, origin) and not (origin in (int, float) and isinstance(value, bool))
        if origin is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
            ok = True
        if not ok:
            raise ConfigError(f"config {src}: {key} must be {getattr(origin, '__name__', origin)}, "
                              f"not {type(value).__name__} {value!r}")
        if origin in (int, float) and value < 0:
            raise ConfigError(f"config {src}: {key} must not be negative")


def _check_values(values: dict[str, Any], src: str) -> None:
    if values.get("log_target", "auto") not in LOG_TARGETS:
        raise ConfigError(f"config {src}: log_target must be one of {', '.join(LOG_TARGETS)}")
    if values.get("log_max_bytes", MIN_LOG_BYTES) < MIN_LOG_BYTES:
        raise ConfigError(f"config {src}: log_max_bytes must be at least {MIN_LOG_BYTES}")
    if values.get("log_backups", 1) < 1:
        raise ConfigError(f"config {src}: log_backups must be at least 1 (the file rotates into it)")
    if values.get("metrics_address"):
        try:
            ListenAddress.parse(values["metrics_address"])
        except ConfigError as exc:
            raise ConfigError(f"config {src}: {exc}") from None


@dataclass(frozen=True)
class ListenAddress:
    """Where the metrics endpoint listens: a loopback TCP address or a unix socket, nothing else.

    The endpoint has no authentication and its labels name the images a node runs, so it is
    never bound where another host could reach it; a remote Prometheus scrapes through a local
    agent or an authenticating proxy (README "Metrics")."""

    host: str = ""  # a loopback IP literal (TCP)
    port: int = 0
    path: str = ""  # a unix socket path

    @classmethod
    def parse(cls, text: str) -> "ListenAddress":
        if text.startswith("unix:"):
            path = text[len("unix:"):]
            if not os.path.isabs(path):
                raise ConfigError(f"metrics_address {text!r}: a unix socket needs an absolute path")
            return cls(path=path)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"metrics_address {text!r} is not HOST:PORT (1-65535) or unix:PATH")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ConfigError(f"metrics_address {text!r}: write an IPv6 address in brackets, [::1]:PORT")
        host = "127.0.0.1" if host == "localhost" else host
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"metrics_address {text!r}: only loopback addresses (127.0.0.0/8, ::1, localhost) "
                              "or unix:PATH; the endpoint has no authentication")
        return cls(host=host, port=int(port))
