#!/usr/bin/env python3
"""Read throughput and cold start of a lazily attached image, side by side with the baselines.

1. Warm reads: the FUSE device (the file `bdserver attach --backend fuse` exposes, EROFS mounted
   file-backed) against a loop device over the SAME device bytes (the FUSE disk dumped to a file
   once, `losetup -r`, EROFS mounted from the loop device). bdserver's chunk cache is warm (every
   chunk on the local cache disk); the page cache is dropped before every run on both sides.
   Rows: raw device reads (sequential 1 MiB), every file of the tree read sequentially, random 4 KiB
   preads across the big files (1 and 8 threads). Target: warm sequential >= 0.8x loop.
2. Cold start over a WAN-like link (100 Mbit/s tbf both ways + 20 ms RTT from a delay proxy, in a
   network namespace of this run; see bench/_wan.py): `bdserver mount REF DIR` with an empty chunk
   cache (the daemon is started fresh before each run, its startup timed separately) until the
   start (`python3 -c 1`; with `--image app` the imports of numpy, scipy, pandas, matplotlib) is
   done in `chroot DIR`, twice: without a start trace (fetch-ahead after misses) and replaying the
   trace `bdserver optimize` recorded (under runc, before the cold runs); against pull-and-unpack
   of the same image over the same link (parallel HTTP GETs of the compressed layers, `tar -xzf` of
   each layer, the same start). Also a streamed baseline (each layer piped from the GET into
   `tar -xz`). Targets: <= 0.18x without a trace, <= 0.12x with one (`--image app`: <= 0.15x with
   one). Per start: range requests, bytes fetched (bdserver's stats and the proxy's count), bytes
   the kernel read, chunks fetched ahead that were used and wasted; and what the start reads on a
   loop device with 128 KiB readahead (no bdserver), compressed (bench/_startreads.py), against
   which the bytes fetched with a trace have a target of <= 1.3x.

Run (root): ``.venv/bin/python bench/read.py [--quick] [--json] [--skip-wan] [--runs N]
[--image big|sample|app] [--no-trace] [--config KEY=VALUE]``. Every figure is the median of N runs (default 3); other people's work on the
machine makes single runs noisy. Namespaces, mounts, loop devices and the daemon this run started are
removed at the end, also on failure or Ctrl-C.

Backends: `--backend fuse` (here); `--backend tcmu|ublk` in the lab (`vagrant/lab -- .venv/bin/python
bench/read.py --backend tcmu --skip-wan`). The measurements take a device path (a file or a block
device); bench/read_tcmu.py compares a raw TCMU disk with a loop device without the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _startreads import start_reads  # noqa: E402
from _wan import WanLink  # noqa: E402

PY = sys.executable
BD = [PY, "-m", "bdserver.cli"]
MiB = 1 << 20
REPO_NAME = "bench/python"
LOG: list[str] = []


def say(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    LOG.append(line)
    print(line, file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float = 300, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    return r


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- the image ---------------------------------------------------------------------------------
# the start measured on each image (chrooted, and recorded by `bdserver optimize` under runc)
START_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
             "MPLCONFIGDIR": "/tmp/matplotlib"}


def workload(kind: str) -> list[str]:
    if kind == "app":
        from scripts.app_image import APP_START

        return APP_START
    return ["/usr/bin/python3", "-c", "1"]


def bench_image(kind: str) -> Path:
    """``sample``: the demo image (Debian minbase + Python). ``big``: the same plus a layer of four
    16 MiB files of half-random data (~33 MB gzip), so the image is about the issue's 89 MB
    reference and random reads have big files to hit; python3 -c 1 never reads that layer."""
    from scripts.sample_image import sample_image
    from tests.fixtures.layers import GNU_TAR, PAX_OPT, _build_once, build_oci_layout

    if kind == "app":
        from scripts.app_image import app_image

        return app_image()
    sample = sample_image()
    if kind == "sample":
        return sample
    src = sample.parent

    def build(d: Path) -> None:
        root = d / "data"
        (root / "opt" / "bench-data").mkdir(parents=True)
        rnd = random.Random(42)
        for i in range(4):
            with open(root / "opt" / "bench-data" / f"blob{i}.bin", "wb") as f:
                for _ in range(16 * MiB // 4096):
                    f.write(rnd.randbytes(2048) + bytes(2048))
        for p in [*root.rglob("*"), root]:
            os.utime(p, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
        subprocess.run(GNU_TAR + [PAX_OPT, "--format=posix", "--mtime=@1700000000", "-czf",
                                  str(d / "3-data.tar.gz"), "-C", str(root), "./opt"], check=True)
        shutil.rmtree(root)
        build_oci_layout([src / "1-debian.tar.gz", src / "2-python.tar.gz", d / "3-data.tar.gz"], d / "layout")

    key = hashlib.sha256(str(sample).encode() + b"data-v1").hexdigest()[:16]
    return _build_once("bench-read-image", key, build) / "layout"


def image_layers(layout: Path) -> list[dict[str, Any]]:
    idx = json.loads((layout / "index.json").read_text())
    man = json.loads((layout / "blobs" / idx["manifests"][0]["digest"].replace(":", "/")).read_text())
    return man["layers"]


# -- the daemon --------------------------------------------------------------------------------
class Daemon:
    """An isolated bdserver daemon (own state dir, run dir, socket, cache dir) that we start and stop
    by pid. A fresh cache dir per start gives a cold cache."""

    def __init__(self, work: Path, run_dir: Path, hosts_dir: Path) -> None:
        self.state = work / "state"
        self.run_dir = run_dir
        self.config = work / "config.toml"
        self.base_config = (f'state_dir = "{self.state}"\nrun_dir = "{run_dir}"\nhosts_dir = "{hosts_dir}"\n'
                            f'backend = "fuse"\ndocker_config = "/nonexistent/config.json"\n')
        self.configure("")
        os.environ["BDSERVER_CONFIG"] = str(self.config)
        for k in ("BDSERVER_STATE_DIR", "BDSERVER_RUN_DIR", "BDSERVER_SOCKET", "BDSERVER_CACHE_DIR"):
            os.environ.pop(k, None)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.cache_dir: Path | None = None

    def configure(self, extra: str) -> None:
        """Config keys (TOML lines) on top of the isolation ones; read by the next start."""
        self.config.write_text(self.base_config + extra)

    def start(self, fresh_cache: bool = True) -> float:
        """Start the daemon; seconds until it answers on its socket."""
        from bdserver.daemon.client import ping
        from bdserver.config import load_config

        self.starts += 1
        if fresh_cache or self.cache_dir is None:
            if self.cache_dir is not None:
                shutil.rmtree(self.cache_dir, ignore_errors=True)
            self.cache_dir = self.state.parent / f"cache{self.starts}"
            shutil.rmtree(self.state / "manifests", ignore_errors=True)  # saved lazy manifests: cold node
        env = {**os.environ, "BDSERVER_CACHE_DIR": str(self.cache_dir)}
        self.state.mkdir(parents=True, exist_ok=True)
        out = open(self.state / "daemon.out", "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(BD + ["serve"], env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=out, start_new_session=True)
        out.close()
        cfg = load_config(str(self.config))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if ping(cfg) is not None:
                return time.perf_counter() - t0
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}); see {self.state}/daemon.out")
            time.sleep(0.01)
        raise RuntimeError("daemon did not answer within 30 s")

    def cli(self, *args: str, timeout: float = 300) -> Any:
        r = run(BD + list(args) + ["--json"], timeout=timeout)
        return json.loads(r.stdout) if r.stdout.strip() else {}

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                for d in self.cli("ls", timeout=30):  # never leave devices for the next daemon to recover
                    for m in d.get("mounts", []):
                        run(BD + ["umount", m], timeout=60, check=False)
                    run(BD + ["detach", d["id"]], timeout=60, check=False)
            run(BD + ["stop"], timeout=30, check=False)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            (self.state / "state.json").unlink()


# -- mounts we make ----------------------------------------------------------------------------
def mountinfo_targets() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            out.append(line.split()[4].encode().decode("unicode_escape"))
    return out


def umount_under(*prefixes: Path) -> None:
    """Unmount every mount whose target is at or under one of OUR prefixes, deepest first."""
    pre = [str(p) for p in prefixes]
    for _ in range(5):
        mine = sorted({t for t in mountinfo_targets() if any(t == p or t.startswith(p + "/") for p in pre)},
                      key=len, reverse=True)
        if not mine:
            return
        for t in mine:
            if run(["umount", t], timeout=30, check=False).returncode != 0:
                run(["umount", "-l", t], timeout=30, check=False)


def mount_erofs(source: str, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "erofs", "-o", "ro,nodev", source, str(target)], timeout=60)


# -- measurements (each takes a path: a device file, a block device, a mounted tree) -----------
def raw_seq(path: str, chunk: int = MiB) -> tuple[float, int]:
    """(bytes/s, bytes) of one buffered sequential pass with ``chunk``-byte reads."""
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(chunk)
    n = 0
    try:
        t0 = time.perf_counter()
        while True:
            k = os.readv(fd, [buf])
            if k <= 0:
                break
            n += k
        return n / (time.perf_counter() - t0), n
    finally:
        os.close(fd)


def tree_read(root: Path) -> tuple[float, int, int]:
    """(bytes/s, bytes, files): walk the tree (sorted) and read every regular file with 1 MiB reads."""
    buf = bytearray(MiB)
    total = files = 0
    t0 = time.perf_counter()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if not stat.S_ISREG(os.lstat(p).st_mode):
                continue  # symlinks, device nodes, fifos, sockets
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                files += 1
                while True:
                    k = os.readv(fd, [buf])
                    if k <= 0:
                        break
                    total += k
            finally:
                os.close(fd)
    return total / (time.perf_counter() - t0), total, files


def big_files(root: Path, min_size: int = MiB) -> list[tuple[str, int]]:
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            s = os.path.getsize(p)
            if s >= min_size:
                out.append((os.path.relpath(p, root), s))
    return sorted(out)


def rand_4k(root: Path, files: list[tuple[str, int]], ops: int, threads: int, seed: int = 7) -> float:
    """4 KiB preads per second at block-aligned offsets of files picked by size (page cache as is)."""
    fds = [os.open(root / rel, os.O_RDONLY) for rel, _ in files]
    sizes = [s for _, s in files]
    plan_rng = random.Random(seed)
    plan = []
    for _ in range(ops):
        i = plan_rng.choices(range(len(files)), weights=sizes)[0]
        plan.append((fds[i], plan_rng.randrange(sizes[i] // 4096) * 4096))
    per = [plan[k::threads] for k in range(threads)]

    def worker(items: list[tuple[int, int]]) -> None:
        for fd, off in items:
            os.pread(fd, 4096, off)

    try:
        ths = [threading.Thread(target=worker, args=(p,)) for p in per]
        t0 = time.perf_counter()
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        return ops / (time.perf_counter() - t0)
    finally:
        for fd in fds:
            os.close(fd)


def read_files(paths: list[Path]) -> None:
    """Bring files into the page cache (the backing store of a device: its cache dir, its image)."""
    buf = bytearray(MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def backing_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()]


def cpu_pressure() -> float:
    """% of the last 10 s in which some runnable task waited for a CPU (PSI), -1 if unknown."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(line.split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return -1.0


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def warm_compare(dev_path: str, loop_dev: str, mnt_dev: Path, mnt_loop: Path, runs: int, quick: bool,
                 dev_backing: list[Path], loop_backing: list[Path], dev_cpu: Callable[[], float] | None = None,
                 dev_reads: Callable[[], int] | None = None) -> list[dict[str, Any]]:
    """The same measurements on the device under test and on the loop device, alternating, page cache
    dropped before every single measurement (rows marked "hot backing": then the files behind each
    device, bdserver's chunk cache files and the loop's image file, are read back into the page cache
    before the run, so only the layers in between are measured). ``dev_reads`` (the daemon's count of
    device reads, i.e. kernel requests) gives the daemon CPU per request, which other load on the
    machine barely changes, unlike the rates. Returns rows."""
    sides = {"dev": (dev_path, mnt_dev), "loop": (loop_dev, mnt_loop)}
    backing = {"dev": dev_backing, "loop": loop_backing}
    files = big_files(mnt_loop)
    if big_files(mnt_dev) != files:
        raise RuntimeError("the two mounts disagree on their big files")
    ops1 = 1000 if quick else 3000
    ops8 = 2000 if quick else 6000
    tests: list[tuple[str, str, Callable[[str, Path], float]]] = [
        ("raw device, sequential 1 MiB reads", "MB/s", lambda d, m: raw_seq(d)[0] / 1e6),
        ("tree, every file read in order", "MB/s", lambda d, m: tree_read(m)[0] / 1e6),
        (f"random 4 KiB pread, 1 thread ({len(files)} files >= 1 MiB)", "IOPS",
         lambda d, m: rand_4k(m, files, ops1, 1)),
        ("random 4 KiB pread, 8 threads", "IOPS", lambda d, m: rand_4k(m, files, ops8, 8)),
        ("hot backing: raw device, sequential 1 MiB reads", "MB/s", lambda d, m: raw_seq(d)[0] / 1e6),
        ("hot backing: random 4 KiB pread, 1 thread", "IOPS", lambda d, m: rand_4k(m, files, ops1, 1)),
    ]
    rows = []
    for name, unit, fn in tests:
        vals: dict[str, list[float]] = {"dev": [], "loop": []}
        cpu: list[float] = []  # daemon CPU seconds per run of the device side
        secs: list[float] = []
        per_read: list[float] = []  # daemon CPU seconds per device read (one kernel request)
        for r in range(runs):
            order = ("dev", "loop") if r % 2 == 0 else ("loop", "dev")
            for side in order:
                drop_caches()
                if name.startswith("hot backing"):
                    read_files(backing[side])
                n0 = dev_reads() if dev_reads and side == "dev" else 0  # before c0: the query costs CPU too
                c0, t0 = (dev_cpu() if dev_cpu and side == "dev" else 0.0), time.perf_counter()
                vals[side].append(fn(*sides[side]))
                if dev_cpu and side == "dev":
                    cpu.append(dev_cpu() - c0)
                    secs.append(time.perf_counter() - t0)
                    if dev_reads:
                        per_read.append(cpu[-1] / max(1, dev_reads() - n0))
        rows.append({"test": name, "unit": unit, "dev": vals["dev"], "loop": vals["loop"],
                     "dev_median": med(vals["dev"]), "loop_median": med(vals["loop"]),
                     "ratio": med(vals["dev"]) / med(vals["loop"]),
                     "ratio_best": max(vals["dev"]) / max(vals["loop"]),
                     "daemon_cpu_share": med([c / t for c, t in zip(cpu, secs)]) if cpu else None,
                     "daemon_us_per_read": med(per_read) * 1e6 if per_read else None,
                     "loadavg": os.getloadavg()[0], "cpu_pressure": cpu_pressure()})
        say(f"  {name}: dev {med(vals['dev']):.0f} loop {med(vals['loop']):.0f} {unit} "
            f"(dev {[round(v) for v in vals['dev']]}, loop {[round(v) for v in vals['loop']]}); daemon CPU "
            f"{rows[-1]['daemon_cpu_share'] or 0:.2f} cores, {rows[-1]['daemon_us_per_read'] or 0:.0f} us per "
            f"request; load {rows[-1]['loadavg']:.1f}")
    tr = tree_read(mnt_loop)
    rows.append({"info": f"tree: {tr[2]} files, {tr[1] / 1e6:.1f} MB in regular files"})
    return rows


