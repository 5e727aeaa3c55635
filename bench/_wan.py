"""A WAN-like registry link for benchmarks: a network namespace of our own, a veth pair shaped with
``tc tbf`` in both directions, and a TCP delay line (this kernel has no netem) in front of a registry
that runs inside the namespace.

Topology (everything on this machine, in a namespace this process creates and deletes)::

    host: bdserver daemon, pullers            netns bdbench-<pid>
    veth <h> 10.213.X.1/30  <--- tbf --->  veth <n> 10.213.X.2/30
                                             delay proxy :5080  ->  docker-registry 127.0.0.1:5000

The delay proxy is a TCP relay that holds every chunk of bytes for RTT/2 in each direction (so a
request/response round trip costs one RTT on top of transfer time) and holds a new connection for one
RTT before relaying (the TCP handshake). It counts the bytes it relays (registry-side bytes) and the
HTTP requests it sees. It runs as ``python bench/_wan.py proxy ...`` inside the namespace and is
controlled by lines on its stdin: ``delay MS`` (round trip), ``stats``, ``reset``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REGISTRY_BIN = os.environ.get("BDSERVER_REGISTRY_BIN", "/usr/bin/docker-registry")
PROXY_PORT = 5080
REGISTRY_PORT = 5000
METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"PATCH ", b"DELETE ")
# The registry and the delay line stand for the far side of a WAN: they should not lose their CPU to the
# machine's other load (a real link does not), so they run at a higher priority than everything else.
NICE = ["nice", "-n", "-10"]


def _run(cmd: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


class WanLink:
    """netns + veth (+ tbf) + registry + delay proxy. ``close()`` undoes everything it made."""

    def __init__(self, workdir: Path, tag: str | None = None) -> None:
        self.tag = tag or str(os.getpid())
        self.ns = f"bdbench-{self.tag}"
        self.veth_h = f"bdb{self.tag}h"[:15]
        self.veth_n = f"bdb{self.tag}n"[:15]
        self.workdir = workdir
        self.host_ip = self.ns_ip = ""
        self.registry: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None
        self._plock = threading.Lock()
        self._made_ns = self._made_veth = False
        self.shaped = ""

    # -- setup --------------------------------------------------------------------------------
    def _pick_subnet(self) -> int:
        used = _run(["ip", "-4", "-o", "addr"]).stdout + _run(["ip", "-4", "route"]).stdout
        base = os.getpid() % 250
        for k in range(250):
            x = (base + k) % 250 + 1
            if f"10.213.{x}." not in used:
                return x
        raise RuntimeError("no free 10.213.X.0/30 subnet")

    def up(self) -> None:
        x = self._pick_subnet()
        self.host_ip, self.ns_ip = f"10.213.{x}.1", f"10.213.{x}.2"
        _run(["ip", "netns", "add", self.ns])
        self._made_ns = True
        _run(["ip", "link", "add", self.veth_h, "type", "veth", "peer", "name", self.veth_n])
        self._made_veth = True
        _run(["ip", "link", "set", self.veth_n, "netns", self.ns])
        _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth_h])
        _run(["ip", "link", "set", self.veth_h, "up"])
        _run(["ip", "-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.veth_n])
        _run(["ip", "-n", self.ns, "link", "set", self.veth_n, "up"])
        _run(["ip", "-n", self.ns, "link", "set", "lo", "up"])
        self._start_registry()
        self._start_proxy()
        self._wait_registry()

    def _start_registry(self) -> None:
        storage = self.workdir / "registry"
        storage.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "registry.yml"
        cfg.write_text(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{REGISTRY_PORT}\n")
        log = open(self.workdir / "registry.log", "ab")
        self.registry = subprocess.Popen(["ip", "netns", "exec", self.ns, *NICE, REGISTRY_BIN, "serve", str(cfg)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def _start_proxy(self) -> None:
        err = open(self.workdir / "proxy.log", "ab")
        self.proxy = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *NICE, sys.executable, str(Path(__file__).resolve()), "proxy",
             "--listen", f"{self.ns_ip}:{PROXY_PORT}", "--upstream", f"127.0.0.1:{REGISTRY_PORT}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        err.close()
        line = self._readline(20)
        if line.strip() != "ready":
            raise RuntimeError(f"delay proxy did not start: {line!r}")

    def _readline(self, timeout: float) -> str:
        assert self.proxy is not None and self.proxy.stdout is not None
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(self.proxy.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not out:
            raise RuntimeError("delay proxy does not answer")
        return out[0]

    def _wait_registry(self, timeout: float = 30) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.registry is not None and self.registry.poll() is not None:
                raise RuntimeError("docker-registry exited: " + (self.workdir / "registry.log").read_text()[-500:])
            try:
                if httpx.get(f"http://{self.host}/v2/", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("registry behind the delay proxy did not answer within 30 s")

    @property
    def host(self) -> str:
        return f"{self.ns_ip}:{PROXY_PORT}"

    # -- shaping ------------------------------------------------------------------------------
    def shape(self, rate: str = "100mbit", rtt_ms: float = 20.0) -> None:
        """tbf on both veth ends (egress each way) and RTT in the delay proxy."""
        for pre in ([], ["-n", self.ns]):
            dev = self.veth_n if pre else self.veth_h
            _run(["tc", *pre, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kbit",
                  "latency", "400ms"])
        self.control(f"delay {rtt_ms}")
        self.shaped = f"{rate}, {rtt_ms:g} ms RTT"

    def unshape(self) -> None:
        for pre in ([], ["-n", self.ns]):
            dev = self.veth_n if pre else self.veth_h
            _run(["tc", *pre, "qdisc", "del", "dev", dev, "root"], check=False)
        self.control("delay 0")
        self.shaped = ""

    def control(self, cmd: str) -> dict:
        with self._plock:
            assert self.proxy is not None and self.proxy.stdin is not None
            self.proxy.stdin.write(cmd + "\n")
            self.proxy.stdin.flush()
            return json.loads(self._readline(10))

    def probe_rtt(self, n: int = 5) -> float:
        """Median seconds of a small request (GET /v2/) on one kept-alive connection through the link."""
        import http.client

        h, p = self.host.rsplit(":", 1)
        c = http.client.HTTPConnection(h, int(p), timeout=10)
        ts = []
        try:
            for _ in range(n + 1):
                t = time.perf_counter()
                c.request("GET", "/v2/")
                c.getresponse().read()
                ts.append(time.perf_counter() - t)
        finally:
            c.close()
        ts = sorted(ts[1:])  # the first one also pays the connection's handshake
        return ts[len(ts) // 2]

    def stats(self) -> dict:
        return self.control("stats")

    def reset(self) -> dict:
        return self.control("reset")

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        for p in (self.proxy, self.registry):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        self.proxy = self.registry = None
        if self._made_veth:
            _run(["ip", "link", "del", self.veth_h], check=False)
            self._made_veth = False
        if self._made_ns:
            _run(["ip", "netns", "del", self.ns], check=False)
            self._made_ns = False


# -- the delay proxy (runs inside the namespace) ------------------------------------------------
class _Proxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.rtt = 0.0
        self.s = {"connections": 0, "requests": 0, "up_bytes": 0, "down_bytes": 0}

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, key: str) -> None:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue(maxsize=128)

        async def reader() -> None:
            while True:
                try:
                    data = await r.read(65536)
                except (ConnectionError, OSError):
                    data = b""
                self.s[key] += len(data)
                if key == "up_bytes" and data.startswith(METHODS):
                    self.s["requests"] += 1
                await q.put((loop.time() + self.rtt / 2, data))
                if not data:
                    return

        async def writer() -> None:
            while True:
                due, data = await q.get()
                dt = due - loop.time()
                if dt > 0:
                    await asyncio.sleep(dt)
                try:
                    if not data:
                        if w.can_write_eof():
                            w.write_eof()
                        return
                    w.write(data)
                    await w.drain()
                except (ConnectionError, OSError):
                    return

        await asyncio.gather(reader(), writer())

    async def handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.s["connections"] += 1
        if self.rtt:
            await asyncio.sleep(self.rtt)  # the TCP handshake's round trip
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            cw.close()
            return
        try:
            await asyncio.gather(self._pipe(cr, uw, "up_bytes"), self._pipe(ur, cw, "down_bytes"))
        finally:
            for w in (uw, cw):
                try:
                    w.close()
                except Exception:  # noqa: BLE001
                    pass

    def command(self, line: str) -> dict:
        parts = line.split()
        if parts and parts[0] == "delay":
            self.rtt = float(parts[1]) / 1000.0
        elif parts and parts[0] == "reset":
            self.s = {k: 0 for k in self.s}
        return {**self.s, "rtt_ms": self.rtt * 1000}


async def _proxy_main(listen: str, upstream: str) -> None:
    host, port = listen.rsplit(":", 1)
    uh, up = upstream.rsplit(":", 1)
    p = _Proxy((uh, int(up)))
    server = await asyncio.start_server(p.handle, host, int(port), reuse_address=True)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def stdin_thread() -> None:
        for line in sys.stdin:
            fut = asyncio.run_coroutine_threadsafe(_cmd(p, line), loop)
            print(json.dumps(fut.result()), flush=True)
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=stdin_thread, daemon=True).start()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    print("ready", flush=True)
    async with server:
        await done.wait()


async def _cmd(p: _Proxy, line: str) -> dict:
    return p.command(line)


if __name__ == "__main__" and sys.argv[1:2] == ["proxy"]:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--upstream", required=True)
    a = ap.parse_args()
    asyncio.run(_proxy_main(a.listen, a.upstream))
