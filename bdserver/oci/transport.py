"""The registry client's one send path.

Every request, whole or streaming, goes through `Transport.send`: the endpoints of hosts.toml in
order (mirrors first, the upstream last), bounded retries with jittered backoff that honour
Retry-After, redirects followed by hand (the registry's credentials and hosts.toml headers never
leave the endpoint's origin; signed storage URLs are cached for a while), authentication as an
httpx auth flow (auth.py) whose intermediate bodies are read within caps, and for reads one total
deadline across all of it. httpx's timeouts are per receive, so a registry that trickles a byte
every few seconds would never trip them; a watchdog shuts such a connection when the deadline
passes, and the read fails with FetchError (EIO on the device) instead of hanging.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import httpx

from bdserver.errors import AuthError, FetchError, FormatError, IntegrityError, NotFoundError, RegistryError
from bdserver.oci.auth import AuthState, CredentialStore, RegistryAuth, host_port
from bdserver.oci.hosts import RegistryHost
from bdserver.oci.reference import DOCKER_HUB
from bdserver.oci.responses import Transient, discard, error_text, retry_after

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
EXPIRED_URL_STATUS = frozenset({401, 403, 404, 410})  # what storage answers to an expired signed URL
MAX_REDIRECTS = 5
REDIRECT_CACHE_SECONDS = 240.0  # signed blob URLs typically live >= 300 s
DEFAULT_TOKEN_REALMS: Mapping[str, tuple[str, ...]] = {DOCKER_HUB: ("auth.docker.io",)}


class _RedactQuery(logging.Filter):
    """httpx logs request URLs at INFO; signed blob URLs carry credentials in their query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


logging.getLogger("httpx").addFilter(_RedactQuery())


def redact(url: httpx.URL | str) -> str:
    """URL without its query (signed URLs carry credentials there)."""
    u = httpx.URL(str(url))
    return str(u.copy_with(query=None)) + ("?…" if u.query else "")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: ``attempts`` tries in all, sleeping base*2^n (jittered, capped) in between,
    or what Retry-After asks (up to ``max_retry_after``)."""

    attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 5.0
    max_retry_after: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        d = min(self.max_delay, self.base_delay * (2**attempt)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_retry_after))
        return d


@dataclass(frozen=True)
class Deadline:
    """One fetch's total time budget, across retries, redirects, token fetches and body reads."""

    seconds: float
    at: float  # time.monotonic()

    @classmethod
    def start(cls, seconds: float | None) -> "Deadline | None":
        return cls(seconds, time.monotonic() + seconds) if seconds else None

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def timeout(self, per_receive: float) -> httpx.Timeout:
        t = max(0.001, min(per_receive, self.remaining()))
        return httpx.Timeout(t, connect=min(10.0, t))


