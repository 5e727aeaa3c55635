"""Cold start through containerd: `bdserver pull` + `ctr run --snapshotter bdserver` against `ctr image pull`
+ `ctr run` on containerd's own overlayfs snapshotter, side by side on the same registry, image and machine.

    .venv/bin/python bench/containerd.py [--rounds 2] [--mbit 100] [--rtt-ms 20]

Image: the debootstrap base layer plus a small top layer, converted (lazy image trusted by digest).
The registry sits behind the counting proxy, which adds a delay per request and paces each
response body (a WAN-like link; 0 for plain loopback). Each round starts with an empty chunk cache
and fresh namespaces; it prints both times, the blob bytes each side fetched and the ratio
lazy/overlayfs (lower is better).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.containerd.conftest import Containerd  # noqa: E402
from tests.fixtures.layers import build_oci_layout, debian_layers, small_tar_layer  # noqa: E402
from tests.fixtures.proxy import FaultProxy  # noqa: E402
from tests.fixtures.registry import start_registry  # noqa: E402
from tests.node.conftest import Daemon, cleanup_mounts  # noqa: E402
from tests.node.test_e2e_registry import _convert  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mbit", type=float, default=100.0, help="per-response bandwidth (0: unlimited)")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="delay added to every request")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-ctrd-"))
    reg = start_registry(base / "registry")
    proxy = FaultProxy(reg.url)
    d = base / "d"
    d.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BDSERVER_")}
    env.update(BDSERVER_CONFIG=str(d / "config.toml"), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    daemon = Daemon(d, env)
    ctrd = Containerd(base / "ctrd", base / "hosts", str(d / "run" / "containerd-snapshotter.sock"))
    try:
        top = small_tar_layer(base / "top.tar", {"marker": b"bench\n"})
        build_oci_layout([debian_layers()[0], top], base / "layout")
        reg.push_layout(base / "layout", "latest", "app", "v1")
        lazy = _convert(base, f"{reg.host}/app:v1")["lazy"]
        daemon.write_config(f'[trust]\nallowed = ["{lazy}"]\n')
        daemon.start()
        ctrd.start()
        ctrd.trust_plain_http(proxy.host)
        ref = f"{proxy.host}/app:v1"
        proxy.latency, proxy.bandwidth = args.rtt_ms / 1000, args.mbit * 1e6 / 8
        print(f"link: {args.mbit:g} Mbit/s per response, {args.rtt_ms:g} ms per request")
        for rnd in range(args.rounds):
            daemon.stop()
            shutil.rmtree(d / "cache", ignore_errors=True)  # cold chunk cache
            proxy.stats.reset()
            t0 = time.perf_counter()
            daemon.cli("pull", ref, "--address", ctrd.address, "--namespace", f"lazy{rnd}")
            ctrd.ctr("run", "--rm", "--snapshotter", "bdserver", ref, f"l{rnd}", "cat", "/marker",
                     namespace=f"lazy{rnd}")
            lazy_s, lazy_b = time.perf_counter() - t0, proxy.stats.bytes("/blobs/")
            proxy.stats.reset()
            t0 = time.perf_counter()
            ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref, namespace=f"plain{rnd}")
            ctrd.ctr("run", "--rm", "--snapshotter", "overlayfs", ref, f"p{rnd}", "cat", "/marker",
                     namespace=f"plain{rnd}")
            plain_s, plain_b = time.perf_counter() - t0, proxy.stats.bytes("/blobs/")
            print(f"round {rnd}: bdserver pull + run {lazy_s:.2f} s, {lazy_b / 1e6:.1f} MB fetched | "
                  f"ctr pull (overlayfs) + run {plain_s:.2f} s, {plain_b / 1e6:.1f} MB | "
                  f"ratio {lazy_s / plain_s:.2f}", flush=True)
            for ns in (f"lazy{rnd}", f"plain{rnd}"):
                ctrd.ctr("images", "rm", "--sync", ref, namespace=ns, check=False)
        load = os.getloadavg()
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        return 0
    finally:
        ctrd.kill_tasks()
        ctrd.stop()
        daemon.stop()
        proxy.stop()
        reg.stop()
        cleanup_mounts(base)
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    sys.exit(main())