def attacher(backend: str) -> Callable[[Daemon, str], contextlib.AbstractContextManager[str]]:
    """`bdserver attach REF --backend NAME`: yields the device (file or block device), detaches at the end.

    fuse runs here; tcmu and ublk need the lab (`vagrant/lab -- .venv/bin/python bench/read.py
    --backend tcmu --skip-wan`), whose kernel has their modules.
    """

    @contextlib.contextmanager
    def attach(daemon: Daemon, ref: str) -> Iterator[str]:
        r = daemon.cli("attach", ref, "--backend", backend)
        try:
            yield r["path"]
        finally:
            run(BD + ["detach", r["id"]], timeout=60, check=False)

    return attach


ATTACHERS: dict[str, Callable[[Daemon, str], contextlib.AbstractContextManager[str]]] = {
    name: attacher(name) for name in ("fuse", "tcmu", "ublk")}


def warm_bench(daemon: Daemon, ref: str, work: Path, backend: str, runs: int, quick: bool) -> dict[str, Any]:
    say(f"warm: attach {ref} --backend {backend}, dump the device once (fills the chunk cache)")
    img = work / "device.img"
    loop_dev = ""
    out: dict[str, Any] = {}
    with ATTACHERS[backend](daemon, ref) as dev_path:
        try:
            t0 = time.perf_counter()
            with open(dev_path, "rb") as src, open(img, "wb") as dst:
                shutil.copyfileobj(src, dst, MiB)
            el = time.perf_counter() - t0
            size = img.stat().st_size
            out["device_bytes"] = size
            out["first_read_mb_s"] = size / el / 1e6
            say(f"  device {size / 1e6:.1f} MB dumped in {el:.1f} s ({size / el / 1e6:.1f} MB/s, cold: "
                f"fetch+verify+decompress+cache over the unshaped link)")
            loop_dev = run(["losetup", "--find", "--show", "--read-only", str(img)]).stdout.strip()
            mount_erofs(dev_path, work / "mnt-dev")
            mount_erofs(loop_dev, work / "mnt-loop")
            assert daemon.cache_dir is not None
            out["rows"] = warm_compare(dev_path, loop_dev, work / "mnt-dev", work / "mnt-loop", runs, quick,
                                       backing_files(daemon.cache_dir), [img],
                                       lambda: proc_cpu_s(daemon.proc.pid) if daemon.proc else 0.0,
                                       lambda: sum(d["stats"]["reads"] for d in daemon.cli("stats")))
        finally:
            umount_under(work / "mnt-dev", work / "mnt-loop")
            if loop_dev:
                run(["losetup", "-d", loop_dev], check=False)
            with contextlib.suppress(FileNotFoundError):
                img.unlink()
    return out


