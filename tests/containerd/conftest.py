"""Debian's containerd, started by the tests with its own root, state, sockets and config whose proxy
plugin points at a private bdserver daemon (tests.node.conftest's `daemon` fixture).

Teardown kills what the fixture started (containerd by pid, the shims of its own containers via
`ctr task kill`), unmounts only below the test's tmp_path, and leaves no containerd state behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.node.conftest import cleanup_mounts, daemon  # noqa: F401  (fixture)

CONTAINERD = shutil.which("containerd")
CTR = shutil.which("ctr")
START_TIMEOUT_S = 60.0

if CONTAINERD is None or CTR is None:  # installed by `make setup`: a missing one is a setup bug, not a skip
    pytest.fail("containerd is missing: run kernel-setup/install-packages", pytrace=False)

# runc's state lives under /run/containerd/runc/<namespace> whatever containerd's root: a namespace of
# our own keeps container ids apart from other containerd instances on the machine (CI, parallel runs)
NAMESPACE = f"bdtest{os.getpid()}"


def _config(base: Path, snapshotter_socket: str, hosts_dir: Path) -> str:
    return f"""version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{base}/containerd.sock"

[ttrpc]
  address = "{base}/containerd.sock.ttrpc"

[debug]
  level = "debug"

[proxy_plugins]
  [proxy_plugins.bdserver]
    type = "snapshot"
    address = "{snapshotter_socket}"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "bdserver"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{base}/cni/bin"
    conf_dir = "{base}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{hosts_dir}"
"""


@dataclass
class Containerd:
    base: Path
    hosts_dir: Path
    snapshotter_socket: str
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return str(self.base / "containerd.sock")

    def trust_plain_http(self, host: str) -> None:
        """hosts.toml for a loopback registry: plain HTTP, as the `daemon` side assumes too."""
        d = self.hosts_dir / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(f'server = "http://{host}"\n\n[host."http://{host}"]\n'
                                      '  capabilities = ["pull", "resolve"]\n')

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        cfg = self.base / "config.toml"
        cfg.write_text(_config(self.base, self.snapshotter_socket, self.hosts_dir))
        log = open(self.base / "containerd.log", "ab")
        self.proc = subprocess.Popen([CONTAINERD, "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"containerd exited ({self.proc.returncode}): {self.log()[-3000:]}")
            if os.path.exists(self.address) and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"containerd did not answer within {START_TIMEOUT_S:.0f}s: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return (self.base / "containerd.log").read_text(errors="replace")
        except OSError:
            return ""

    def ctr(self, *args: str, check: bool = True, timeout: float = 300, namespace: str = NAMESPACE
            ) -> subprocess.CompletedProcess:
        p = subprocess.run([CTR, "--address", self.address, "--namespace", namespace, *args], capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({p.returncode}): {p.stderr}{p.stdout}")
        return p

    def kill_tasks(self) -> None:
        """Stop every task of this containerd (its shims are ours: started through this containerd)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for ns in self.ctr("namespaces", "ls", "-q", check=False).stdout.split():
            for line in self.ctr("tasks", "ls", "-q", check=False, namespace=ns).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", line, check=False, namespace=ns)
                for _ in range(50):
                    if self.ctr("tasks", "delete", line, check=False, namespace=ns).returncode == 0:
                        break
                    time.sleep(0.1)
            for c in self.ctr("containers", "ls", "-q", check=False, namespace=ns).stdout.split():
                self.ctr("containers", "delete", c, check=False, namespace=ns)


@pytest.fixture
def containerd(tmp_path: Path, daemon) -> Iterator[Containerd]:  # noqa: F811 - the daemon fixture
    """containerd whose `bdserver` proxy snapshotter is the private daemon's socket (the daemon is
    started first, so containerd finds the snapshotter at once)."""
    daemon.start()
    sock = str(daemon.base / "run" / "containerd-snapshotter.sock")
    for _ in range(300):  # the snapshotter binds in the background of the daemon's start
        if os.path.exists(sock):
            break
        time.sleep(0.1)
    c = Containerd(tmp_path / "ctrd", tmp_path / "ctrd-hosts", sock)
    try:
        c.start()
        yield c
    finally:
        c.kill_tasks()
        c.stop()
        cleanup_mounts(tmp_path)
        shutil.rmtree(c.base / "state", ignore_errors=True)
