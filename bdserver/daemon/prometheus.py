"""The Prometheus endpoint (config `metrics_address`, off by default): loopback TCP or a unix socket.

`DaemonCollector` keeps no counters of its own: at each scrape it reads the ones the daemon and
the read path already keep (MeteredDevice, FetchStats, the layers' LatencyWindow histograms, the
node cache, Events), so the exposition can never drift from `bdserver stats`. Labels are bounded
by what is attached: `device` (bd0...) and `image` (the reference it was attached as); a detached
device disappears from the next scrape. Never a chunk, offset or URL label.

The endpoint binds exactly the configured address (config.ListenAddress refuses anything but
127.0.0.0/8, ::1 and unix:PATH); a unix socket is created 0600, owned by root, like the control
socket. A failure to bind is logged and the daemon serves its devices anyway: Prometheus sees the
target down, which is the alert.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import stat
import threading
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from bdserver.config import Config, ListenAddress
from bdserver.vdev.stats import LatencyHistogram

if TYPE_CHECKING:
    from bdserver.daemon.manager import DeviceManager
    from bdserver.daemon.metrics import MeteredDevice
    from bdserver.images.services import NodeServices

log = logging.getLogger(__name__)

DEVICE = ["device", "image"]

# (metric name, help, where the value is in `bdserver stats --json` (the device's "stats"))
_DEVICE_COUNTERS = [
    ("bdserver_device_reads", "Reads the kernel asked of the device.", ("reads",)),
    ("bdserver_device_read_bytes", "Bytes the device returned to the kernel.", ("bytes_read",)),
    ("bdserver_device_read_errors", "Reads that failed (EIO to the kernel).", ("read_errors",)),
    ("bdserver_device_chunk_hits", "Chunk lookups served by the node cache.", ("device", "chunk_hits")),
    ("bdserver_device_chunk_misses", "Chunk lookups that missed the node cache.", ("device", "chunk_misses")),
    ("bdserver_fetch_requests", "Range requests sent to the registry (fetch-ahead included).", ("device", "fetches")),
    ("bdserver_fetch_bytes", "Bytes received from the registry (compressed, as on the wire).",
     ("device", "fetched_bytes")),
    ("bdserver_fetch_chunks", "Chunks fetched from the registry.", ("device", "fetched_chunks")),
    ("bdserver_fetch_errors", "Range requests that failed after their retries.", ("device", "fetch_errors")),
    ("bdserver_verification_failures", "Chunks that failed verification against their digest (never served).",
     ("device", "integrity_errors")),
    ("bdserver_cache_store_errors", "Fetched chunks the node cache could not keep (served anyway).",
     ("device", "cache_put_errors")),
    ("bdserver_prefetch_bytes", "Bytes fetched ahead of the kernel's reads (uncompressed).",
     ("device", "prefetched_bytes")),
    ("bdserver_prefetch_useful_bytes", "Bytes fetched ahead that a read later used (uncompressed).",
     ("device", "prefetch_used_bytes")),
    ("bdserver_prefetch_errors", "Fetch-ahead requests that failed (readers fetch those chunks themselves).",
     ("device", "prefetch_errors")),
    ("bdserver_replay_requests", "Range requests replaying a trusted start trace (also in fetch_requests).",
     ("device", "replay_fetches")),
    ("bdserver_replay_chunks", "Chunks fetched by start-trace replay.", ("device", "replayed_chunks")),
    ("bdserver_replay_useful_chunks", "Replayed chunks a read later used (the rest is waste).",
     ("device", "replay_used")),
    ("bdserver_replay_errors", "Replay requests that failed (readers fetch those chunks themselves).",
     ("device", "replay_errors")),
]

# (metric name, help, key of ChunkCache.stats(), counter?)
_CACHE = [
    ("bdserver_cache_hits", "Chunk reads served by the node cache (all devices).", "hits", True),
    ("bdserver_cache_misses", "Chunk reads the node cache could not serve.", "misses", True),
    ("bdserver_cache_hit_bytes", "Bytes served by the node cache.", "hit_bytes", True),
    ("bdserver_cache_stored_bytes", "Bytes written into the node cache.", "put_bytes", True),
    ("bdserver_cache_evicted_bytes", "Bytes evicted from the node cache to stay under its cap.", "evicted_bytes", True),
    ("bdserver_cache_nospace_errors", "Cache writes refused for lack of disk space.", "nospace", True),
    ("bdserver_cache_used_bytes", "Bytes the node cache holds.", "used_bytes", False),
    ("bdserver_cache_capacity_bytes", "The node cache's size cap.", "cap_bytes", False),
]


def _get(d: dict[str, Any], path: tuple[str, ...]) -> float:
    v: Any = d
    for k in path:
        v = v.get(k, 0) if isinstance(v, dict) else 0
    return float(v) if isinstance(v, (int, float)) else 0.0


def _add_histogram(family: HistogramMetricFamily, labels: list[str], h: LatencyHistogram) -> None:
    buckets, total = [], 0
    for bound, n in zip([*map(str, h.bounds), "+Inf"], h.counts):
        total += n
        buckets.append((bound, float(total)))
    family.add_metric(labels, buckets, h.sum)


def _fetch_histogram(metered: MeteredDevice) -> LatencyHistogram:
    """The device's layers' fetch latencies (each layer keeps its own, where its fetches complete)."""
    out = LatencyHistogram.empty()
    for seg in getattr(metered.inner, "segments", ()):
        window = getattr(seg.source, "fetch_latency", None)
        if window is not None:
            out = out + window.histogram()
    return out


class DaemonCollector:
    """Reads the daemon's counters at scrape time (see the module docstring)."""

    def __init__(self, mgr: DeviceManager, services: NodeServices) -> None:
        self.mgr = mgr
        self.services = services

    def collect(self) -> Iterator[Metric]:
        mgr = self.mgr
        with mgr.lock:
            devices = mgr.ls()
            metered = {i: live.metered for i, live in mgr.live.items()}
            digests = {i: r.pin.get("lazy") or r.pin.get("source") or "" for i, r in mgr.records.items()}
        yield from self._devices(devices, metered, digests)
        yield from self._node()

    def _devices(self, devices: list[dict[str, Any]], metered: dict[str, MeteredDevice],
                 digests: dict[str, str]) -> Iterator[Metric]:
        info = GaugeMetricFamily("bdserver_device_info", "A device in the daemon's state (value 1) and what it serves.",
                                 labels=[*DEVICE, "backend", "kind", "image_digest"])
        count = GaugeMetricFamily("bdserver_devices", "Devices in the daemon's state, by backend, kind and status.",
                                  labels=["backend", "kind", "status"])
        size = GaugeMetricFamily("bdserver_device_size_bytes", "Size of the device.", labels=DEVICE)
        counters = [(CounterMetricFamily(n, h, labels=DEVICE), path) for n, h, path in _DEVICE_COUNTERS]
        read_lat = HistogramMetricFamily("bdserver_device_read_latency_seconds",
                                         "Time to answer the kernel's reads (cache hits and fetches).", labels=DEVICE)
        fetch_lat = HistogramMetricFamily("bdserver_fetch_latency_seconds",
                                          "Time of successful range requests to the registry, verification included.",
                                          labels=DEVICE)
        by_status: dict[tuple[str, str, str], int] = {}
        for d in devices:
            key = (d["backend"] or "", d["kind"] or "", d["status"] or "")
            by_status[key] = by_status.get(key, 0) + 1
            labels = [d["id"], d["ref"]]
            info.add_metric([*labels, *key[:2], digests.get(d["id"], "")], 1)
            m = metered.get(d["id"])
            if m is None:
                continue
            s = m.stats()
            size.add_metric(labels, m.size)
            for family, path in counters:
                family.add_metric(labels, _get(s, path))
            _add_histogram(read_lat, labels, m.latency.histogram())
            _add_histogram(fetch_lat, labels, _fetch_histogram(m))
        for key, n in sorted(by_status.items()):
            count.add_metric(list(key), n)
        yield from (info, count, size, *(f for f, _ in counters), read_lat, fetch_lat)

    def _node(self) -> Iterator[Metric]:
        cache = self.services.cache_stats()  # {} until a lazy device opened the cache
        for name, help_, key, is_counter in _CACHE if cache else ():
            fam = CounterMetricFamily(name, help_) if is_counter else GaugeMetricFamily(name, help_)
            fam.add_metric([], float(cache.get(key, 0)))
            yield fam
        recoveries = self.mgr.events.snapshot("recovery")
        fam = CounterMetricFamily("bdserver_recoveries", "Devices taken back from saved state at daemon start, "
                                  "by outcome.", labels=["outcome"])
        for outcome in ("ok", "failed"):
            fam.add_metric([outcome], recoveries.get((outcome,), 0))
        yield fam
        fam = CounterMetricFamily("bdserver_requests", "Control socket requests, by operation and outcome.",
                                  labels=["op", "outcome"])
        for values, n in sorted(self.mgr.events.snapshot("request").items()):
            fam.add_metric(list(values), n)
        yield fam
        conv = CounterMetricFamily("bdserver_conversions", "Images converted on the node (no trusted lazy image), "
                                   "by outcome.", labels=["outcome"])
        for outcome, n in sorted(self.services.conversions.counts.items()):
            conv.add_metric([outcome], n)
        yield conv