# -- cold start --------------------------------------------------------------------------------
def device_figures(stats: Any) -> dict[str, Any]:
    """What one cold start cost, from `bdserver stats` of its device: requests and bytes on the wire,
    bytes the kernel read, and how much of what was fetched ahead (fetch-ahead, replay) was used."""
    devs = stats if isinstance(stats, list) else stats.get("devices", [])
    s = devs[0].get("stats", {}) if devs else {}
    d = s.get("device", {})
    ahead = d.get("prefetched_chunks", 0) + d.get("replayed_chunks", 0)
    used = d.get("prefetch_used", 0) + d.get("replay_used", 0)
    return {"fetched_bytes": d.get("fetched_bytes", 0), "fetches": d.get("fetches", 0),
            "fetched_chunks": d.get("fetched_chunks", 0), "kernel_read_bytes": s.get("bytes_read", 0),
            "kernel_reads": s.get("reads", 0), "ahead_chunks": ahead, "ahead_used": used,
            "ahead_wasted": ahead - used, "replay": d.get("replay", {}), "device_bytes": d.get("size", 0)}


# fetch-ahead and replay settings of a cold start; TRACE_OFF is today's behaviour without a trace
TRACE_OFF = "trace_replay = false\n"
TRACE_ON = "trace_replay = true\n"


