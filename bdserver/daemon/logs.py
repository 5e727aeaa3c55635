"""Structured logs: one JSON object per line, to stderr and the daemon log file.

Credentials never reach a log line: URLs lose their userinfo and Authorization/token values are masked.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_SECRET = [
    (re.compile(r"(?i)(authorization|proxy-authorization)(['\"]?\s*[:=]\s*['\"]?)([^'\",}]+)"), r"\1\2***"),
    (re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"(?i)((?:password|token|secret|auth)['\"]?\s*[:=]\s*['\"]?)([^'\",}\s]+)"), r"\1***"),
    (re.compile(r"(://)[^/@\s]+@"), r"\1***@"),
]


def scrub(text: str) -> str:
    for rx, repl in _SECRET:
        text = rx.sub(repl, text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            obj.update({k: scrub(str(v)) if isinstance(v, str) else v for k, v in extra.items()})
        if record.exc_info:
            obj["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(obj, default=str)


def setup_logging(log_file: str | None, level: str = "INFO") -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    fmt = JsonFormatter()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(fmt)
    root.addHandler(h)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