def build_registry(mgr: DeviceManager, services: NodeServices) -> CollectorRegistry:
    """The daemon's collector plus the process, platform and GC metrics of this process."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DaemonCollector(mgr, services))  # type: ignore[arg-type]
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    return reg


# -- the HTTP endpoint -------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: Any  # one of the servers below, with .registry
    timeout = 10  # a client that stalls mid-request does not hold a thread for long

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        encode, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encode(self.server.registry)
        except Exception:  # noqa: BLE001 - a scrape never takes the daemon down
            log.exception("metrics scrape failed")
            self.send_error(500, "collecting metrics failed; see the daemon log")
            return
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not log events
        pass


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    registry: CollectorRegistry


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    registry: CollectorRegistry


def _bind_unix(path: str) -> _UnixServer:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):  # a stale socket of ours; never delete anything else
            os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o177)  # born 0600: no window where another user could connect
    try:
        srv = _UnixServer(path, _Handler)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    os.chown(path, 0, 0)
    return srv


class MetricsEndpoint:
    """A running endpoint: `close()` stops it (and removes its unix socket)."""

    def __init__(self, address: ListenAddress, registry: CollectorRegistry) -> None:
        self.address = address
        if address.path:
            self._srv: socketserver.BaseServer = _bind_unix(address.path)
        else:
            cls = _TCP6Server if ":" in address.host else _TCPServer
            self._srv = cls((address.host, address.port), _Handler)
        self._srv.registry = registry  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics-endpoint", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
        if self.address.path:
            try:
                os.unlink(self.address.path)
            except OSError:
                pass


def start_metrics(cfg: Config, mgr: DeviceManager, services: NodeServices) -> MetricsEndpoint | None:
    """The endpoint `cfg.metrics_address` asks for, or None (off, or it could not bind: logged)."""
    if not cfg.metrics_address:
        return None
    address = ListenAddress.parse(cfg.metrics_address)
    try:
        endpoint = MetricsEndpoint(address, build_registry(mgr, services))
    except OSError as exc:
        log.error("metrics endpoint %s not started: %s (devices are served anyway)", cfg.metrics_address, exc)
        return None
    log.info("metrics endpoint on %s", cfg.metrics_address)
    return endpoint