def cold_bdserver(daemon: Daemon, wan: WanLink, ref: str, target: Path, cmd: list[str], mode: str,
                  extra: str) -> dict[str, Any]:
    """``mode`` "none": no trace replayed (fetch-ahead after misses); "trace": the recorded trace."""
    daemon.stop()
    daemon.configure(extra + (TRACE_ON if mode == "trace" else TRACE_OFF))
    startup = daemon.start(fresh_cache=True)
    drop_caches()
    wan.reset()
    assert daemon.proc is not None
    c0 = proc_cpu_s(daemon.proc.pid)
    t0 = time.perf_counter()
    m = daemon.cli("mount", ref, str(target), "--backend", "fuse")
    t1 = time.perf_counter()
    c1 = proc_cpu_s(daemon.proc.pid)
    run(["chroot", str(target), *cmd], timeout=600, env=START_ENV)
    t2 = time.perf_counter()
    c2 = proc_cpu_s(daemon.proc.pid)
    px = wan.stats()
    st = daemon.cli("stats")
    rtt = wan.probe_rtt()
    run(BD + ["umount", str(target)], timeout=60)
    if mode == "trace" and "start trace" not in m.get("message", ""):
        raise RuntimeError(f"the trace was not replayed: {m.get('message')}")
    return {"daemon_startup": startup, "mount": t1 - t0, "python": t2 - t1, "total": t2 - t0,
            "daemon_cpu_mount": c1 - c0, "daemon_cpu_python": c2 - c1, "loadavg": os.getloadavg()[0],
            "cpu_pressure": cpu_pressure(), "observed_rtt": rtt, **device_figures(st),
            "proxy_bytes": px["down_bytes"], "proxy_requests": px["requests"],
            "proxy_connections": px["connections"]}


def record_trace(daemon: Daemon, ref: str, cmd: list[str], extra: str, output: Path) -> dict[str, Any]:
    """`bdserver optimize REF -- CMD` (runc, cold private cache): the trace is published and, recorded
    on this node, trusted by the daemon's later starts; also written to ``output``."""
    daemon.stop()
    daemon.configure(extra + TRACE_OFF)
    daemon.start(fresh_cache=True)
    r = run(BD + ["optimize", "--json", "--timeout", "300", "--output", str(output), ref, "--", *cmd], timeout=900)
    daemon.stop()
    return json.loads(r.stdout)


