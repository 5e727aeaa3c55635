"""Daemon logs: the systemd journal under systemd, otherwise JSON lines in a size-capped rotating file.

Under systemd (INVOCATION_ID or JOURNAL_STREAM set and journald's socket present) every record is
one datagram of the journal's native protocol (KEY=VALUE fields: MESSAGE, PRIORITY, CODE_*, and
BDSERVER_EVENT, BDSERVER_DEVICE, BDSERVER_IMAGE, BDSERVER_IMAGE_DIGEST for device events), so
`journalctl -u bdserver BDSERVER_DEVICE=bd3` finds one device's story; journald rotates. Elsewhere
the log file rotates at `log_max_bytes` keeping `log_backups` old files, so the logs never take
more than (backups + 1) x max_bytes (records are capped: MAX_MSG, MAX_EXC); an interactive
`bdserver serve` also prints to its terminal.

A failing registry makes every read warn: identical warnings (same logger, level and message up to
its numbers) pass once per `log_repeat_window_s` and the rest are counted; when the window ends the
last one is logged again with "[repeated N more times ...]" (field `repeated`).

Credentials never reach a log line on any path: URLs lose their userinfo and Authorization, token
and password values are masked (`scrub`).
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import os
import re
import socket
import stat
import struct
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from bdserver.config import Config
from bdserver.daemon.state import DeviceRecord

_SECRET = [
    (re.compile(r"(?i)(authorization|proxy-authorization)(['\"]?\s*[:=]\s*['\"]?)([^'\",}]+)"), r"\1\2***"),
    (re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"(?i)((?:password|token|secret|auth)['\"]?\s*[:=]\s*['\"]?)([^'\",}\s]+)"), r"\1***"),
    (re.compile(r"(://)[^/@\s]+@"), r"\1***@"),
]
MAX_MSG = 4096  # characters of a message kept (the head)
MAX_EXC = 8192  # characters of a traceback kept (the tail: where it failed)
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
_NUMBERS = re.compile(r"\d+")


def scrub(text: str) -> str:
    for rx, repl in _SECRET:
        text = rx.sub(repl, text)
    return text


def event(name: str, device: str = "", image: str = "", image_digest: str = "", **more: Any) -> dict[str, Any]:
    """`extra=` for a log call about a device event: structured fields in the journal and the JSON line."""
    fields = {"event": name, "device": device, "image": image, "image_digest": image_digest, **more}
    return {"fields": {k: v for k, v in fields.items() if v not in ("", None)}}


def device_event(name: str, rec: DeviceRecord) -> dict[str, Any]:
    """`event` for a device record: its id, reference and lazy (or source) manifest digest."""
    return event(name, rec.id, rec.ref, rec.pin.get("lazy") or rec.pin.get("source") or "")


def _message(record: logging.LogRecord) -> str:
    msg = record.getMessage()
    return scrub(msg if len(msg) <= MAX_MSG else msg[:MAX_MSG] + " [truncated]")


def _exception(record: logging.LogRecord, fmt: logging.Formatter) -> str:
    if not record.exc_info:
        return ""
    text = fmt.formatException(record.exc_info)
    return scrub(text if len(text) <= MAX_EXC else "[truncated] " + text[-MAX_EXC:])


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = getattr(record, "fields", None)
    out = {k: scrub(v) if isinstance(v, str) else v for k, v in extra.items()} if isinstance(extra, dict) else {}
    if getattr(record, "repeated", 0):
        out["repeated"] = record.repeated  # type: ignore[attr-defined]
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        obj.update(_fields(record))
        exc = _exception(record, self)
        if exc:
            obj["exc"] = exc
        return json.dumps(obj, default=str)


# -- the journal -------------------------------------------------------------------------------
def _journal_field(key: str, value: str) -> bytes:
    """One field of the native protocol: KEY=VALUE, or KEY, a 64-bit length and the bytes when
    the value holds a newline."""
    k = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_")[:64].encode()
    v = value.encode("utf-8", "replace")
    if b"\n" in v:
        return k + b"\n" + struct.pack("<Q", len(v)) + v + b"\n"
    return k + b"=" + v + b"\n"


def journal_datagram(record: logging.LogRecord, fmt: logging.Formatter) -> bytes:
    msg = _message(record)
    exc = _exception(record, fmt)
    parts = [
        ("MESSAGE", f"{msg}\n{exc}" if exc else msg),
        ("PRIORITY", str(_PRIORITY.get(record.levelno, 6))),
        ("SYSLOG_IDENTIFIER", "bdserver"),
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", str(record.lineno)),
        ("CODE_FUNC", record.funcName),
        ("BDSERVER_LOGGER", record.name),
    ]
    parts += [(f"BDSERVER_{k}", str(v)) for k, v in _fields(record).items()]
    return b"".join(_journal_field(k, v) for k, v in parts)


class JournalHandler(logging.Handler):
    """Sends records to journald's datagram socket; when that fails (journald restarting), the
    record goes to stderr as a JSON line, which systemd also collects."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(1.0)  # never hold up a read path for long behind a stuck journald
        self._fallback = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(journal_datagram(record, self._fallback), self.path)
        except OSError:
            try:
                sys.stderr.write(self._fallback.format(record) + "\n")
                sys.stderr.flush()
            except Exception:  # noqa: BLE001 - logging must never raise into the caller
                self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def under_systemd(journal_socket: str) -> bool:
    """Started by systemd (which sets INVOCATION_ID, and JOURNAL_STREAM for journal-bound output)
    on a host whose journald listens on ``journal_socket``."""
    if not (os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM")):
        return False
    try:
        return stat.S_ISSOCK(os.stat(journal_socket).st_mode)
    except OSError:
        return False


# -- repeated warnings -------------------------------------------------------------------------
@dataclass
class _Seen:
    until: float
    suppressed: int = 0
    last: logging.LogRecord | None = field(default=None, repr=False)


class RepeatFilter(logging.Filter):
    """Lets the first of identical warnings through per window and counts the others; `flush()`
    (a timer calls it) logs the last of each ended window once more, with the count."""

    MAX_KEYS = 1024  # distinct warnings tracked at once; the oldest is flushed to make room

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, int, str], _Seen] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or self.window_s <= 0 or getattr(record, "repeated", 0):
            return True
        decided = getattr(record, "_bdserver_pass", None)  # several handlers, one decision
        if decided is not None:
            return bool(decided)
        key = (record.name, record.levelno, _NUMBERS.sub("#", str(record.msg)))
        now = self.clock()
        ended: list[_Seen] = []
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now < seen.until:
                seen.suppressed += 1
                seen.last = record
                ok = False
            else:
                if seen is not None:
                    ended.append(seen)
                self._seen[key] = _Seen(now + self.window_s)
                self._seen.move_to_end(key)
                while len(self._seen) > self.MAX_KEYS:
                    ended.append(self._seen.popitem(last=False)[1])
                ok = True
        record._bdserver_pass = ok  # type: ignore[attr-defined]
        self._report(ended)
        return ok

    def flush(self, everything: bool = False) -> None:
        now = self.clock()
        with self._lock:
            ended = [k for k, s in self._seen.items() if everything or now >= s.until]
            done = [self._seen.pop(k) for k in ended]
        self._report(done)

    def _report(self, ended: list[_Seen]) -> None:
        for s in ended:
            if not s.suppressed or s.last is None:
                continue
            rec = logging.makeLogRecord(s.last.__dict__)
            rec.msg = f"{s.last.getMessage()} [repeated {s.suppressed} more times in {self.window_s:g} s]"
            rec.args, rec.exc_info, rec.exc_text = None, None, None
            rec.repeated = s.suppressed  # type: ignore[attr-defined]
            rec.created = time.time()
            logging.getLogger(rec.name).handle(rec)