class _Watchdog:
    """Shuts the socket of a response that is still being read when its deadline passes.

    One thread for the process; an entry lives until its deadline, whatever became of the
    response (a weak reference: finished responses are simply skipped).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, weakref.ref]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, at: float, resp: httpx.Response) -> None:
        with self._cond:
            heapq.heappush(self._heap, (at, next(self._seq), weakref.ref(resp)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="bdserver-fetch-deadline", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, ref = heapq.heappop(self._heap)
            resp = ref()
            if resp is not None and not resp.is_closed:
                _shutdown(resp)


def _shutdown(resp: httpx.Response) -> None:
    stream = resp.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # wakes the reader; the plain method also for TLS
        except OSError:
            pass


_WATCHDOG = _Watchdog()


@dataclass
class Answer:
    """What `Transport.send` returns: the response (open only for ``stream=True``), what
    ``consume`` made of it, and the endpoint that answered (for follow-up URLs it handed out)."""

    response: httpx.Response
    value: Any
    endpoint: RegistryHost


@dataclass
class _Call:
    method: str
    path: str
    scopes: tuple[str, ...]
    headers: dict[str, str]
    params: list[tuple[str, str]]
    content: bytes | None
    expect: frozenset[int]
    consume: Callable[[httpx.Response], Any] | None
    stream: bool
    url: httpx.URL | None
    redirect_key: str | None
    exhausted: type[RegistryError]
    deadline: Deadline | None
    what: str = field(init=False)

    def __post_init__(self) -> None:
        self.what = f"{self.method} {self.path or redact(self.url or '')}"


def _origin(url: httpx.URL | str) -> tuple[str, str]:
    u = httpx.URL(str(url))
    return u.scheme, host_port(u)


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


_NO_AUTH = httpx.Auth()


class Transport:
    """Connections, authentication state, redirects and retries for one registry and its mirrors.

    ``token_realms`` maps registry names to the extra ``host[:port]`` token realms that may receive
    that registry's credentials (Docker Hub's auth.docker.io is built in).
    """

    def __init__(self, host: str, endpoints: list[RegistryHost], credentials: CredentialStore, *,
                 retry: RetryPolicy, timeout: float, max_connections: int, user_agent: str,
                 token_realms: Mapping[str, Iterable[str]] | None = None):
        self.host = host
        self.endpoints = endpoints
        self.creds = credentials
        self.retry = retry
        self.timeout = timeout
        realms = {**DEFAULT_TOKEN_REALMS, **(token_realms or {})}
        self.token_hosts = tuple(realms.get(host, ()))
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._ua = user_agent
        self._clients: dict[RegistryHost, httpx.Client] = {}
        self._auth: dict[RegistryHost, AuthState] = {}
        self._lock = threading.Lock()
        self._redirects: dict[str, tuple[httpx.URL, float]] = {}
        self.stats = {"requests": 0, "retries": 0, "bytes": 0}  # approximate under threads

    def close(self) -> None:
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()

    def endpoints_for(self, capability: str) -> list[RegistryHost]:
        eps = [e for e in self.endpoints if e.can(capability)]
        if not eps:
            raise RegistryError(f"{self.host}: no host in hosts.toml has the {capability!r} capability")
        return eps

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
                    # https redirect target or token realm still gets a fully verifying one
                    kw["transport"] = _LazyTLSTransport(limits=self._limits)
                    kw["mounts"] = {"http://": httpx.HTTPTransport(verify=False, limits=self._limits)}
                c = httpx.Client(
                    verify=verify,
                    timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
                    limits=self._limits,
                    follow_redirects=False,
                    headers={"User-Agent": self._ua, "Accept-Encoding": "identity"},
                    **kw,
                )
                self._clients[ep] = c
            return c

    def _auth_state(self, ep: RegistryHost) -> AuthState:
        """A mirror authenticates with its own credentials (looked up under its host), never the upstream's."""
        with self._lock:
            a = self._auth.get(ep)
            if a is None:
                mirror = ep.mirror_of is not None
                a = self._auth[ep] = AuthState(ep.base, self.creds, ep.netloc if mirror else self.host,
                                               () if mirror else self.token_hosts)
            return a

    # -- the send path ---------------------------------------------------------------------------

    def send(self, capability: str, method: str, path: str, *, scopes: tuple[str, ...] = (),
             headers: dict[str, str] | None = None, params: Iterable[tuple[str, str]] = (),
             content: bytes | None = None, expect: Iterable[int] = (200,),
             consume: Callable[[httpx.Response], Any] | None = None, stream: bool = False,
             attempts: int | None = None, url: httpx.URL | None = None, endpoint: RegistryHost | None = None,
             redirect_key: str | None = None, exhausted: type[RegistryError] = FetchError,
             deadline: Deadline | None = None) -> Answer:
        """Send one logical request; the `Answer` holds the response and ``consume(response)``.

        Tries each endpoint with ``capability`` (or just ``endpoint``, for URLs it handed out) in
        order: a mirror's failure or 404 falls through to the next. ``consume`` runs with the body
        still streaming and may raise `Transient` to retry; ``stream=True`` leaves the response
        open for the caller. Statuses outside ``expect`` raise NotFoundError/AuthError/
        RegistryError; retries running out raise ``exhausted``; a passed ``deadline`` FetchError.
        """
        call = _Call(method, path, tuple(scopes), dict(headers or {}), list(params), content, frozenset(expect),
                     consume, stream, url, redirect_key, exhausted, deadline)
        eps = [endpoint] if endpoint is not None else self.endpoints_for(capability)
        last: Exception | None = None
        for i, ep in enumerate(eps):
            final = i == len(eps) - 1
            n = attempts or (self.retry.attempts if final else min(2, self.retry.attempts))
            try:
                ans = self._attempts(ep, call, n)
            except FetchError as e:
                if final or (deadline and deadline.expired()):
                    raise
                last = e
            except (RegistryError, IntegrityError, FormatError) as e:
                if final:
                    raise
                last = e
            else:
                if ans.response.status_code != 404 or final:
                    return ans
                ans.response.close()
                last = NotFoundError(f"{ep}: {call.what}: not found")
            log.info("registry %s: %s; trying the next host", ep, last)
        raise last or RegistryError(f"{self.host}: no endpoint answered")

    def _late(self, call: _Call, reason: str) -> FetchError:
        assert call.deadline is not None
        return FetchError(f"{self.host}: {call.what}: no complete answer within the {call.deadline.seconds:g} s fetch "
                          f"deadline ({reason or 'waiting'}); the next read tries again")

    def _attempts(self, ep: RegistryHost, call: _Call, attempts: int) -> Answer:
        attempt = 0
        reason = ""
        while True:
            if call.deadline and call.deadline.expired():
                raise self._late(call, reason)
            error: Exception | None = None
            wait: float | None = None
            try:
                return self._once(ep, call)
            except Transient as t:
                reason, error, wait = str(t), t.error, t.retry_after
            except (httpx.TransportError, httpx.DecodingError) as e:
                if "CERTIFICATE_VERIFY_FAILED" in str(e) or "WRONG_VERSION_NUMBER" in str(e):
                    # not transient: retrying cannot fix a trust or scheme mismatch
                    raise RegistryError(
                        f"{self.host}: TLS with {ep.netloc} failed ({e}); trust its CA with `ca = ...` (or "
                        f"`skip_verify = true`) in hosts.toml, or use http:// for a plain-HTTP registry") from None
                reason = f"{e.__class__.__name__}: {e}"
            if call.redirect_key:
                self._redirects.pop(call.redirect_key, None)
            attempt += 1
            if call.deadline and call.deadline.expired():
                raise self._late(call, reason)
            if attempt >= attempts:
                if error is not None:
                    raise error
                raise call.exhausted(f"{self.host}: {call.what} failed after {attempts} attempts: {reason}")
            d = self.retry.delay(attempt - 1, wait)
            if call.deadline and d >= call.deadline.remaining():
                raise self._late(call, f"{reason}; the next try in {d:.1f} s would come too late")
            self.stats["retries"] += 1
            log.info("registry %s: %s: %s; retry %d/%d in %.2fs", ep.netloc, call.what, reason, attempt,
                     attempts - 1, d)
            time.sleep(d)

    def _once(self, ep: RegistryHost, call: _Call) -> Answer:
        http = self._client(ep)
        if call.redirect_key:
            cached = self._redirects.get(call.redirect_key)
            if cached and cached[1] > time.monotonic():
                req = http.build_request(call.method, cached[0], headers=call.headers)
                resp = self._send(http, req, call.deadline)
                if resp.status_code not in EXPIRED_URL_STATUS:
                    return self._finish(ep, call, resp)
                discard(resp)  # the signed URL expired: ask the registry again (not a retry)
                self._redirects.pop(call.redirect_key, None)
        url = call.url or httpx.URL(ep.url(call.path))
        if call.url is None:
            params = call.params + ([("ns", ep.mirror_of)] if ep.mirror_of else [])
            if params:
                url = url.copy_merge_params(params)
        own = _origin(url) == _origin(ep.base)
        headers = httpx.Headers(list(call.headers.items()) + (list(ep.headers) if own else []))
        request = http.build_request(call.method, url, headers=headers, content=call.content)
        auth = RegistryAuth(self._auth_state(ep), call.scopes) if own else _NO_AUTH
        flow = auth.sync_auth_flow(request)
        resp: httpx.Response | None = None
        try:
            req = next(flow)
            while True:
                if req is request:
                    resp = self._follow(http, req, ep, call)
                else:  # a token request of the auth flow
                    for k, v in http.headers.items():
                        req.headers.setdefault(k, v)
                    resp = self._send(http, req, call.deadline)
                try:
                    req = flow.send(resp)
                except StopIteration:
                    break
                discard(resp)
                resp = None
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        finally:
            flow.close()
        assert resp is not None
        return self._finish(ep, call, resp)

    def _send(self, http: httpx.Client, req: httpx.Request, deadline: Deadline | None) -> httpx.Response:
        timeout = deadline.timeout(self.timeout) if deadline else httpx.Timeout(self.timeout,
                                                                                  connect=min(10.0, self.timeout))
        req.extensions["timeout"] = timeout.as_dict()
        self.stats["requests"] += 1
        resp = http.send(req, stream=True)
        if deadline:
            _WATCHDOG.watch(deadline.at, resp)
        return resp

    def _follow(self, http: httpx.Client, req: httpx.Request, ep: RegistryHost, call: _Call) -> httpx.Response:
        """Send ``req`` and follow redirects of GET/HEAD; off the endpoint's origin nothing but the
        call's own headers goes along (no Authorization, no hosts.toml headers)."""
        left_origin = False
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._send(http, req, call.deadline)
            loc = resp.headers.get("location")
            if resp.status_code not in REDIRECT_STATUS or not loc or req.method not in ("GET", "HEAD"):
                break
            nxt = resp.url.join(loc)
            discard(resp)
            if _origin(nxt) == _origin(ep.base) and not left_origin:
                headers = httpx.Headers(req.headers)
                headers.pop("host", None)
            else:
                left_origin = True
                headers = httpx.Headers(call.headers)
            req = http.build_request(req.method, nxt, headers=headers)
        else:
            discard(resp)
            raise RegistryError(f"{self.host}: {call.what}: more than {MAX_REDIRECTS} redirects")
        if left_origin:
            if resp.status_code in (401, 403):
                discard(resp)
                raise Transient(f"storage refused the redirect target (HTTP {resp.status_code})")
            if call.redirect_key and resp.status_code in (200, 206):
                self._redirects[call.redirect_key] = (resp.request.url, time.monotonic() + REDIRECT_CACHE_SECONDS)
        return resp

    def _finish(self, ep: RegistryHost, call: _Call, resp: httpx.Response) -> Answer:
        status = resp.status_code
        if status in RETRY_STATUS:
            wait = retry_after(resp)
            discard(resp)
            raise Transient(f"HTTP {status}", retry_after=wait)
        if status == 401:
            raise AuthError(f"{self.host}: {call.what}: authentication failed ({error_text(resp)})")
        if status not in call.expect:
            self.raise_status(resp, call.what)
        if call.consume is None and not call.stream:
            discard(resp)
            return Answer(resp, None, ep)
        try:
            val = call.consume(resp) if call.consume is not None else None
        except BaseException:
            resp.close()
            raise
        if not call.stream:
            resp.close()
        return Answer(resp, val, ep)

    def raise_status(self, resp: httpx.Response, what: str) -> None:
        msg = f"{self.host}: {what}: HTTP {resp.status_code}"
        detail = error_text(resp)
        if detail:
            msg += f" ({detail})"
        if resp.status_code == 404:
            raise NotFoundError(msg)
        if resp.status_code in (401, 403):
            raise AuthError(msg)
        raise RegistryError(msg)