def dump_device(daemon: Daemon, ref: str, out: Path) -> dict[str, Any]:
    """The lazy device's bytes in one file (read through a FUSE attach once), for the loop side."""
    daemon.stop()
    daemon.configure("")
    daemon.start(fresh_cache=True)
    r = daemon.cli("attach", ref, "--backend", "fuse")
    try:
        with open(r["path"], "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, MiB)
        info = daemon.cli("stats", r["id"])[0]
    finally:
        run(BD + ["detach", r["id"]], timeout=60, check=False)
        daemon.stop()
    from bdserver.erofs.reader import ErofsImage

    with ErofsImage.open(str(out)) as img:  # the merged metadata: the blocks before the first layer
        meta_blocks = min(d.mapped_blkaddr for d in img.devices)
    return {"path": str(out), "size": out.stat().st_size, "meta_blocks": meta_blocks, "id": info.get("id")}


def _pull_manifest(client: Any, base: str) -> tuple[dict, bytes]:
    acc = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    r = client.get(f"{base}/manifests/latest", headers={"Accept": acc})
    r.raise_for_status()
    man = r.json()
    c = client.get(f"{base}/blobs/{man['config']['digest']}")
    c.raise_for_status()
    return man, c.content


def _get_blob(client: Any, base: str, layer: dict, sink: Callable[[bytes], None]) -> None:
    h = hashlib.sha256()
    with client.stream("GET", f"{base}/blobs/{layer['digest']}") as r:
        r.raise_for_status()
        for b in r.iter_bytes(1 << 16):
            h.update(b)
            sink(b)
    if "sha256:" + h.hexdigest() != layer["digest"]:
        raise RuntimeError(f"layer {layer['digest']} does not match its digest")


TAR_X = ["tar", "-x", "-z", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-p"]


def cold_pull(wan: WanLink, work: Path, cmd: list[str]) -> dict[str, Any]:
    """Pull (parallel GETs of every layer, verified) then unpack (tar -xzf per layer, in order), then
    chroot python3 -c 1: what docker/containerd/podman do before a container can start."""
    import httpx

    dl, rootfs = work / "pull", work / "pull-rootfs"
    for d in (dl, rootfs):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    drop_caches()
    wan.reset()
    base = f"http://{wan.host}/v2/{REPO_NAME}"
    t0 = time.perf_counter()
    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=8)) as client:
        man, _ = _pull_manifest(client, base)
        errs: list[BaseException] = []

        def fetch(i: int, layer: dict) -> None:
            try:
                with open(dl / f"{i}.tar.gz", "wb") as f:
                    _get_blob(client, base, layer, f.write)
            except BaseException as e:  # noqa: BLE001
                errs.append(e)

        ths = [threading.Thread(target=fetch, args=(i, layer)) for i, layer in enumerate(man["layers"])]
        for t in ths:
            t.start()
        for t in ths:
            t.join(600)
        if errs:
            raise errs[0]
    t1 = time.perf_counter()
    for i in range(len(man["layers"])):
        run(TAR_X + ["-f", str(dl / f"{i}.tar.gz"), "-C", str(rootfs)], timeout=600)
    t2 = time.perf_counter()
    run(["chroot", str(rootfs), *cmd], timeout=600, env=START_ENV)
    t3 = time.perf_counter()
    px = wan.stats()
    shutil.rmtree(dl, ignore_errors=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    return {"pull": t1 - t0, "unpack": t2 - t1, "python": t3 - t2, "total": t3 - t0, "proxy_bytes": px["down_bytes"],
            "proxy_requests": px["requests"]}


def cold_stream(wan: WanLink, work: Path, cmd: list[str]) -> dict[str, Any]:
    """Streamed: each layer's GET piped into `tar -xz` as it arrives, layer after layer (download
    and decompression overlap; no parallel downloads). Then chroot python3 -c 1."""
    import httpx

    rootfs = work / "stream-rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.mkdir()
    drop_caches()
    wan.reset()
    base = f"http://{wan.host}/v2/{REPO_NAME}"
    t0 = time.perf_counter()
    with httpx.Client(timeout=120) as client:
        man, _ = _pull_manifest(client, base)
        for layer in man["layers"]:
            p = subprocess.Popen(TAR_X + ["-f", "-", "-C", str(rootfs)], stdin=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
            assert p.stdin is not None
            try:
                _get_blob(client, base, layer, p.stdin.write)
            finally:
                p.stdin.close()
                rc = p.wait(timeout=600)
            if rc != 0:
                raise RuntimeError(f"tar -x failed: {p.stderr.read().decode()[-500:] if p.stderr else rc}")
    t1 = time.perf_counter()
    run(["chroot", str(rootfs), *cmd], timeout=600, env=START_ENV)
    t2 = time.perf_counter()
    px = wan.stats()
    shutil.rmtree(rootfs, ignore_errors=True)
    return {"pull_unpack": t1 - t0, "python": t2 - t1, "total": t2 - t0, "proxy_bytes": px["down_bytes"]}


def _rate_bytes(rate: str) -> float:
    """tc rate ("100mbit", "1gbit", "500kbit") in bytes per second."""
    r = rate.lower().rstrip("ps").rstrip("/")
    for suf, mul in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if r.endswith(suf):
            return float(r[: -len(suf)]) * mul / 8
    raise ValueError(f"rate {rate!r}: use e.g. 100mbit")


def cold_bench(daemon: Daemon, wan: WanLink, ref: str, work: Path, runs: int, stream: bool, rate: str,
               rtt_ms: float, cmd: list[str], extra: str, trace: bool) -> dict[str, Any]:
    """Cold starts, alternating: without a trace, with one, pull-and-unpack, and the streamed pull."""
    wan.shape(rate, rtt_ms)
    say(f"cold: link shaped ({wan.shaped}); {runs} runs of each, alternating; start: {' '.join(cmd)}")
    res: dict[str, list[dict[str, Any]]] = {"bdserver": [], "trace": [], "pull": [], "stream": []}
    target = work / "rootfs"

    def fig(b: dict[str, Any]) -> str:
        return (f"daemon {b['daemon_startup']:.2f} s, mount {b['mount']:.2f} s + start {b['python']:.2f} s = "
                f"{b['total']:.2f} s; fetched {b['fetched_bytes'] / 1e6:.1f} MB in {b['fetches']} requests "
                f"(kernel read {b['kernel_read_bytes'] / 1e6:.1f} MB; ahead {b['ahead_chunks']} chunks, "
                f"{b['ahead_used']} used, {b['ahead_wasted']} wasted); proxy {b['proxy_bytes'] / 1e6:.1f} MB "
                f"{b['proxy_requests']} requests")

    try:
        for r in range(runs):
            for side, mode in [("bdserver", "none")] + ([("trace", "trace")] if trace else []):
                b = cold_bdserver(daemon, wan, ref, target, cmd, mode, extra)
                res[side].append(b)
                say(f"  run {r + 1}: {side}: {fig(b)}")
            p = cold_pull(wan, work, cmd)
            res["pull"].append(p)
            say(f"  run {r + 1}: pull {p['pull']:.2f} s + unpack {p['unpack']:.2f} s + start {p['python']:.2f} s "
                f"= {p['total']:.2f} s; proxy {p['proxy_bytes'] / 1e6:.1f} MB")
            if stream:
                s = cold_stream(wan, work, cmd)
                res["stream"].append(s)
                say(f"  run {r + 1}: streamed pull|tar {s['pull_unpack']:.2f} s + start {s['python']:.2f} s "
                    f"= {s['total']:.2f} s")
    finally:
        wan.unshape()
    return res


# -- report ------------------------------------------------------------------------------------
def report(res: dict[str, Any]) -> str:
    L: list[str] = []
    img = res["image"]
    code = res["code"] if res["code"] == res.get("code_end", res["code"]) else f"{res['code']} -> {res['code_end']}"
    L.append(f"bdserver read benchmark ({code}): {res['kernel']}, {res['cpus']} CPUs; medians of {res.get('warm_runs', '-')} "
             f"warm runs per test and side, {res['runs']} cold runs of each kind")
    L.append(f"image {img['ref']} ({img['kind']}): {len(img['layers'])} layers, "
             f"{img['compressed_bytes'] / 1e6:.1f} MB compressed "
             f"({', '.join(f'{x / 1e6:.1f}' for x in img['layers'])} MB); lazy device "
             f"{res.get('device_bytes', 0) / 1e6:.1f} MB; convert (--compress {res.get('compress', 'none')}) took "
             f"{res['convert_s']:.1f} s")
    if "warm" in res:
        w = res["warm"]
        L.append("")
        L.append(f"1. Warm reads: {res['backend']} device vs loop device over the same bytes "
                 "(chunk cache warm, page cache dropped before each run)")
        hdr = (f"   {'test':50} {res['backend'] + ' MB/s':>10} {'loop MB/s':>10} {'ratio':>7}  {'target':8}"
               f" {'best/best':>9} {'daemon CPU':>10} {'CPU/req':>8} {res['backend'] + ' IOPS':>10} {'loop IOPS':>10}")
        L.append(hdr)
        L.append("   " + "-" * (len(hdr) - 3))
        for row in w["rows"]:
            if "info" in row:
                continue
            tgt = ">= 0.80x" if ("sequential" in row["test"] or "in order" in row["test"]) \
                and "hot" not in row["test"] else ""
            cpu = f"{row['daemon_cpu_share']:.2f} cores" if row.get("daemon_cpu_share") is not None else ""
            per = f"{row['daemon_us_per_read']:.0f} us" if row.get("daemon_us_per_read") is not None else ""
            extra = f"{row['ratio_best']:8.2f}x {cpu:>10} {per:>8}"
            if row["unit"] == "IOPS":
                d, lo = row["dev_median"], row["loop_median"]
                L.append(f"   {row['test']:50} {d * 4096 / 1e6:10.1f} {lo * 4096 / 1e6:10.1f} {row['ratio']:6.2f}x  "
                         f"{tgt:8} {extra} {d:10.0f} {lo:10.0f}")
            else:
                L.append(f"   {row['test']:50} {row['dev_median']:10.1f} {row['loop_median']:10.1f} "
                         f"{row['ratio']:6.2f}x  {tgt:8} {extra}")
        L.append(f"   ({w['rows'][-1]['info']}; first full read of the device, cold over the unshaped link: "
                 f"{w['first_read_mb_s']:.1f} MB/s)")
        loads = [r["loadavg"] for r in w["rows"] if "loadavg" in r]
        psi = [r["cpu_pressure"] for r in w["rows"] if "cpu_pressure" in r]
        L.append(f"   ratio = median/median; best/best = fastest run / fastest run (less sensitive to other load: "
                 f"1-min load average {min(loads):.1f}-{max(loads):.1f} on {res['cpus']} CPUs, CPU pressure "
                 f"{min(psi):.0f}-{max(psi):.0f} %); daemon CPU = bdserver daemon CPU time / wall time, device side; "
                 "CPU/req = daemon CPU time per kernel request (device read)")
    if "cold" in res:
        c = res["cold"]
        b, t, p, s = c["bdserver"], c["trace"], c["pull"], c["stream"]
        mb = lambda k, rows: med([x[k] for x in rows])  # noqa: E731
        L.append("")
        L.append(f"2. Cold start ({' '.join(c['start'])}) over {c['link']} (netns + veth + tbf both ways + delay "
                 f"proxy); 1-min load average {min(x['loadavg'] for x in b + t):.1f}-"
                 f"{max(x['loadavg'] for x in b + t):.1f} on {res['cpus']} CPUs, CPU pressure "
                 f"{min(x['cpu_pressure'] for x in b + t):.0f}-{max(x['cpu_pressure'] for x in b + t):.0f} %; "
                 f"config: {c['config'].strip() or 'defaults'}")
        L.append(f"   {'phase':52} {'median s':>9}   runs")
        L.append("   " + "-" * 75)

        def line(name: str, rows: list[dict[str, Any]], k: str) -> None:
            runs = " ".join(f"{x[k]:.2f}" for x in rows)
            L.append(f"   {name:52} {mb(k, rows):9.2f}   {runs}")

        for label, rows in (("bdserver, no trace", b), ("bdserver + start trace", t)):
            if not rows:
                continue
            line(f"{label}: daemon startup (not in the total)", rows, "daemon_startup")
            line(f"{label}: bdserver mount REF DIR (cold cache)", rows, "mount")
            line("  of which daemon CPU seconds", rows, "daemon_cpu_mount")
            line("  then the start in DIR", rows, "python")
            line("  of which daemon CPU seconds", rows, "daemon_cpu_python")
            line(f"= {label}: cold start", rows, "total")
        line("pull: parallel GETs of the compressed layers", p, "pull")
        line("unpack: tar -xzf per layer", p, "unpack")
        line("the start in DIR", p, "python")
        line("= pull-and-unpack", p, "total")
        if s:
            line("streamed: GET | tar -xz layer by layer, then the start", s, "total")
        L.append(f"   observed request round trip through the link (GET /v2/, kept-alive): median "
                 f"{1000 * mb('observed_rtt', b):.1f} ms (nominal {1000 * c['rtt_s']:g} ms)")
        tg = c["targets"]
        L.append(f"   ratio bdserver / pull-and-unpack, no trace:   {mb('total', b) / mb('total', p):.3f}x   "
                 f"(best/best {min(x['total'] for x in b) / min(x['total'] for x in p):.3f}x; "
                 + (f"target <= {tg[0]}x)" if tg[0] else "no target)"))
        if t:
            L.append(f"   ratio bdserver / pull-and-unpack, with trace: {mb('total', t) / mb('total', p):.3f}x   "
                     f"(best/best {min(x['total'] for x in t) / min(x['total'] for x in p):.3f}x; "
                     f"target <= {tg[1]}x)")
        comp = img["compressed_bytes"]
        L.append(f"   per start {'':27} {'requests':>9} {'fetched MB':>11} {'% image':>8} {'kernel read MB':>15} "
                 f"{'fetched/read':>13} {'ahead used':>11} {'ahead wasted':>13}")
        for label, rows in (("no trace", b), ("with trace", t)):
            if not rows:
                continue
            f, kr = mb("fetched_bytes", rows), mb("kernel_read_bytes", rows)
            L.append(f"   bdserver {label:27} {mb('fetches', rows):9.0f} {f / 1e6:11.1f} {100 * f / comp:7.1f}% "
                     f"{kr / 1e6:15.1f} {f / kr if kr else 0:12.2f}x {mb('ahead_used', rows):11.0f} "
                     f"{mb('ahead_wasted', rows):13.0f}")
            L.append(f"      registry side (proxy): {mb('proxy_bytes', rows) / 1e6:.1f} MB in "
                     f"{mb('proxy_requests', rows):.0f} requests, {mb('proxy_connections', rows):.0f} connections")
        L.append(f"   pull-and-unpack: registry side (proxy) {mb('proxy_bytes', p) / 1e6:.1f} MB of the "
                 f"{comp / 1e6:.1f} MB compressed image")
        sr = c.get("start_reads")
        if sr:
            L.append(f"   what the start reads (loop device, {sr['read_ahead_kb']} KiB readahead, no bdserver): "
                     f"{sr['read_bytes'] / 1e6:.1f} MB in {sr['requests']} requests; of the layers "
                     f"{sr['layer_read_bytes'] / 1e6:.1f} MB, {sr['layer_read_compressed'] / 1e6:.2f} MB compressed")
            for label, rows in (("no trace", b), ("with trace", t)):
                if rows:
                    L.append(f"   bytes fetched / compressed bytes the start reads, {label}: "
                             f"{mb('fetched_bytes', rows) / sr['layer_read_compressed']:.2f}x"
                             + ("   (target <= 1.3x)" if label == "with trace" else ""))
        if c.get("recorded"):
            r = c["recorded"]
            L.append(f"   trace: {r.get('chunks')} chunks from {r.get('reads')} kernel reads "
                     f"({r.get('read_bytes', 0) / 1e6:.1f} MB), recorded by `bdserver optimize` under runc")
        return "\n".join(L)


def code_version() -> str:
    """The commit measured, "+dirty" when bdserver/ has uncommitted changes (a shared working tree)."""
    head = run(["git", "rev-parse", "--short", "HEAD"], check=False).stdout.strip() or "unknown"
    dirty = run(["git", "status", "--porcelain", "--", "bdserver"], check=False).stdout.strip()
    return head + ("+dirty" if dirty else "")


# -- main --------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer operations per run (still 3 runs)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout (progress: stderr)")
    ap.add_argument("--skip-wan", action="store_true", help="skip the cold start over the shaped link")
    ap.add_argument("--skip-warm", action="store_true", help="skip the warm read comparison")
    ap.add_argument("--no-stream", action="store_true", help="skip the streamed pull-and-unpack baseline")
    ap.add_argument("--runs", type=int, default=3, help="cold-start runs of each kind (median reported)")
    ap.add_argument("--warm-runs", type=int, default=0, help="runs per warm test and side (default 5, --quick 3)")
    ap.add_argument("--rate", default="100mbit", help="tbf rate of the shaped link, both directions")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="round trip added by the delay proxy")
    ap.add_argument("--image", choices=["big", "sample", "app"], default="big",
                    help="app: Debian's numpy/scipy/pandas/matplotlib, started with their imports")
    ap.add_argument("--no-trace", action="store_true", help="cold starts without a start trace only")
    ap.add_argument("--config", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="daemon config key (TOML value), e.g. fuse_read_ahead_kb=128")
    ap.add_argument("--backend", choices=sorted(ATTACHERS), default="fuse")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--compress", choices=["none", "lz4"], default="none",
                    help="convert --compress: file data lz4-compressed inside EROFS (bench/convert.py compares more)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/read.py needs root (mounts, loop devices, network namespaces)", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix="bdbench-read-", dir=a.workdir))
    run_dir = Path(f"/run/bdbench-{os.getpid()}")
    wan = WanLink(work / "wan")
    daemon: Daemon | None = None
    res: dict[str, Any] = {"kernel": os.uname().release, "cpus": os.cpu_count(), "runs": a.runs,
                           "backend": a.backend, "code": code_version(), "compress": a.compress}
    try:
        layout = bench_image(a.image)
        layers = image_layers(layout)
        say(f"image {layout}: layers {[round(x['size'] / 1e6, 1) for x in layers]} MB")
        (work / "wan").mkdir(parents=True)
        wan.up()
        ref = f"{wan.host}/{REPO_NAME}:latest"
        res["image"] = {"kind": a.image, "ref": ref, "layers": [x["size"] for x in layers],
                        "compressed_bytes": sum(x["size"] for x in layers)}
        say(f"netns {wan.ns}: registry behind the delay proxy at {wan.host} (unshaped for setup)")
        from bdserver.oci.copy import copy_image
        from bdserver.oci.layout import OCILayout
        from bdserver.oci.registry import RegistryClient

        client = RegistryClient(wan.host, hosts_dirs=[], docker_config="/nonexistent", plain_http=True)
        try:
            copy_image(OCILayout(layout, create=False), client.repository(REPO_NAME), "latest", "latest")
        finally:
            client.close()
        hosts = work / "hosts"
        (hosts / wan.host).mkdir(parents=True)
        (hosts / wan.host / "hosts.toml").write_text(f'server = "http://{wan.host}"\n')
        daemon = Daemon(work, run_dir, hosts)
        t0 = time.perf_counter()
        conv = daemon.cli("convert", ref, "--compress", a.compress, timeout=1200)
        res["convert_s"] = time.perf_counter() - t0
        say(f"converted in {res['convert_s']:.1f} s: {conv.get('summary', conv)}")
        extra = "".join(f"{kv.split('=', 1)[0].strip()} = {kv.split('=', 1)[1].strip()}\n" for kv in a.extra)
        if not a.skip_warm:
            daemon.configure(extra)
            daemon.start(fresh_cache=True)
            wr = a.warm_runs or (3 if a.quick else 5)
            res["warm_runs"] = wr
            res["warm"] = warm_bench(daemon, ref, work, a.backend, wr, a.quick)
            daemon.stop()
        if not a.skip_wan:
            cmd = workload(a.image)
            dev = dump_device(daemon, ref, work / "device.img")
            say(f"device dumped ({dev['size'] / 1e6:.1f} MB); measuring what the start reads on a loop device")
            sreads = start_reads(work / "device.img", work / "mnt-loop-start", cmd, START_ENV,
                                 dev["meta_blocks"] * 4096)
            (work / "device.img").unlink()
            say(f"  the start reads {sreads['read_bytes'] / 1e6:.1f} MB ({sreads['layer_read_compressed'] / 1e6:.2f} "
                f"MB compressed in the layers) with 128 KiB readahead")
            recorded: dict[str, Any] = {}
            if not a.no_trace:
                recorded = record_trace(daemon, ref, cmd, extra, work / "trace.json")
                say(f"  recorded: {recorded.get('summary')}")
            res["cold"] = cold_bench(daemon, wan, ref, work, a.runs, not a.no_stream, a.rate, a.rtt_ms, cmd, extra,
                                     not a.no_trace)
            res["cold"].update(start=cmd, config=extra, start_reads=sreads, recorded=recorded,
                               targets=(None, 0.15) if a.image == "app" else (0.18, 0.12))
            res["cold"]["link"] = f"{a.rate}, {a.rtt_ms:g} ms RTT"
            res["cold"]["rate_bytes_s"] = _rate_bytes(a.rate)
            res["cold"]["rtt_s"] = a.rtt_ms / 1000
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        umount_under(work, run_dir)
        if daemon is not None:
            with contextlib.suppress(Exception):
                daemon.stop()
        umount_under(work, run_dir)
        wan.close()
        if not any(t.startswith(str(work)) or t.startswith(str(run_dir)) for t in mountinfo_targets()):
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            say(f"left {work} in place: something is still mounted under it")
    res["code_end"] = code_version()
    res["device_bytes"] = res.get("warm", {}).get("device_bytes") or \
        (res["cold"]["bdserver"][0]["device_bytes"] if res.get("cold", {}).get("bdserver") else 0)
    text = report(res)
    if a.json:
        print(text, file=sys.stderr)
        print(json.dumps(res, indent=1, default=str))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
