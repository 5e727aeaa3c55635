"""The registry client (OCI distribution-spec v1.1 over httpx), an ImageStore per repository.

Built for the lazy read path as much as for push and pull: ``read_range`` is thread-safe and
called from many threads at once over a pooled connection set; transient failures (429 with
Retry-After, 5xx, resets, short bodies) are retried with bounded exponential backoff and
jitter, then surface as FetchError so the device can answer EIO rather than hang. Redirects to
blob storage are followed by hand and never receive the registry's Authorization header.
Mirrors from hosts.toml are tried first, the upstream last.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator, TypeVar
from urllib.parse import quote

import httpx

from bdserver.errors import AuthError, FetchError, FormatError, IntegrityError, NotFoundError, RegistryError
from bdserver.oci import mediatypes as mt
from bdserver.oci.auth import Authorizer, CredentialStore, scope_for
from bdserver.digest import VerifyingReader, hasher, is_digest, parse_digest, sha256_digest
from bdserver.oci.hosts import RegistryHost, load_hosts
from bdserver.oci.model import Descriptor, Index, detect_media_type, parse_manifest
from bdserver.oci.reference import Reference, parse_reference

log = logging.getLogger(__name__)


class _RedactQuery(logging.Filter):
    """httpx logs request URLs at INFO; signed blob URLs carry credentials in their query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(_redact(a) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


logging.getLogger("httpx").addFilter(_RedactQuery())

T = TypeVar("T")

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_MANIFEST_SIZE = 4 << 20  # distribution-spec: registries may refuse larger; we refuse to read more
DEFAULT_CHUNK_SIZE = 8 << 20
REDIRECT_CACHE_SECONDS = 240.0  # signed blob URLs typically live >= 300 s
MAX_PAGES = 1000


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: ``attempts`` tries in all, sleeping base*2^n (jittered, capped) in between."""

    attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 5.0
    max_retry_after: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        d = min(self.max_delay, self.base_delay * (2**attempt)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_retry_after))
        return d


def _retry_after(resp: httpx.Response) -> float | None:
    v = resp.headers.get("retry-after")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(v).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _redact(url: httpx.URL | str) -> str:
    """URL without its query (signed URLs carry credentials there)."""
    u = httpx.URL(str(url))
    return str(u.copy_with(query=None)) + ("?…" if u.query else "")


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        errs = body.get("errors") or []
        if errs:
            e = errs[0]
            return f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
    except Exception:  # noqa: BLE001 - body is not the JSON error document
        pass
    try:
        return resp.text[:200].strip()
    except Exception:  # noqa: BLE001
        return ""


def _content_type(resp: httpx.Response) -> str:
    return resp.headers.get("content-type", "").split(";")[0].strip()


class _Transient(Exception):
    """A failure worth retrying; ``error`` (if set) is raised when retries run out."""

    def __init__(self, reason: str, error: Exception | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.error = error
        self.retry_after = retry_after


_SHARED: dict[tuple, "RegistryClient"] = {}
_SHARED_LOCK = threading.Lock()


class RegistryClient:
    """Connections, auth and retries for one registry host (and its mirrors).

    ``host`` is the registry as written in references (``127.0.0.1:5000``, ``docker.io``).
    One client serves any number of repositories: ``client.repository("a/b")``.
    """

    def __init__(
        self,
        host: str,
        *,
        credentials: CredentialStore | None = None,
        docker_config: str | None = None,
        hosts_dirs: list[str] | None = None,
        plain_http: bool | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        max_connections: int = 64,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        user_agent: str = "bdserver/0.1",
    ):
        self.host = host
        self.creds = credentials or CredentialStore(docker_config)
        self.endpoints = load_hosts(host, hosts_dirs, plain_http)
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.chunk_size = chunk_size
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._ua = user_agent
        self._clients: dict[RegistryHost, httpx.Client] = {}
        self._auth: dict[str, Authorizer] = {}
        self._lock = threading.Lock()
        self._redirects: dict[str, tuple[httpx.URL, float]] = {}
        self.stats = {"requests": 0, "retries": 0, "bytes": 0}  # approximate under threads
        self._warned_no_range = False

    @classmethod
    def shared(cls, host: str, **kw: Any) -> "RegistryClient":
        """One client per (host, options) per process: connection pools and tokens are reused.

        The daemon's read path should use this so that every device on a registry shares a pool.
        """
        key = (host, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        with _SHARED_LOCK:
            c = _SHARED.get(key)
            if c is None:
                c = _SHARED[key] = cls(host, **kw)
            return c

    @classmethod
    def for_reference(cls, ref: Reference | str, **kw: Any) -> "RegistryClient":
        r = parse_reference(ref) if isinstance(ref, str) else ref
        if r.is_layout:
            raise FormatError(f"{r} is an OCI layout, not a registry reference")
        return cls(r.host, **kw)

    def repository(self, name: str) -> "RegistryRepository":
        return RegistryRepository(self, name)

    def close(self) -> None:
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _client(self, ep: RegistryHost) -> httpx.Client:
        with self._lock:
            c = self._clients.get(ep)
            if c is None:
                verify: Any = True
                if ep.scheme == "https" and (ep.skip_verify or ep.ca or ep.client_certs):
                    ctx = ssl.create_default_context()
                    if ep.skip_verify:
                        ctx.check_hostname = False
                        ctx.verify_mode = ssl.CERT_NONE
                    for ca in ep.ca:
                        ctx.load_verify_locations(ca)
                    for cert, key in ep.client_certs:
                        ctx.load_cert_chain(cert, key)
                    verify = ctx
                kw: dict[str, Any] = {}
                if ep.scheme == "http" and not _env_proxies():
                    # plain HTTP: do not build (and load CAs into) an SSL context up front; an
                    # https redirect target still gets a fully verifying one, on first use
                    kw["transport"] = _LazyTLSTransport(limits=self._limits)
                    kw["mounts"] = {"http://": httpx.HTTPTransport(verify=False, limits=self._limits)}
                c = httpx.Client(
                    verify=verify,
                    timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
                    limits=self._limits,
                    follow_redirects=False,
                    headers={"User-Agent": self._ua},
                    **kw,
                )
                self._clients[ep] = c
            return c

    def _authorizer(self, ep: RegistryHost) -> Authorizer:
        # credentials belong to the upstream name; a mirror may ask for them too
        with self._lock:
            a = self._auth.get(ep.netloc)
            if a is None:
                a = self._auth[ep.netloc] = Authorizer(self.host, self.creds)
            return a

    def endpoints_for(self, capability: str) -> list[RegistryHost]:
        eps = [e for e in self.endpoints if e.can(capability)]
        if not eps:
            raise RegistryError(f"{self.host}: no host in hosts.toml has the {capability!r} capability")
        return eps

    def request(
        self,
        capability: str,
        method: str,
        path: str,
        *,
        scopes: tuple[str, ...] = (),
        headers: dict[str, str] | None = None,
        params: Iterable[tuple[str, str]] = (),
        content: bytes | None = None,
        expect: Iterable[int] = (200,),
        consume: Callable[[httpx.Response], T] | None = None,
        attempts: int | None = None,
        url: httpx.URL | None = None,
        redirect_key: str | None = None,
        exhausted: type[RegistryError] = FetchError,
    ) -> tuple[httpx.Response, T | None]:
        """Send one logical request; returns ``(response, consume(response))``.

        Tries each endpoint with ``capability`` in order (a mirror's failure falls through to the
        next), retrying transient failures on each. ``consume`` runs inside the retry loop with
        the response still streaming: it may read the body and raise ``_Transient`` to retry.
        Statuses outside ``expect`` raise NotFoundError/AuthError/RegistryError.
        """
        eps = self.endpoints_for(capability)
        last: Exception | None = None
        for i, ep in enumerate(eps):
            final = i == len(eps) - 1
            try:
                n = attempts or (self.retry.attempts if final else min(2, self.retry.attempts))
                resp, val = self._attempts(ep, method, path, scopes, headers or {}, list(params), content,
                                           frozenset(expect), consume, n, url, redirect_key, exhausted)
                if resp.status_code == 404 and not final:
                    last = NotFoundError(f"{ep}: {method} {path}: not found")
                    continue
                return resp, val
            except (RegistryError, IntegrityError) as e:
                if final:
                    raise
                log.info("registry %s: %s; trying the next host", ep, e)
                last = e
        raise last or RegistryError(f"{self.host}: no endpoint answered")

    def _attempts(self, ep, method, path, scopes, headers, params, content, expect, consume, attempts,
                  url_override, redirect_key, exhausted):
        client = self._client(ep)
        auth = self._authorizer(ep)
        auth_rounds = 0
        attempt = 0
        last_reason = ""
        last_error: Exception | None = None
        while attempt < attempts:
            # where to send: a cached redirect target (no auth), else the endpoint
            url = url_override or httpx.URL(ep.url(path))
            if ep.mirror_of:
                params_all = [*params, ("ns", ep.mirror_of)]
            else:
                params_all = params
            if params_all and url_override is None:
                url = url.copy_merge_params(params_all)
            send_auth = True
            cached = self._redirects.get(redirect_key) if redirect_key else None
            used_cache = False
            if cached and cached[1] > time.monotonic():
                url, send_auth, used_cache = cached[0], False, True
            hops = 0
            try:
                while True:
                    h = dict(headers)
                    sent_auth = None
                    if send_auth:
                        for k, v in ep.headers:
                            h[k] = v
                        sent_auth = auth.header(scopes)
                        if sent_auth:
                            h["Authorization"] = sent_auth
                    req = client.build_request(method, url, headers=h, content=content)
                    self.stats["requests"] += 1
                    resp = client.send(req, stream=True)
                    log.debug("%s %s -> %d", method, _redact(url), resp.status_code)
                    if resp.status_code in REDIRECT_STATUS and "location" in resp.headers and hops < MAX_REDIRECTS:
                        nxt = resp.url.join(resp.headers["location"])
                        resp.close()
                        hops += 1
                        if (nxt.scheme, nxt.host, nxt.port) != (url.scheme, url.host, url.port):
                            send_auth = False  # never hand registry credentials to blob storage
                        if redirect_key and not send_auth:
                            self._redirects[redirect_key] = (nxt, time.monotonic() + REDIRECT_CACHE_SECONDS)
                        url = nxt
                        continue
                    break
                if used_cache and resp.status_code in (401, 403, 404, 410):
                    # the signed URL expired: ask the registry again (does not count as a retry)
                    resp.close()
                    self._redirects.pop(redirect_key, None)  # type: ignore[arg-type]
                    continue
                if resp.status_code == 401 and send_auth:
                    resp.read()
                    resp.close()
                    auth_rounds += 1
                    if auth_rounds > 2 or not auth.challenge(resp, scopes, client, sent_auth):
                        raise AuthError(f"{self.host}: {method} {path}: authentication failed ({_error_text(resp)})")
                    continue
                if resp.status_code in RETRY_STATUS:
                    resp.read()
                    resp.close()
                    raise _Transient(f"HTTP {resp.status_code}", retry_after=_retry_after(resp))
                if resp.status_code not in expect:
                    resp.read()
                    resp.close()
                    self._raise_status(resp, method, path)
                if consume is None:
                    resp.read()
                    resp.close()
                    self.stats["bytes"] += len(resp.content)
                    return resp, None
                try:
                    val = consume(resp)
                finally:
                    resp.close()
                return resp, val
            except _Transient as t:
                last_reason, last_error = str(t), t.error
                retry_after = t.retry_after
                if redirect_key:
                    self._redirects.pop(redirect_key, None)
            except (httpx.TransportError, httpx.DecodingError) as e:
                if "CERTIFICATE_VERIFY_FAILED" in str(e) or "WRONG_VERSION_NUMBER" in str(e):
                    # not transient: retrying cannot fix a trust or scheme mismatch
                    raise RegistryError(
                        f"{self.host}: TLS with {ep.netloc} failed ({e}); trust its CA with `ca = ...` (or "
                        f"`skip_verify = true`) in hosts.toml, or use http:// for a plain-HTTP registry") from None
                last_reason, last_error, retry_after = f"{e.__class__.__name__}: {e}", None, None
                if redirect_key:
                    self._redirects.pop(redirect_key, None)
            attempt += 1
            if attempt < attempts:
                d = self.retry.delay(attempt - 1, retry_after)
                self.stats["retries"] += 1
                log.info("registry %s: %s %s: %s; retry %d/%d in %.2fs", ep.netloc, method, path, last_reason,
                         attempt, attempts - 1, d)
                time.sleep(d)
        if last_error is not None:
            raise last_error
        raise exhausted(f"{self.host}: {method} {path} failed after {attempts} attempts: {last_reason}")

    def _raise_status(self, resp: httpx.Response, method: str, path: str) -> None:
        msg = f"{self.host}: {method} {path}: HTTP {resp.status_code}"
        detail = _error_text(resp)
        if detail:
            msg += f" ({detail})"
        if resp.status_code == 404:
            raise NotFoundError(msg)
        if resp.status_code in (401, 403):
            raise AuthError(msg)
        raise RegistryError(msg)

    def ping(self) -> None:
        """GET /v2/ (authenticating if challenged): raises if the registry is unusable."""
        self.request("resolve", "GET", "/", expect=(200,), exhausted=RegistryError)


def _env_proxies() -> bool:
    return any(os.environ.get(k) for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                           "all_proxy"))


class _LazyTLSTransport(httpx.BaseTransport):
    """httpx's default (verifying) transport, built when the first request needs it."""

    def __init__(self, **kw: Any) -> None:
        self._kw = kw
        self._t: httpx.HTTPTransport | None = None
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        t = self._t
        if t is None:
            with self._lock:
                if self._t is None:
                    self._t = httpx.HTTPTransport(verify=True, **self._kw)
                t = self._t
        return t.handle_request(request)

    def close(self) -> None:
        with self._lock:
            t, self._t = self._t, None
        if t is not None:
            t.close()


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class RegistryRepository:
    """One repository of a registry, as an ImageStore plus ranged reads and referrers."""

    def __init__(self, client: RegistryClient, name: str, *, writer: bool = False):
        self.client = client
        self.name = name
        self.writer = writer  # True: every request goes to push-capable hosts (no mirrors)
        self._sizes: dict[str, int] = {}
        self.last_oci_subject: str | None = None  # OCI-Subject header of the last manifest PUT

    def for_writing(self) -> "RegistryRepository":
        """The same repository seen through push-capable hosts only.

        Read-modify-write (the referrers tag) and existence checks before a push must read what
        the upstream holds, not what a mirror cached.
        """
        if self.writer:
            return self
        r = RegistryRepository(self.client, self.name, writer=True)
        r._sizes = self._sizes
        return r

    def _cap(self, capability: str) -> str:
        return "push" if self.writer else capability

    def __repr__(self) -> str:
        return f"RegistryRepository({self.client.host}/{self.name})"

    def reference(self, tag: str | None = None, digest: str | None = None) -> Reference:
        return Reference(host=self.client.host, repository=self.name, tag=tag, digest=digest)

    def _pull_scope(self) -> tuple[str, ...]:
        return (scope_for(self.name, "pull"),)

    def _push_scope(self) -> tuple[str, ...]:
        return (scope_for(self.name, "pull,push"),)

    # -- manifests -----------------------------------------------------------------------------

    def resolve(self, ref: str) -> Descriptor:
        resp, _ = self.client.request(
            self._cap("resolve" if not is_digest(ref) else "pull"), "HEAD", f"/{self.name}/manifests/{quote(ref, safe=':')}",
            scopes=self._pull_scope(), headers={"Accept": mt.MANIFEST_ACCEPT}, exhausted=RegistryError,
        )
        digest = resp.headers.get("docker-content-digest")
        ctype = _content_type(resp)
        size = resp.headers.get("content-length")
        if is_digest(ref):
            digest = ref
        if digest and is_digest(digest) and ctype in mt.MANIFEST_TYPES + mt.INDEX_TYPES and size:
            return Descriptor(media_type=ctype, digest=digest, size=int(size))
        _, desc = self.get_manifest(ref)
        return desc

    def get_manifest(self, ref: str) -> tuple[bytes, Descriptor]:
        want = ref if is_digest(ref) else None

        def consume(resp: httpx.Response) -> tuple[bytes, Descriptor]:
            buf = bytearray()
            for c in resp.iter_bytes():
                buf += c
                if len(buf) > MAX_MANIFEST_SIZE:
                    raise FormatError(f"manifest {ref} is larger than {MAX_MANIFEST_SIZE} bytes")
            data = bytes(buf)
            expected = want or resp.headers.get("docker-content-digest")
            if expected and is_digest(expected):
                h = hasher(expected)
                h.update(data)
                got = f"{h.name}:{h.hexdigest()}"
                if got != expected:
                    raise _Transient("manifest digest mismatch", IntegrityError(
                        f"manifest {self.name}@{expected}: content has digest {got}"))
            digest = want or sha256_digest(data)
            ctype = _content_type(resp)
            mtype = ctype if ctype in mt.MANIFEST_TYPES + mt.INDEX_TYPES else detect_media_type(data, ctype)
            return data, Descriptor(media_type=mtype, digest=digest, size=len(data))

        _, val = self.client.request(
            self._cap("resolve" if want is None else "pull"), "GET", f"/{self.name}/manifests/{quote(ref, safe=':')}",
            scopes=self._pull_scope(), headers={"Accept": mt.MANIFEST_ACCEPT}, consume=consume,
            exhausted=RegistryError,
        )
        assert val is not None
        return val

    def put_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> Descriptor:
        parsed = parse_manifest(data, media_type)
        digest = sha256_digest(data)
        target = tag or digest
        resp, _ = self.client.request(
            "push", "PUT", f"/{self.name}/manifests/{quote(target, safe=':')}",
            scopes=self._push_scope(), headers={"Content-Type": media_type}, content=data,
            expect=(200, 201, 202), exhausted=RegistryError,
        )
        got = resp.headers.get("docker-content-digest")
        if got and got != digest:
            raise IntegrityError(f"{self.client.host}/{self.name}: registry stored manifest as {got}, expected {digest}")
        self.last_oci_subject = resp.headers.get("oci-subject")
        at = parsed.artifact_type
        if at is None and parsed.subject is not None and hasattr(parsed, "config"):
            at = parsed.config.media_type  # type: ignore[union-attr]
        log.info("pushed manifest %s/%s@%s%s", self.client.host, self.name, digest, f" as {tag}" if tag else "")
        return Descriptor(media_type=media_type, digest=digest, size=len(data), artifact_type=at)

    def delete_manifest(self, digest: str) -> None:
        self.client.request("push", "DELETE", f"/{self.name}/manifests/{digest}", scopes=(scope_for(self.name, "delete"),
                            *self._push_scope()), expect=(200, 202), exhausted=RegistryError)

    def list_tags(self) -> list[str]:
        tags: list[str] = []
        params: list[tuple[str, str]] = [("n", "1000")]
        for _ in range(MAX_PAGES):
            resp, _ = self.client.request(self._cap("resolve"), "GET", f"/{self.name}/tags/list", scopes=self._pull_scope(),
                                          params=params, exhausted=RegistryError)
            try:
                tags += resp.json().get("tags") or []
            except ValueError:
                raise FormatError(f"{self.client.host}/{self.name}: tag list is not JSON") from None
            nxt = resp.links.get("next", {}).get("url")
            if not nxt:
                break
            q = httpx.URL(nxt).params
            params = list(q.multi_items())
        return tags

    # -- blobs ---------------------------------------------------------------------------------

    def _blob_path(self, digest: str) -> str:
        parse_digest(digest)
        return f"/{self.name}/blobs/{digest}"

    def has_blob(self, digest: str) -> bool:
        resp, _ = self.client.request(self._cap("pull"), "HEAD", self._blob_path(digest), scopes=self._pull_scope(),
                                      expect=(200, 404), exhausted=RegistryError)
        if resp.status_code == 200 and resp.headers.get("content-length"):
            self._sizes[digest] = int(resp.headers["content-length"])
        return resp.status_code == 200

    def note_size(self, digest: str, size: int) -> None:
        """Tell the client a blob's size (from its descriptor) and save a HEAD before ranged reads."""
        self._sizes[digest] = size

    def blob_size(self, digest: str) -> int:
        s = self._sizes.get(digest)
        if s is not None:
            return s
        try:
            resp, _ = self.client.request(self._cap("pull"), "HEAD", self._blob_path(digest),
                                          scopes=self._pull_scope(), exhausted=RegistryError)
            cl = resp.headers.get("content-length")
        except NotFoundError:
            raise
        except (AuthError, RegistryError) as e:
            # signed storage URLs often refuse HEAD: learn the size from a 1-byte ranged GET
            log.debug("HEAD of %s failed (%s); sizing with a ranged GET", digest, e)
            cl = None
        if cl is None:
            resp, _ = self.client.request(self._cap("pull"), "GET", self._blob_path(digest), scopes=self._pull_scope(),
                                          headers={"Range": "bytes=0-0", "Accept-Encoding": "identity"},
                                          expect=(200, 206), consume=lambda r: None,
                                          redirect_key=f"{self.name}@{digest}", exhausted=FetchError)
            m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
            if m and m.group(3) != "*":
                cl = m.group(3)
            elif resp.status_code == 200:
                cl = resp.headers.get("content-length")
        if cl is None:
            raise RegistryError(f"{self.client.host}/{self.name}: cannot learn the size of blob {digest}")
        self._sizes[digest] = int(cl)
        return int(cl)

    def read_range(self, digest: str, offset: int, length: int, size: int | None = None) -> bytes:
        """Bytes ``[offset, offset+length)`` of a blob, clamped to its size (b"" past the end).

        Unverified (a range cannot be checked against the blob digest; the chunk index checks
        chunks). Retries resets, 5xx, 429 and short bodies; FetchError when retries run out.
        ``size`` (from the descriptor) saves the one HEAD per blob otherwise needed to clamp.
        """
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if size is not None:
            self._sizes.setdefault(digest, size)
        size = self.blob_size(digest)
        if length == 0 or offset >= size:
            return b""
        end = min(offset + length, size) - 1
        want = end - offset + 1

        def consume(resp: httpx.Response) -> bytes:
            if resp.status_code == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
                if not m or int(m.group(1)) != offset or int(m.group(2)) != end:
                    raise _Transient(f"unexpected Content-Range {resp.headers.get('content-range')!r}")
                data = resp.read()
                if len(data) != want:
                    raise _Transient(f"short body: {len(data)} of {want} bytes")
                return data
            # 200: the whole blob (proxies, some CDNs); skip to the range without buffering it all
            if not self.client._warned_no_range:
                self.client._warned_no_range = True
                log.warning("%s ignores Range requests (HTTP 200 to a ranged GET of %s): lazy reads will "
                            "transfer whole blobs", self.client.host, digest)
            out = bytearray()
            pos = 0
            for c in resp.iter_raw(1 << 16):
                if pos + len(c) > offset and len(out) < want:
                    lo = max(0, offset - pos)
                    out += c[lo : lo + want - len(out)]
                pos += len(c)
                if len(out) >= want:
                    break
            if len(out) != want:
                raise _Transient(f"short body: {len(out)} of {want} bytes")
            return bytes(out)

        _, data = self.client.request(
            self._cap("pull"), "GET", self._blob_path(digest), scopes=self._pull_scope(),
            headers={"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"},
            expect=(200, 206), consume=consume, redirect_key=f"{self.name}@{digest}", exhausted=FetchError,
        )
        self.client.stats["bytes"] += want
        return data  # type: ignore[return-value]

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        """A streaming, resuming (Range from the current offset) and digest-verifying reader."""
        if size is not None:
            self._sizes[digest] = size
        return io.BufferedReader(VerifyingReader(_BlobStream(self, digest, size), digest, size),  # type: ignore[arg-type]
                                 buffer_size=1 << 20)

    def read_blob(self, digest: str, size: int | None = None) -> bytes:
        with self.open_blob(digest, size) as f:
            return f.read()

    def mount_blob(self, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; True if the registry linked the blob without an upload."""
        resp, _ = self.client.request(
            "push", "POST", f"/{self.name}/blobs/uploads/", params=[("mount", digest), ("from", from_repo)],
            scopes=(*self._push_scope(), scope_for(from_repo, "pull")), expect=(201, 202), exhausted=RegistryError,
        )
        if resp.status_code == 201:
            log.info("mounted %s from %s into %s", digest, from_repo, self.name)
            return True
        loc = resp.headers.get("location")
        if loc:
            try:
                self.client.request("push", "DELETE", "", url=resp.url.join(loc), scopes=self._push_scope(),
                                    expect=(200, 204, 404), attempts=1, exhausted=RegistryError)
            except RegistryError:
                pass
        return False

    def put_blob(self, fileobj: BinaryIO, digest: str, size: int, *, mount_from: str | None = None) -> bool:
        """Upload unless present (HEAD) or mountable; True if bytes were sent.

        Small blobs go in one PUT, large ones in PATCH chunks of ``client.chunk_size``. A failed
        upload restarts from the beginning when ``fileobj`` is seekable (bounded attempts).
        """
        parse_digest(digest)
        if self.for_writing().has_blob(digest):
            return False
        if mount_from and mount_from != self.name and self.mount_blob(digest, mount_from):
            return False
        start = fileobj.tell() if fileobj.seekable() else None
        tries = self.client.retry.attempts
        for i in range(tries):
            try:
                self._upload(fileobj, digest, size)
                self._sizes[digest] = size
                return True
            except FetchError as e:
                if start is None or i == tries - 1:
                    raise RegistryError(f"upload of {digest} to {self.client.host}/{self.name} failed: {e}") from None
                log.info("upload of %s failed (%s); restarting", digest, e)
                fileobj.seek(start)
                time.sleep(self.client.retry.delay(i))
        raise AssertionError("unreachable")

    def put_blob_bytes(self, data: bytes, digest: str | None = None) -> str:
        digest = digest or sha256_digest(data)
        self.put_blob(io.BytesIO(data), digest, len(data))
        return digest

    def _start_upload(self) -> httpx.URL:
        resp, _ = self.client.request("push", "POST", f"/{self.name}/blobs/uploads/", scopes=self._push_scope(),
                                      expect=(202,), exhausted=FetchError)
        loc = resp.headers.get("location")
        if not loc:
            raise RegistryError(f"{self.client.host}: upload started without a Location")
        return resp.url.join(loc)

    def _upload(self, fileobj: BinaryIO, digest: str, size: int) -> None:
        loc = self._start_upload()
        h = hasher(digest)
        chunk = self.client.chunk_size
        if size <= chunk:
            data = _read_exact(fileobj, size)
            h.update(data)
            self._check(h, digest, size, len(data), fileobj)
            self._finish_upload(loc, digest, data)
            return
        off = 0
        while off < size:
            data = _read_exact(fileobj, min(chunk, size - off))
            h.update(data)
            resp, _ = self.client.request(
                "push", "PATCH", "", url=loc, scopes=self._push_scope(),
                headers={"Content-Type": "application/octet-stream", "Content-Range": f"{off}-{off + len(data) - 1}"},
                content=data, expect=(202,), attempts=1, exhausted=FetchError,
            )
            off += len(data)
            nl = resp.headers.get("location")
            if nl:
                loc = resp.url.join(nl)
        self._check(h, digest, size, off, fileobj)
        self._finish_upload(loc, digest, b"")

    @staticmethod
    def _check(h: "hashlib._Hash", digest: str, size: int, n: int, fileobj: BinaryIO) -> None:
        extra = fileobj.read(1)
        got = f"{h.name}:{h.hexdigest()}"
        if got != digest or n != size or extra:
            raise IntegrityError(f"blob to upload does not match {digest} ({size} bytes): got {got}")

    def _finish_upload(self, loc: httpx.URL, digest: str, data: bytes) -> None:
        url = loc.copy_add_param("digest", digest)  # keeps the critical ?_state=
        resp, _ = self.client.request(
            "push", "PUT", "", url=url, scopes=self._push_scope(),
            headers={"Content-Type": "application/octet-stream"}, content=data,
            expect=(201, 204, 404), exhausted=FetchError,
        )
        if resp.status_code == 404:
            # a retried PUT after the first one was committed: fine if the blob is there now
            if not self.for_writing().has_blob(digest):
                raise FetchError(f"upload session of {digest} vanished ({_error_text(resp)})")

    # -- referrers -----------------------------------------------------------------------------

    def referrers_api(self, digest: str, artifact_type: str | None = None) -> Index | None:
        """The Referrers API answer, or None when the registry lacks it (404 and the like)."""
        parse_digest(digest)
        params = [("artifactType", artifact_type)] if artifact_type else []
        out: list[Descriptor] = []
        url: httpx.URL | None = None
        for _ in range(MAX_PAGES):
            resp, _ = self.client.request(self._cap("pull"), "GET", f"/{self.name}/referrers/{digest}", url=url,
                                          scopes=self._pull_scope(), params=params if url is None else (),
                                          headers={"Accept": mt.OCI_INDEX}, expect=(200, 400, 404, 405),
                                          exhausted=RegistryError)
            if resp.status_code != 200:
                return None
            if not _content_type(resp).startswith("application/vnd.oci.image.index.v1+json"):
                return None
            try:
                idx = Index.from_dict(resp.json(), mt.OCI_INDEX)
            except (ValueError, FormatError):
                return None
            filtered = "artifacttype" in resp.headers.get("oci-filters-applied", "").lower()
            out += [d for d in idx.manifests if not artifact_type or filtered or d.artifact_type == artifact_type]
            nxt = resp.links.get("next", {}).get("url")
            if not nxt:
                break
            url = resp.url.join(nxt)
        if artifact_type:
            out = [d for d in out if d.artifact_type == artifact_type]
        return Index(manifests=out)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    parts = []
    left = n
    while left > 0:
        c = f.read(min(left, 1 << 20))
        if not c:
            break
        parts.append(c)
        left -= len(c)
    return b"".join(parts)


class _BlobStream(io.RawIOBase):
    """A blob body that survives resets and truncation by re-requesting from the current offset."""

    def __init__(self, repo: RegistryRepository, digest: str, size: int | None):
        super().__init__()
        self.repo = repo
        self.digest = digest
        self.size = size
        self.pos = 0
        self._resp: httpx.Response | None = None
        self._it: Iterator[bytes] | None = None
        self._buf = b""
        self._failures = 0

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Accept-Encoding": "identity"}
        if self.pos:
            headers["Range"] = f"bytes={self.pos}-"
        client = self.repo.client
        eps = client.endpoints_for(self.repo._cap("pull"))
        # A streaming GET must outlive request(); do it by hand with the same retry rules.
        last = ""
        for attempt in range(client.retry.attempts):
            for i, ep in enumerate(eps):
                try:
                    resp = self._send(ep, headers)
                except _Transient as t:
                    last = str(t)
                    continue
                except httpx.TransportError as e:
                    last = f"{e.__class__.__name__}"
                    continue
                except RegistryError as e:
                    if i == len(eps) - 1:
                        raise  # 404/401/403 from the last host: not transient
                    last = str(e)  # a mirror without the blob: the next host may have it
                    continue
                if resp.status_code == 206 and self.pos:
                    m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
                    if not m or int(m.group(1)) != self.pos:
                        resp.close()
                        last = "misaligned resume"
                        continue
                elif resp.status_code == 200:
                    if self.size is None and resp.headers.get("content-length"):
                        self.size = int(resp.headers["content-length"])
                    skip = self.pos
                    it = resp.iter_raw(1 << 16)
                    self._resp, self._it = resp, self._skipping(it, skip)
                    return
                self._resp, self._it = resp, resp.iter_raw(1 << 16)
                return
            time.sleep(client.retry.delay(attempt))
        raise FetchError(f"{client.host}/{self.repo.name}: blob {self.digest} unavailable at offset {self.pos}: {last}")

    @staticmethod
    def _skipping(it: Iterator[bytes], skip: int) -> Iterator[bytes]:
        for c in it:
            if skip >= len(c):
                skip -= len(c)
                continue
            yield c[skip:]
            skip = 0

    def _send(self, ep: RegistryHost, headers: dict[str, str]) -> httpx.Response:
        client = self.repo.client
        http = client._client(ep)
        auth = client._authorizer(ep)
        scopes = self.repo._pull_scope()
        url = httpx.URL(ep.url(self.repo._blob_path(self.digest)))
        if ep.mirror_of:
            url = url.copy_add_param("ns", ep.mirror_of)
        send_auth = True
        for _ in range(MAX_REDIRECTS + 3):
            h = dict(headers)
            a = None
            if send_auth:
                h.update(dict(ep.headers))
                a = auth.header(scopes)
                if a:
                    h["Authorization"] = a
            client.stats["requests"] += 1
            resp = http.send(http.build_request("GET", url, headers=h), stream=True)
            if resp.status_code in REDIRECT_STATUS and "location" in resp.headers:
                nxt = resp.url.join(resp.headers["location"])
                resp.close()
                if (nxt.scheme, nxt.host, nxt.port) != (url.scheme, url.host, url.port):
                    send_auth = False
                url = nxt
                continue
            if resp.status_code == 401 and send_auth:
                resp.read()
                resp.close()
                if not auth.challenge(resp, scopes, http, a):
                    raise AuthError(f"{client.host}: blob {self.digest}: authentication failed")
                continue
            if resp.status_code in RETRY_STATUS:
                resp.close()
                raise _Transient(f"HTTP {resp.status_code}")
            if resp.status_code in (200, 206):
                return resp
            resp.read()
            resp.close()
            client._raise_status(resp, "GET", self.repo._blob_path(self.digest))
        raise FetchError(f"{client.host}: too many redirects for blob {self.digest}")

    def readinto(self, b) -> int:  # type: ignore[override]
        limit = self.repo.client.retry.attempts * 2
        while not self._buf:
            if self._it is None:
                if self.size is not None and self.pos >= self.size:
                    return 0
                self._open()
            try:
                self._buf = next(self._it)  # type: ignore[arg-type]
                self.repo.client.stats["bytes"] += len(self._buf)
            except StopIteration:
                self._close_resp()
                if self.size is None or self.pos >= self.size:
                    return 0
                reason = f"body ended at {self.pos} of {self.size} bytes"
            except (httpx.TransportError, httpx.DecodingError) as e:
                self._close_resp()
                reason = f"{e.__class__.__name__} at offset {self.pos}"
            else:
                continue
            self._failures += 1
            if self._failures > limit:
                raise FetchError(f"{self.repo.client.host}/{self.repo.name}: blob {self.digest}: {reason}; giving up")
            log.info("blob %s: %s; resuming", self.digest, reason)
            time.sleep(self.repo.client.retry.delay(min(self._failures - 1, 6)))
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.pos += n
        return n

    def _close_resp(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self._resp, self._it = None, None

    def close(self) -> None:
        self._close_resp()
        super().close()