# -- setup -------------------------------------------------------------------------------------
def setup_logging(cfg: Config) -> None:
    """Send the daemon's logs where `cfg` says (see the module docstring)."""
    root = logging.getLogger()
    for h in root.handlers[:]:
        root.removeHandler(h)
        h.close()
    root.setLevel(cfg.log_level.upper())
    target = cfg.log_target
    if target == "auto":
        target = "journal" if under_systemd(cfg.journal_socket) else "file"
    fmt = JsonFormatter()
    handlers: list[logging.Handler] = []
    if target == "journal":
        handlers.append(JournalHandler(cfg.journal_socket))
    else:
        os.makedirs(os.path.dirname(cfg.log_file) or ".", mode=0o700, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(
            cfg.log_file, maxBytes=cfg.log_max_bytes, backupCount=cfg.log_backups, encoding="utf-8"))
        if sys.stderr.isatty():
            handlers.append(logging.StreamHandler(sys.stderr))
    repeats = RepeatFilter(cfg.log_repeat_window_s)
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(repeats)
        root.addHandler(h)
    atexit.register(repeats.flush, True)  # runs before logging's own shutdown (atexit is LIFO)
    if cfg.log_repeat_window_s > 0:
        tick = min(1.0, cfg.log_repeat_window_s)

        def flush_repeats() -> None:
            while True:
                time.sleep(tick)
                repeats.flush()

        threading.Thread(target=flush_repeats, name="log-repeats", daemon=True).start()
