"""The Prometheus endpoint, scraped over HTTP while devices are read through the real registry (behind a
byte-counting fault proxy): counters move by what the registry and the kernel really did, promtool
accepts the exposition, detached devices disappear, and the endpoint answers only where the config says."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bdserver.config import ListenAddress
from bdserver.errors import ConfigError
from tests.fixtures.proxy import FaultProxy
from tests.fixtures.registry import free_port
from tests.node.small_lazy import read_device, scrape, until

pytestmark = pytest.mark.slow


class Exposition:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def has(self, name: str, **labels: str) -> bool:
        want = set(labels.items())
        return any(n == name and want <= set(ls) for n, ls in self.samples)

    def label_values(self, label: str) -> set[str]:
        return {v for _, ls in self.samples for k, v in ls if k == label}


@pytest.fixture
def proxy(small_lazy) -> Iterator[FaultProxy]:
    p = FaultProxy(small_lazy.registry.url)
    try:
        yield p
    finally:
        p.stop()


def _chunks(small_lazy) -> int:
    """Chunks in the lazy image's layers (128 KiB of EROFS image each, per its manifest)."""
    r = httpx.get(f"{small_lazy.registry.url}/v2/ops/manifests/{small_lazy.lazy}", timeout=10,
                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    layers = [d for d in r.json()["layers"] if d.get("annotations", {}).get("org.erofs.role") == "device"]
    assert len(layers) == 2
    return sum(-(-int(d["annotations"]["org.bdserver.blocks"]) * 4096 // 131072) for d in layers)


def _metrics_daemon(daemon, small_lazy, extra: str = "") -> str:
    """Configure the daemon with an endpoint on a free loopback port; returns its URL."""
    port = free_port()
    daemon.write_config(f'metrics_address = "127.0.0.1:{port}"\n{extra}' + small_lazy.trust_toml())
    return f"http://127.0.0.1:{port}/metrics"


def test_counters_follow_reads_through_the_registry(daemon, small_lazy, proxy) -> None:
    url = _metrics_daemon(daemon, small_lazy, "prefetch_chunks = 0\n")  # one fetch per missed chunk
    ref = small_lazy.ref(proxy.host)
    a = daemon.json("attach", ref)
    dev = {"device": a["id"], "image": ref}
    m0 = Exposition(scrape(url))
    assert m0.value("bdserver_device_info", **dev, backend="fuse", kind="lazy", image_digest=small_lazy.lazy) == 1
    assert m0.value("bdserver_devices", backend="fuse", kind="lazy", status="attached") == 1
    assert m0.value("bdserver_device_size_bytes", **dev) == a["size"]
    proxy.stats.reset()

    assert read_device(a["path"]) == a["size"]  # every block once, through the kernel's page cache
    until(lambda: proxy.stats.bytes(r"/blobs/") == Exposition(scrape(url)).value("bdserver_fetch_bytes_total", **dev)
          - m0.value("bdserver_fetch_bytes_total", **dev), "the registry's bytes are counted")
    m1 = Exposition(scrape(url))

    def delta(name: str, labels: dict[str, str] = dev) -> float:
        return m1.value(name, **labels) - m0.value(name, **labels)

    wire = proxy.stats.bytes(r"/blobs/")
    assert wire > 0 and delta("bdserver_fetch_bytes_total") == wire
    assert delta("bdserver_fetch_requests_total") == proxy.stats.requests(r"/blobs/")
    assert delta("bdserver_device_read_bytes_total") == a["size"]
    misses = delta("bdserver_device_chunk_misses_total")  # concurrent readers of one chunk both miss it
    assert delta("bdserver_fetch_chunks_total") == _chunks(small_lazy) <= misses  # each chunk fetched once
    assert delta("bdserver_device_read_errors_total") == 0 and delta("bdserver_verification_failures_total") == 0
    assert delta("bdserver_device_read_latency_seconds_count") == delta("bdserver_device_reads_total") > 0
    assert delta("bdserver_fetch_latency_seconds_count") == delta("bdserver_fetch_requests_total")
    assert m1.value("bdserver_device_read_latency_seconds_bucket", **dev, le="+Inf") == \
        m1.value("bdserver_device_read_latency_seconds_count", **dev)
    assert m1.value("bdserver_cache_stored_bytes_total") > 0 and m1.value("bdserver_cache_used_bytes") > 0
    assert m1.value("process_resident_memory_bytes") > 0
    alerted = set(re.findall(r"\b(bdserver_[a-z_]+)", readme_rules()))
    assert len(alerted) == 5 and alerted <= {n for n, _ in m1.samples}  # the README alerts on what exists

    # promtool (Prometheus's own linter) accepts the exposition as it is
    p = subprocess.run(["promtool", "check", "metrics"], input=m1.text, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), p.stdout + p.stderr

    # a second device of the same image reads from the node cache: hits, and nothing from the registry
    b = daemon.json("attach", ref)
    dev_b = {"device": b["id"], "image": ref}
    proxy.stats.reset()
    read_device(b["path"])
    m2 = Exposition(scrape(url))
    assert proxy.stats.bytes(r"/blobs/") == 0 and m2.value("bdserver_fetch_bytes_total", **dev_b) == 0
    assert m2.value("bdserver_device_chunk_hits_total", **dev_b) >= misses
    assert m2.value("bdserver_device_chunk_misses_total", **dev_b) == 0
    assert m2.value("bdserver_devices", backend="fuse", kind="lazy", status="attached") == 2

    # removed devices disappear from the exposition
    daemon.cli("detach", a["id"])
    m3 = Exposition(scrape(url))
    assert a["id"] not in m3.label_values("device") and b["id"] in m3.label_values("device")
    assert m3.value("bdserver_devices", backend="fuse", kind="lazy", status="attached") == 1
    assert m3.value("bdserver_requests_total", op="attach", outcome="ok") == 2
    assert m3.value("bdserver_requests_total", op="detach", outcome="ok") == 1


def test_verification_failures_and_read_errors(daemon, small_lazy, proxy) -> None:
    url = _metrics_daemon(daemon, small_lazy, "prefetch_chunks = 0\n")
    ref = small_lazy.ref(proxy.host)
    a = daemon.json("attach", ref)
    dev = {"device": a["id"], "image": ref}
    proxy.inject("corrupt", match=r"/blobs/", count=1)
    try:  # inside the last layer, a chunk not fetched yet; the kernel may retry a failed readahead itself
        read_device(a["path"], a["size"] - (1 << 20), 4096)
    except OSError:
        pass
    m = Exposition(scrape(url))
    assert m.value("bdserver_verification_failures_total", **dev) == 1
    assert m.value("bdserver_device_read_errors_total", **dev) >= 1
    read_device(a["path"], a["size"] - (1 << 20), 4096)  # the next read fetches again, and succeeds
    m2 = Exposition(scrape(url))
    assert m2.value("bdserver_verification_failures_total", **dev) == 1
    assert m2.value("bdserver_fetch_chunks_total", **dev) >= 1


def test_prefetch_bytes(daemon, small_lazy, proxy) -> None:
    url = _metrics_daemon(daemon, small_lazy, "prefetch_chunks = 4\n")
    ref = small_lazy.ref(proxy.host)
    a = daemon.json("attach", ref)
    dev = {"device": a["id"], "image": ref}
    proxy.stats.reset()  # from here on only chunk fetches: the indexes came with attach
    read_device(a["path"])
    until(lambda: proxy.stats.bytes(r"/blobs/") == Exposition(scrape(url)).value("bdserver_fetch_bytes_total", **dev),
          "every fetch, ahead or on demand, is counted")
    m = Exposition(scrape(url))
    ahead = m.value("bdserver_prefetch_bytes_total", **dev)
    useful = m.value("bdserver_prefetch_useful_bytes_total", **dev)
    assert ahead > 0 and 0 < useful <= ahead
    assert ahead % 4096 == 0 and useful % 4096 == 0  # whole chunks of the image, uncompressed


def test_recoveries_and_conversions(daemon, small_lazy, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    daemon.write_config(f'metrics_address = "127.0.0.1:{port}"\n')  # no trust: the image is converted here
    c = daemon.json("attach", small_lazy.ref())
    assert c["kind"] == "converted-on-node"
    src = tmp_path / "gone"
    src.mkdir()
    (src / "f").write_text("x")
    gone = subprocess.run(["mkfs.erofs", "--quiet", str(tmp_path / "gone.erofs"), str(src)], check=True)
    assert gone.returncode == 0
    g = daemon.json("attach", f"file:{tmp_path / 'gone.erofs'}")
    m = Exposition(scrape(url))
    assert m.value("bdserver_conversions_total", outcome="ok") == 1
    assert m.value("bdserver_recoveries_total", outcome="ok") == 0
    daemon.stop()
    (tmp_path / "gone.erofs").unlink()  # this one cannot come back
    daemon.start()
    m = Exposition(scrape(url))
    assert m.value("bdserver_recoveries_total", outcome="ok") == 1
    assert m.value("bdserver_recoveries_total", outcome="failed") == 1
    assert m.value("bdserver_devices", backend="fuse", kind="file", status="error") == 1
    assert m.value("bdserver_devices", backend="fuse", kind="converted-on-node", status="attached") == 1
    assert m.value("bdserver_conversions_total", outcome="ok") == 0  # reopened, not converted again
    assert not m.has("bdserver_device_size_bytes", device=g["id"])  # nothing is served for it


# -- where the endpoint can be reached -----------------------------------------------------------
def _connects(host: str, port: int, netns: str | None = None) -> bool:
    code = ("import socket,sys\ns=socket.socket()\ns.settimeout(5)\n"
            "try:\n s.connect((sys.argv[1], int(sys.argv[2]))); print('connected')\n"
            "except OSError as e: print('refused', e)\n")
    cmd = [sys.executable, "-c", code, host, str(port)]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    return out.startswith("connected")


@pytest.fixture
def veth() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (netns, host-side ip, netns-side ip)."""
    tag = uuid.uuid4().hex[:6]
    ns, vh, vn = f"bdmet-{tag}", f"bdm{tag}h", f"bdm{tag}n"
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    x = next(x for x in range(1, 250) if f"10.214.{x}." not in used)
    host_ip, ns_ip = f"10.214.{x}.1", f"10.214.{x}.2"
    run = lambda *c: subprocess.run(list(c), check=True, capture_output=True, timeout=30)  # noqa: E731
    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", vh, "type", "veth", "peer", "name", vn)
        run("ip", "link", "set", vn, "netns", ns)
        run("ip", "addr", "add", f"{host_ip}/30", "dev", vh)
        run("ip", "link", "set", vh, "up")
        run("ip", "-n", ns, "addr", "add", f"{ns_ip}/30", "dev", vn)
        run("ip", "-n", ns, "link", "set", vn, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns, host_ip, ns_ip
    finally:
        subprocess.run(["ip", "link", "del", vh], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_loopback_endpoint_is_unreachable_from_elsewhere(daemon, erofs_image, veth) -> None:
    ns, host_ip, _ = veth
    image, _ = erofs_image
    port = free_port()
    daemon.write_config(f'metrics_address = "127.0.0.1:{port}"\n')
    daemon.cli("attach", f"file:{image}")
    assert "bdserver_device_info" in scrape(f"http://127.0.0.1:{port}/metrics")
    # a listener on every address WOULD answer both of these (the control for this test)
    assert not _connects(host_ip, port), "the endpoint answers on the host's veth address"
    assert not _connects(host_ip, port, netns=ns), "the endpoint answers another network namespace"
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 404


@pytest.mark.parametrize("address, why", [
    ("0.0.0.0:9717", "only loopback"), ("10.214.0.1:9717", "only loopback"), ("[::]:9717", "only loopback"),
    ("example.com:9717", "only loopback"), ("127.0.0.1", "is not HOST:PORT"), ("unix:relative.sock", "absolute path"),
])
def test_addresses_other_than_loopback_are_refused(daemon, erofs_image, address: str, why: str) -> None:
    image, _ = erofs_image
    daemon.write_config(f'metrics_address = "{address}"\n')
    p = daemon.cli("attach", f"file:{image}", check=False)
    assert p.returncode == 13 and "metrics_address" in p.stderr and why in p.stderr, p.stderr  # ConfigError
    assert daemon.pid() is None  # nothing was started


@pytest.mark.parametrize("text, host, port", [("127.0.0.1:9717", "127.0.0.1", 9717), ("127.9.8.7:1", "127.9.8.7", 1),
                                              ("localhost:9717", "127.0.0.1", 9717), ("[::1]:65535", "::1", 65535)])
def test_loopback_addresses_parse(text: str, host: str, port: int) -> None:
    assert ListenAddress.parse(text) == ListenAddress(host=host, port=port)
    assert ListenAddress.parse("unix:/run/x.sock") == ListenAddress(path="/run/x.sock")
    for bad in ("127.0.0.1:0", "127.0.0.1:65536", "[::1]", "::1:80", "[::ffff:10.0.0.1]:80", "unix:"):
        with pytest.raises(ConfigError):
            ListenAddress.parse(bad)


def test_ipv6_loopback_endpoint(daemon, erofs_image) -> None:
    image, _ = erofs_image
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    daemon.write_config(f'metrics_address = "[::1]:{port}"\n')
    daemon.cli("attach", f"file:{image}")
    assert "bdserver_device_info" in scrape(f"http://[::1]:{port}/metrics")
    assert not _connects("127.0.0.1", port)  # exactly the address configured


def test_unix_socket_endpoint_is_root_only(daemon, erofs_image, tmp_path: Path) -> None:
    image, _ = erofs_image
    sock = daemon.base / "run" / "metrics.sock"
    daemon.write_config(f'metrics_address = "unix:{sock}"\n')
    daemon.cli("attach", f"file:{image}")
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    text = scrape("http://localhost/metrics", uds=str(sock))
    assert "bdserver_device_info" in text
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1]); print('connected')\nexcept PermissionError: print('denied')\n")
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code,
                        str(sock)], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "denied"
    daemon.stop()
    assert not os.path.exists(sock)


def test_off_by_default(daemon, erofs_image) -> None:
    image, _ = erofs_image
    daemon.cli("attach", f"file:{image}")
    pid = daemon.pid()
    ss = shutil.which("ss")
    assert ss is not None
    out = subprocess.run([ss, "-Hltnp"], capture_output=True, text=True, check=True).stdout
    assert f"pid={pid}," not in out  # the daemon listens on no TCP port
    with socket.socket(socket.AF_UNIX) as s:  # (and its control socket still works)
        s.connect(str(daemon.socket))


def readme_rules() -> str:
    """The alert rules the README gives operators (the yaml block of its Metrics section)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Metrics"):readme.index("## Logs")]
    blocks = [b.split("\n", 1)[1] for b in section.split("```yaml")[1:]]
    rules = [b[:b.index("```")] for b in blocks if b.startswith("groups:")]
    assert len(rules) == 1
    return rules[0]


def test_readme_alert_rules_are_valid(tmp_path: Path) -> None:
    (tmp_path / "rules.yml").write_text(readme_rules())
    p = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "5 rules found" in p.stdout, p.stdout + p.stderr
