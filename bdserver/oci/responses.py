"""Reading registry answers within bounds.

A registry, a mirror or a token server is not trusted to send a sane amount of bytes: every body
the client keeps in memory is read incrementally against a cap for its kind and refused (before
reading, when Content-Length says so) once it is larger. Error bodies are only ever read as far
as a short message needs. Bodies are read raw: every request asks for ``identity``, and a
content-encoded answer is refused rather than decompressed (no decompression bombs).
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

import httpx

from bdserver.errors import FormatError

MAX_MANIFEST_BODY = 4 << 20  # distribution refuses larger manifests; so does every client that matters
MAX_INDEX_BODY = 4 << 20  # image indexes and Referrers API pages (an index is a manifest)
MAX_TAGS_BODY = 1 << 20  # one page of a tag list (n=1000 tags of <= 128 characters)
MAX_TOKEN_BODY = 256 << 10  # a token response (JWTs are a few KiB)
MAX_ERROR_BODY = 16 << 10  # what is read of an error (or an unused) body before dropping the connection
READ_SIZE = 1 << 16


class Transient(Exception):
    """A failure worth retrying; ``error`` (if set) is raised when retries run out."""

    def __init__(self, reason: str, error: Exception | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.error = error
        self.retry_after = retry_after


def _encoded(resp: httpx.Response) -> bool:
    return resp.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity")


def read_body(resp: httpx.Response, limit: int, what: str) -> bytes:
    """The whole body of a streaming response, or FormatError once it is larger than ``limit``.

    Nothing past ``limit`` is read: an announced Content-Length over the cap is refused unread,
    an unannounced one after ``limit + 1`` bytes; the connection is then closed, not drained.
    """
    if _encoded(resp):
        resp.close()
        raise FormatError(f"{what}: the server sent it {resp.headers['content-encoding']}-encoded although "
                          f"identity was asked; refused")
    cl = resp.headers.get("content-length", "")
    if cl.isdigit() and int(cl) > limit:
        resp.close()
        raise FormatError(f"{what}: the server announces {cl} bytes, more than the {limit} bdserver reads; "
                          f"refused unread")
    buf = bytearray()
    for chunk in resp.iter_raw(READ_SIZE):
        buf += chunk
        if len(buf) > limit:
            resp.close()
            raise FormatError(f"{what} is larger than the {limit} bytes bdserver reads; refused")
    return bytes(buf)


def discard(resp: httpx.Response) -> None:
    """Close a response; a short body is drained first so that the connection can be reused."""
    try:
        if not resp.is_closed and not resp.is_stream_consumed and not _encoded(resp):
            n = 0
            for chunk in resp.iter_raw(READ_SIZE):
                n += len(chunk)
                if n > MAX_ERROR_BODY:
                    break
    except httpx.HTTPError:
        pass
    finally:
        resp.close()


def error_text(resp: httpx.Response) -> str:
    """The registry's error code and message (distribution's JSON errors), or the start of the body."""
    import json

    raw = b""
    try:
        if not resp.is_stream_consumed and not _encoded(resp):
            for chunk in resp.iter_raw(READ_SIZE):
                raw += chunk
                if len(raw) >= MAX_ERROR_BODY:
                    raw = raw[:MAX_ERROR_BODY]
                    break
    except httpx.HTTPError:
        pass
    finally:
        resp.close()
    try:
        errs = json.loads(raw).get("errors") or []
        if errs:
            e = errs[0]
            return f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")[:200]
    except Exception:  # noqa: BLE001 - the body is not distribution's JSON error document
        pass
    return raw[:200].decode("utf-8", "replace").strip()


def retry_after(resp: httpx.Response) -> float | None:
    """Retry-After in seconds (delta or HTTP date), or None."""
    v = resp.headers.get("retry-after")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(v).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def content_type(resp: httpx.Response) -> str:
    return resp.headers.get("content-type", "").split(";")[0].strip()
