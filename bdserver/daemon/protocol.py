"""Control socket protocol: one JSON object per line, one request and one reply per connection.

Request: ``{"op": "attach", "args": {...}}``. Reply: ``{"ok": true, "result": {...}}`` or
``{"ok": false, "error": {"type", "message", "hint", "exit_code"}}``. Errors cross the socket as
their BdError class name so the CLI prints the same one-line message and exit code as in-process.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from bdserver.errors import BdError, DaemonError, from_wire

MAX_LINE = 16 * 1024 * 1024


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def error_reply(exc: BaseException) -> dict[str, Any]:
    if not isinstance(exc, BdError):
        exc = DaemonError(f"internal error: {exc!r}")
    return {"ok": False, "error": exc.to_wire()}


def read_line(sock: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_LINE:
            raise DaemonError("control message too large")
    return bytes(buf)


def call(socket_path: str, op: str, args: dict[str, Any] | None = None, timeout: float | None = 600) -> Any:
    """Send one request; return the result or raise the daemon's error. Raises ConnectionError if the
    daemon is not listening (callers may start it)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(socket_path)
        s.sendall(encode({"op": op, "args": args or {}}))
        line = read_line(s)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ConnectionError(str(exc)) from exc
    except PermissionError as exc:
        raise DaemonError(f"not allowed to talk to the daemon at {socket_path} (root only)") from exc
    except TimeoutError as exc:
        raise DaemonError(f"the daemon at {socket_path} did not answer {op!r} in time") from exc
    finally:
        s.close()
    if not line:
        raise DaemonError(f"the daemon at {socket_path} closed the connection during {op!r}")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise from_wire(reply.get("error") or {})
    return reply.get("result")
