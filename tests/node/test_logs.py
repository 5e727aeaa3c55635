"""Daemon logs: the journal's native protocol under systemd (structured fields, no credentials), a rotating
file that stays under its cap while a failing registry is read in a loop, repeated warnings rate-limited
with a count."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from bdserver.config import load_config
from bdserver.daemon.logs import JournalHandler, RepeatFilter, event
from bdserver.errors import ConfigError
from tests.fixtures.proxy import FaultProxy
from tests.node.small_lazy import read_device, until


def parse_journal(datagram: bytes) -> dict[str, str]:
    """The journal's native protocol: KEY=VALUE lines, or KEY, a little-endian u64 length and the bytes."""
    out: dict[str, str] = {}
    i = 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            k = line
            (n,) = struct.unpack_from("<Q", datagram, nl + 1)
            v = datagram[nl + 9 : nl + 9 + n]
            assert datagram[nl + 9 + n : nl + 10 + n] == b"\n"
            i = nl + 10 + n
        out[k.decode()] = v.decode()
    return out


class Journal:
    """The receiving end of the protocol, bound where the test says journald listens."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.entries: list[dict[str, str]] = []
        self.raw: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                d = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            self.raw.append(d)
            self.entries.append(parse_journal(d))

    def find(self, **fields: str) -> list[dict[str, str]]:
        return [e for e in list(self.entries) if all(e.get(k) == v for k, v in fields.items())]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sock")
    try:
        yield j
    finally:
        j.close()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _logger(name: str, handler: logging.Handler) -> logging.Logger:
    lg = logging.getLogger(name)
    lg.handlers[:] = [handler]
    lg.propagate = False
    lg.setLevel(logging.DEBUG)
    return lg


@pytest.mark.parametrize("text, word", [
    ('log_target = "syslog"\n', "log_target must be one of"),
    ("log_max_bytes = 1000\n", "log_max_bytes must be at least"),
    ("log_backups = 0\n", "log_backups must be at least 1"),
])
def test_log_settings_fail_closed(tmp_path: Path, text: str, word: str) -> None:
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError, match=word):
        load_config(str(tmp_path / "config.toml"))


def test_repeated_warnings_pass_once_per_window_then_with_a_count() -> None:
    now = [100.0]
    repeats = RepeatFilter(10.0, clock=lambda: now[0])
    sink = Records()
    sink.addFilter(repeats)
    lg = _logger("bdserver.test.repeats", sink)
    for i in range(100):
        lg.warning("device read failed offset=%d length=4096 errno=5", i * 4096)
        lg.info("registry retry %d", i)  # below WARNING: never limited
    lg.warning("fetch-ahead failed")  # another warning: its own window
    lg.error(f"layer {7}: chunks {3}..{4} do not decode")  # numbers in an f-string count as the same text
    lg.error(f"layer {7}: chunks {9}..{12} do not decode")
    msgs = [r.getMessage() for r in sink.records]
    assert [m for m in msgs if "retry" not in m] == ["device read failed offset=0 length=4096 errno=5",
                                                    "fetch-ahead failed", "layer 7: chunks 3..4 do not decode"]
    assert sum("retry" in m for m in msgs) == 100
    sink.records.clear()
    now[0] += 5
    repeats.flush()
    assert sink.records == []  # the windows have not ended
    now[0] += 6
    repeats.flush()
    got = {r.getMessage(): getattr(r, "repeated", 0) for r in sink.records}
    assert got == {"device read failed offset=405504 length=4096 errno=5 [repeated 99 more times in 10 s]": 99,
                   "layer 7: chunks 9..12 do not decode [repeated 1 more times in 10 s]": 1}
    sink.records.clear()
    lg.warning("device read failed offset=%d length=4096 errno=5", 1)  # a new window
    assert [r.getMessage() for r in sink.records] == ["device read failed offset=1 length=4096 errno=5"]


def test_journal_datagram_has_fields_and_no_credentials(journal: Journal) -> None:
    handler = JournalHandler(str(journal.path))
    lg = _logger("bdserver.test.journal", handler)
    try:
        raise RuntimeError("token=s3cret rejected by https://bob:s3cret@reg.example/v2/")
    except RuntimeError:
        lg.warning("GET https://bob:s3cret@reg.example/v2/app/blobs failed: Authorization: Bearer s3cret",
                   exc_info=True, extra=event("attach", "bd4", "reg.example/app:v1", "sha256:" + "a" * 64,
                                              detail="password=s3cret"))
    handler.close()
    until(lambda: len(journal.entries) == 1, "one datagram")
    assert b"s3cret" not in journal.raw[0]
    e = journal.entries[0]
    assert e["PRIORITY"] == "4" and e["SYSLOG_IDENTIFIER"] == "bdserver"
    assert e["BDSERVER_EVENT"] == "attach" and e["BDSERVER_DEVICE"] == "bd4"
    assert e["BDSERVER_IMAGE"] == "reg.example/app:v1" and e["BDSERVER_IMAGE_DIGEST"] == "sha256:" + "a" * 64
    assert e["BDSERVER_DETAIL"] == "password=***" and e["BDSERVER_LOGGER"] == "bdserver.test.journal"
    assert e["CODE_FUNC"] == "test_journal_datagram_has_fields_and_no_credentials" and e["CODE_LINE"].isdigit()
    first, *trace = e["MESSAGE"].split("\n")  # the traceback follows the message (length-prefixed field)
    assert first == "GET https://***@reg.example/v2/app/blobs failed: Authorization: ***"
    assert "Traceback" in trace[0] and "token=***" in trace[-1]


def test_daemon_under_systemd_logs_to_the_journal(daemon, small_lazy, journal: Journal) -> None:
    daemon.env["INVOCATION_ID"] = "0123456789abcdef0123456789abcdef"  # what systemd sets for a service
    daemon.write_config(f'journal_socket = "{journal.path}"\n' + small_lazy.trust_toml())
    ref = small_lazy.ref()
    a = daemon.json("attach", ref)
    daemon.cli("detach", a["id"])
    for ev in ("attach", "detach"):
        until(lambda: journal.find(BDSERVER_EVENT=ev), f"a journal entry for {ev}")
        e = journal.find(BDSERVER_EVENT=ev)[0]
        assert e["BDSERVER_DEVICE"] == a["id"] and e["BDSERVER_IMAGE"] == ref
        assert e["BDSERVER_IMAGE_DIGEST"] == small_lazy.lazy and e["PRIORITY"] == "6"
    assert not (daemon.state_dir / "bdserver.log").exists()  # journald keeps (and rotates) the logs


def test_log_file_stays_under_its_cap_while_a_failing_registry_is_read(daemon, small_lazy) -> None:
    cap = 64 * 1024
    daemon.write_config(f'log_target = "file"\nlog_max_bytes = {cap}\nlog_backups = 2\nlog_repeat_window_s = 2.0\n'
                        'fetch_deadline_s = 0.3\nprefetch_chunks = 0\n' + small_lazy.trust_toml())
    with FaultProxy(small_lazy.registry.url) as proxy:
        a = daemon.json("attach", small_lazy.ref(proxy.host))
        proxy.inject("status", status=503, count=10**6, match=r"/blobs/")  # every chunk fetch fails from now on
        logs = [daemon.state_dir / ("bdserver.log" + s) for s in ("", ".1", ".2", ".3")]
        stop = threading.Event()

        def reader(k: int) -> None:
            for i in range(k, a["size"] // 4096, 8):  # a new block each time: none can be cached
                if stop.is_set():
                    return
                try:
                    read_device(a["path"], i * 4096, 4096)
                except OSError:
                    pass

        threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(8)]
        for t in threads:
            t.start()
        try:
            # two rotations: (backups + 1) x cap was written (bounded: the readers run out of blocks)
            until(lambda: logs[2].exists() or not any(t.is_alive() for t in threads), "two rotations", timeout=300)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        sizes = [p.stat().st_size if p.exists() else 0 for p in logs]
        assert all(n <= cap for n in sizes) and sizes[3] == 0, sizes
        assert logs[2].exists(), "the readers ran out of blocks before the logs filled the cap twice"
        out = daemon.state_dir / "daemon.out"  # the daemon's stdout/stderr: not a second, unbounded log
        assert not out.exists() or out.stat().st_size < 4096, out.read_text()[-2000:]
        # the read failures were warned about once per window, then with a count
        until(lambda: any('"repeated"' in line for p in logs if p.exists() for line in p.read_text().splitlines()),
              "a warning logged again with its count", timeout=30)
        lines = [json.loads(line) for p in logs if p.exists() for line in p.read_text().splitlines()]
        failed = [x for x in lines if x["msg"].startswith("device read failed")]
        assert any(x.get("repeated", 0) > 0 for x in failed)
        plain = [x for x in failed if not x.get("repeated")]
        first, last = min(x["ts"] for x in lines), max(x["ts"] for x in lines)
        assert len(plain) <= 2 + _seconds(first, last) / 2.0, len(plain)  # at most one per 2 s window


def _seconds(first: str, last: str) -> float:
    f = "%Y-%m-%dT%H:%M:%S"
    return time.mktime(time.strptime(last[:19], f)) - time.mktime(time.strptime(first[:19], f)) + 1
