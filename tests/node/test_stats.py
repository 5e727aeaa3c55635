"""`bdserver stats` for a person: one line per device (hit ratio, fetched vs size, p50/p99, errors), a
`--watch` mode with rates, and `--json` unchanged for machines."""

from __future__ import annotations

import json
import re
import selectors
import signal
import subprocess
import time

import pytest

from bdserver.daemon.statsview import human_bytes
from tests.node.conftest import BDSERVER, REPO
from tests.node.small_lazy import read_device

pytestmark = pytest.mark.slow


def _rows(text: str) -> dict[str, list[str]]:
    lines = text.strip().splitlines()
    head = re.split(r"\s{2,}", lines[0])
    assert head[0] == "DEVICE" and head[-1] == "IMAGE", lines[0]
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in lines[1:])}


def test_one_line_per_device(daemon, small_lazy, erofs_image) -> None:
    daemon.write_config("prefetch_chunks = 0\n" + small_lazy.trust_toml())
    ref = small_lazy.ref()
    a = daemon.json("attach", ref)
    image, _ = erofs_image
    f = daemon.json("attach", f"file:{image}")
    read_device(a["path"], 0, 1 << 20)
    read_device(a["path"], 0, 1 << 20)
    out = daemon.cli("stats").stdout
    rows = _rows(out)
    assert set(rows) == {a["id"], f["id"]}, out
    s = daemon.json("stats", a["id"])[0]["stats"]  # --json: the reply as is, for machines
    dev = s["device"]
    hit, traffic, p50, p99, errors, img = rows[a["id"]][1:]
    assert img == ref
    assert hit == f"{100 * dev['chunk_hits'] / (dev['chunk_hits'] + dev['chunk_misses']):.1f}%"
    assert traffic == (f"{human_bytes(dev['fetched_bytes'])} / {human_bytes(a['size'])} "
                       f"({100 * dev['fetched_bytes'] / a['size']:.1f}%)")
    assert re.fullmatch(r"[0-9.]+(ms|s)", p50) and re.fullmatch(r"[0-9.]+(ms|s)", p99) and errors == "0"
    assert rows[f["id"]][2] == f"local / {human_bytes(f['size'])}" and rows[f["id"]][-1] == f"file:{image}"
    assert list(_rows(daemon.cli("stats", a["id"]).stdout)) == [a["id"]]


def test_watch_refreshes_with_rates_until_interrupted(daemon, small_lazy) -> None:
    daemon.write_config("prefetch_chunks = 0\n" + small_lazy.trust_toml())
    a = daemon.json("attach", small_lazy.ref())
    p = subprocess.Popen(BDSERVER + ["stats", "--watch", "0.3"], env=daemon.env, cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    frames: list[list[str]] = []
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
    read_at = None
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if not sel.select(timeout=1):
                continue
            line = p.stdout.readline()  # type: ignore[union-attr]
            assert line, p.stderr.read()  # type: ignore[union-attr]
            if line.startswith("bdserver stats every 0.3s"):
                frames.append([])
            elif frames and line.strip():
                frames[-1].append(line.rstrip("\n"))
            if len(frames) == 2 and read_at is None:
                read_device(a["path"], 2 << 20, 1 << 20)  # between two refreshes: the next shows the rates
                read_at = len(frames)
            done = [fr for fr in frames[(read_at or 99):-1] if len(fr) == 2]
            if any(_rows("\n".join(fr))[a["id"]][7] != "0 B/s" for fr in done):
                break
        else:
            raise AssertionError(f"no refresh showed the fetch rate: {frames}")
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=30)
    assert rc == 0  # Ctrl-C ends the watch cleanly
    head = re.split(r"\s{2,}", frames[0][0])
    assert head == ["DEVICE", "HITS", "FETCHED / SIZE", "P50", "P99", "ERRORS", "READ/s", "FETCH/s", "IMAGE"]


def test_watch_json_lines(daemon, small_lazy) -> None:
    daemon.write_config(small_lazy.trust_toml())
    a = daemon.json("attach", small_lazy.ref())
    p = subprocess.Popen(BDSERVER + ["stats", "--watch", "0.2", "--json"], env=daemon.env, cwd=REPO, text=True,
                         stdout=subprocess.PIPE)
    try:
        lines = [p.stdout.readline() for _ in range(2)]  # type: ignore[union-attr]
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
    assert [[d["id"] for d in json.loads(x)] for x in lines] == [[a["id"]], [a["id"]]]
    assert daemon.cli("stats", "--watch", "0", check=False).returncode == 2
