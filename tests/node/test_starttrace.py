"""Start traces end to end through Debian's docker-registry, runc and the FUSE backend: `bdserver
optimize` records and publishes one, a fresh attach replays it (each chunk once, demand reads
first), and a trace is used only when trusted like a lazy image and intact."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from bdserver.blob.starttrace import StartTrace
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import parse_manifest
from bdserver.oci.prefetch import publish_start_trace
from bdserver.oci.referrers import list_referrers
from bdserver.oci.store import open_store
from tests.fixtures.layers import build_oci_layout
from tests.fixtures.proxy import FaultProxy
from tests.fixtures.registry import REGISTRY_BIN, start_registry
from tests.fixtures.converter import convert_cli

pytestmark = pytest.mark.slow

if not os.path.exists(REGISTRY_BIN):  # installed by `make setup`: a missing one is a setup bug, not a skip
    pytest.fail(f"{REGISTRY_BIN} is missing: run kernel-setup/install-packages", pytrace=False)
if shutil.which("runc") is None:
    pytest.fail("runc is missing: run kernel-setup/install-packages", pytrace=False)

START = ["/bin/sh", "-c", "cat /app/a.bin /app/b.bin > /dev/null"]  # never reads /app/c.bin
# the kernel's readahead on the FUSE file at its minimum, so that the trace holds what the start read
NO_KEYS = "docker_config = \"/nonexistent/config.json\"\nfuse_read_ahead_kb = 128\n"


def _layers(base: Path) -> list[Path]:
    """busybox (+ sh, cat links) and a data layer: a.bin, b.bin (read by the start), c.bin (not)."""
    bb = shutil.which("busybox")
    assert bb is not None, "busybox is missing: run kernel-setup/install-packages (busybox-static)"
    rnd = random.Random(5)
    out = []
    with tarfile.open(base / "bb.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("bin")
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(ti)
        tf.add(bb, "bin/busybox")
        for c in ("sh", "cat"):
            ti = tarfile.TarInfo(f"bin/{c}")
            ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
            tf.addfile(ti)
    out.append(base / "bb.tar")
    with tarfile.open(base / "data.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        for name, size in (("a.bin", 700_000), ("b.bin", 500_000), ("c.bin", 3_000_000)):
            body = rnd.randbytes(size)
            ti = tarfile.TarInfo(f"app/{name}")
            ti.size = size
            tf.addfile(ti, __import__("io").BytesIO(body))
    out.append(base / "data.tar")
    return out


@dataclass
class World:
    base: Path
    registry: object
    host: str
    lazy: str  # lazy manifest digest of app:v1

    def trust_toml(self, *extra: str, top: str = "") -> str:
        """Config: ``top`` keys, then a [trust] table allowing the lazy image (and ``extra`` digests)."""
        allowed = ", ".join(f'"{d}"' for d in (self.lazy, *extra))
        return f"{NO_KEYS}{top}[trust]\nallowed = [{allowed}]\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("trace")
    reg = start_registry(base / "registry")
    try:
        reg.push_layout(build_oci_layout(_layers(base), base / "layout"), "latest", "app", "v1")
        converted = convert_cli(base, f"{reg.host}/app:v1", timeout=600)
        yield World(base, reg, reg.host, converted["lazy"])
    finally:
        reg.stop()


@pytest.fixture
def proxy(world: World) -> Iterator[FaultProxy]:
    p = FaultProxy(world.registry.url)
    try:
        yield p
    finally:
        p.stop()


def _fresh(daemon, config: str) -> None:
    """A restarted daemon with an empty chunk cache: a node that never ran the image."""
    daemon.stop()
    shutil.rmtree(daemon.base / "cache", ignore_errors=True)
    shutil.rmtree(daemon.state_dir / "manifests", ignore_errors=True)
    daemon.write_config(config)


def _ranges(proxy: FaultProxy, digest: str) -> list[tuple[int, int]]:
    out = []
    for path, value in list(proxy.ranges):
        m = re.match(r"bytes=(\d+)-(\d+)$", value)
        if path.endswith(f"/blobs/{digest}") and m:
            out.append((int(m.group(1)), int(m.group(2))))
    return out


def _layer_digests(world: World) -> list[str]:
    store = open_store(f"{world.host}/app", hosts_dirs=[], docker_config="/nonexistent")
    m = parse_manifest(store.get_manifest(world.lazy)[0])
    return [d.digest for d in m.layers if d.media_type == mt.EROFS_LAYER_ZSTD]


def _optimize(daemon, ref: str, *args: str) -> dict:
    p = daemon.cli("optimize", "--json", *args, ref, "--", *START)
    return json.loads(p.stdout)


def _start_in(root: Path) -> None:
    """START in a plain chroot (its output is thrown away here, as /dev/null is not in the image)."""
    subprocess.run(["chroot", str(root), "/bin/sh", "-c", "cat /app/a.bin /app/b.bin"], check=True, timeout=120,
                   stdout=subprocess.DEVNULL)


def _device(daemon, dev_id: str) -> dict:
    return daemon.json("stats", dev_id)[0]["stats"]["device"]


def test_optimize_records_publishes_and_a_fresh_attach_replays_each_chunk_once(
        world: World, daemon, proxy: FaultProxy, tmp_path: Path) -> None:
    daemon.write_config(world.trust_toml())
    ref = f"{proxy.host}/app:v1"
    r = _optimize(daemon, ref, "--output", str(tmp_path / "trace.json"))
    assert r["status"] == 0 and r["published"] and r["lazy"] == world.lazy
    trace = StartTrace.parse((tmp_path / "trace.json").read_bytes())
    assert len(trace) == r["chunks"] > 0
    bb, data = _layer_digests(world)
    per = trace.per_blob()
    # the start read busybox and a.bin + b.bin (1.2 MB: 10 chunks of 128 KiB at least), never c.bin
    assert per[bb] and 10 <= len(per[data]) <= 13
    store = open_store(f"{world.host}/app", hosts_dirs=[], docker_config="/nonexistent")
    assert [d.digest for d in list_referrers(store, world.lazy, mt.PREFETCH_ARTIFACT_TYPE)] == [r["trace"]]
    assert daemon.json("ls") == []  # the recording's container, mount and device are gone

    _fresh(daemon, world.trust_toml())  # the trace was recorded on this node: trusted without listing it
    proxy.ranges.clear()
    target = tmp_path / "root"
    m = daemon.json("mount", ref, str(target))
    assert f"start trace {r['trace']} ({len(trace)} chunks, converted on this node)" in m["message"]
    _start_in(target)
    dev = _device(daemon, m["id"])
    rp = dev["replay"]
    assert rp["trace_chunks"] == len(trace) and rp["errors"] == 0
    # every chunk of the trace was fetched, by the replay or (first) by a reader; none twice
    for digest in (bb, data):
        spans = sorted(_ranges(proxy, digest))
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), f"a range of {digest} was fetched twice"
    assert dev["fetched_chunks"] == sum(x["fetched_chunks"] for x in dev["layers"])
    assert dev["replayed_chunks"] >= len(per[data])  # (readers may have fetched a few first)
    assert dev["prefetches"] == 0  # no fetch-ahead guessing while a trace says what to fetch
    daemon.cli("umount", str(target))


def test_demand_reads_are_not_delayed_behind_the_replay(world: World, daemon, proxy: FaultProxy,
                                                        tmp_path: Path) -> None:
    """Replay requests crawl (a trickling link); reads of chunks the replay has not started are
    fetched on their own and return while the replay is still on the wire."""
    _, data = _layer_digests(world)
    # a trace that lists c.bin's chunks (the last of the data layer) after a.bin's and b.bin's
    n = len(StartTrace.parse(_fetch_trace(world, daemon, proxy, tmp_path)).per_blob()[data])
    order = [(data, i, i) for i in range(n)] + [(data, i, i) for i in range(n, n + 20)]
    store = open_store(f"{proxy.host}/app", hosts_dirs=[], docker_config="/nonexistent")
    lazy_desc = store.resolve(world.lazy)
    t = publish_start_trace(store, lazy_desc, StartTrace.from_accesses(order).to_bytes())
    _fresh(daemon, world.trust_toml(t.digest, top="trace_inflight = 2\ntrace_run_bytes = 262144\n"
                                                   "trace_window_bytes = 262144\nfetch_deadline_s = 20.0\n"))
    proxy.ranges.clear()
    # the data layer's chunk index (read while attaching), then the two replay requests: ~32 s each
    proxy.inject("trickle", count=3, match=f"/blobs/{data}", piece=4096, seconds=0.5)
    target = tmp_path / "root"
    m = daemon.json("mount", f"{proxy.host}/app:v1", str(target), "--lower-only")
    assert "start trace" in m["message"], m["message"]
    assert proxy.faults_left() == 0 or _wait(lambda: proxy.faults_left() == 0)  # both crawl now
    done = threading.Event()
    got: list[bytes] = []

    def read() -> None:  # c.bin: in the trace, but behind the two crawling requests
        got.append((target / "app" / "c.bin").read_bytes())
        done.set()

    th = threading.Thread(target=read, daemon=True)
    th.start()
    assert done.wait(120), "the demand read never finished"
    rp = _device(daemon, m["id"])["replay"]
    assert rp["workers"] == 2 and rp["fetched_chunks"] == 0 and rp["errors"] == 0, \
        f"the read waited for the replay: {rp}"
    assert len(got[0]) == 3_000_000
    daemon.cli("umount", str(target))


def _wait(pred, timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _fetch_trace(world: World, daemon, proxy: FaultProxy, tmp_path: Path) -> bytes:
    """A recording of START (not published), for tests that build their own traces."""
    daemon.write_config(world.trust_toml())
    _optimize(daemon, f"{proxy.host}/app:v1", "--no-publish", "--output", str(tmp_path / "rec.json"))
    return (tmp_path / "rec.json").read_bytes()


def test_an_untrusted_trace_is_not_replayed_until_allowed(world: World, daemon, proxy: FaultProxy,
                                                          tmp_path: Path) -> None:
    data = _fetch_trace(world, daemon, proxy, tmp_path)
    store = open_store(f"{proxy.host}/app", hosts_dirs=[], docker_config="/nonexistent")
    t = publish_start_trace(store, store.resolve(world.lazy), data, created="2030-01-01T00:00:00Z")  # a stranger's
    _fresh(daemon, world.trust_toml())
    target = tmp_path / "root"
    m = daemon.json("mount", f"{proxy.host}/app:v1", str(target), "--lower-only")
    assert "untrusted" in m["message"] and "replay" not in _device(daemon, m["id"])
    daemon.cli("umount", str(target))
    daemon.cli("trust", "allow", t.digest)  # the node admin vouches for it, as for a lazy image
    _fresh(daemon, world.trust_toml())
    m = daemon.json("mount", f"{proxy.host}/app:v1", str(target), "--lower-only")
    assert f"start trace {t.digest}" in m["message"] and "digest in allow-list" in m["message"]
    assert _device(daemon, m["id"])["replay"]["trace_chunks"] == len(StartTrace.parse(data))
    daemon.cli("umount", str(target))


def test_a_tampered_trace_is_refused_with_a_clear_message(world: World, daemon, proxy: FaultProxy,
                                                          tmp_path: Path) -> None:
    data = _fetch_trace(world, daemon, proxy, tmp_path)
    store = open_store(f"{proxy.host}/app", hosts_dirs=[], docker_config="/nonexistent")
    t = publish_start_trace(store, store.resolve(world.lazy), data, created="2031-01-01T00:00:00Z")
    blob = parse_manifest(store.get_manifest(t.digest)[0]).layers[0].digest
    _fresh(daemon, world.trust_toml(t.digest))
    proxy.inject("corrupt", count=100, match=f"/blobs/{blob}")
    target = tmp_path / "root"
    p = daemon.cli("mount", f"{proxy.host}/app:v1", str(target), "--lower-only")
    assert re.search(rf"start trace {t.digest}.*refused.*digest mismatch", p.stderr), p.stderr
    m = daemon.json("ls")[0]
    assert "replay" not in _device(daemon, m["id"])
    assert (target / "app" / "a.bin").stat().st_size == 700_000  # the device works without it
    daemon.cli("umount", str(target))


def test_from_stats_takes_the_trace_of_a_device_that_ran(world: World, daemon, proxy: FaultProxy,
                                                         tmp_path: Path) -> None:
    daemon.write_config(world.trust_toml())
    target = tmp_path / "root"
    m = daemon.json("mount", f"{proxy.host}/app:v1", str(target))
    subprocess.run(["chroot", str(target), "/bin/cat", "/app/b.bin"], check=True, capture_output=True, timeout=120)
    p = daemon.cli("optimize", "--from-stats", str(target), "--no-publish", "--output", str(tmp_path / "t.json"),
                   "--json")
    r = json.loads(p.stdout)
    assert r["lazy"] == world.lazy and r["reads"] > 0 and not r["published"]
    per = StartTrace.parse((tmp_path / "t.json").read_bytes()).per_blob()
    _, data = _layer_digests(world)
    assert 4 <= len(per[data]) <= 8  # b.bin (500 kB: 4-5 chunks) and a little readahead; not a.bin or c.bin
    assert r["id"] == m["id"]
    daemon.cli("umount", str(target))
