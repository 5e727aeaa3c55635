"""Registry credentials and the Bearer/Basic challenge flow, as an httpx auth flow.

Credentials come from where users already keep them (``~/.docker/config.json``: ``auths``,
``credsStore``, ``credHelpers``); tokens are cached per scope set and refreshed on expiry or a new
401, once for all threads. Credentials go only where they belong: to the endpoint they were
looked up for (a mirror uses its own entry, never the upstream's), never over plain HTTP to a
host that is not loopback, and to a token realm only on the same scheme (or an upgrade to https)
and a host:port that is the endpoint's own or allowed by configuration. Secrets never appear in
logs or in ``repr``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator, Iterable

import httpx

from bdserver.errors import AuthError
from bdserver.oci.reference import DOCKER_HUB, DOCKER_HUB_API, is_loopback
from bdserver.oci.responses import MAX_TOKEN_BODY, Transient, discard, read_body, retry_after

log = logging.getLogger(__name__)

DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
DEFAULT_TOKEN_LIFETIME = 60.0
TOKEN_REFRESH_MARGIN = 10.0
HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)  # OAuth2 refresh token (docker login --identity-token)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __bool__(self) -> bool:
        return bool(self.username or self.password or self.identity_token)


def _norm_key(key: str) -> str:
    """``https://host:port/v1/`` -> ``host:port`` (config.json keys come in several spellings)."""
    k = re.sub(r"^[a-z]+://", "", key.strip())
    k = k.split("/", 1)[0]
    if k in ("index.docker.io", DOCKER_HUB_API, "registry.hub.docker.com"):
        return DOCKER_HUB
    return k


def docker_config_path() -> Path:
    d = os.environ.get("DOCKER_CONFIG")
    return Path(d) / "config.json" if d else Path.home() / ".docker" / "config.json"


class CredentialStore:
    """Looks credentials up by registry host in a Docker config file (and its helpers)."""

    def __init__(self, config_path: str | os.PathLike | None = None, *, static: dict[str, Credentials] | None = None):
        self.config_path = Path(config_path) if config_path else docker_config_path()
        self._static = {_norm_key(k): v for k, v in (static or {}).items()}
        self._cache: dict[str, Credentials | None] = {}
        self._lock = threading.Lock()

    def _load(self) -> dict:
        try:
            return json.loads(self.config_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable docker config %s: %s", self.config_path, e.__class__.__name__)
            return {}

    def get(self, host: str, refresh: bool = False) -> Credentials | None:
        key = _norm_key(host)
        if key in self._static:
            return self._static[key]
        with self._lock:
            if not refresh and key in self._cache:
                return self._cache[key]
        creds = self._lookup(key)
        with self._lock:
            self._cache[key] = creds
        return creds

    def _lookup(self, key: str) -> Credentials | None:
        cfg = self._load()
        helpers = cfg.get("credHelpers") or {}
        server = DOCKER_HUB_AUTH_KEY if key == DOCKER_HUB else key
        for hk, helper in helpers.items():
            if _norm_key(hk) == key:
                return self._helper(helper, server)
        for ak, entry in (cfg.get("auths") or {}).items():
            if _norm_key(ak) != key or not isinstance(entry, dict):
                continue
            user, pw = entry.get("username", ""), entry.get("password", "")
            if entry.get("auth"):
                try:
                    user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    log.warning("docker config: malformed auth entry for %s ignored", key)
                    continue
            c = Credentials(user, pw, entry.get("identitytoken", ""))
            if c:
                return c
        if cfg.get("credsStore"):
            return self._helper(cfg["credsStore"], server)
        return None

    @staticmethod
    def _helper(suffix: str, server: str) -> Credentials | None:
        exe = f"docker-credential-{suffix}"
        try:
            p = subprocess.run([exe, "get"], input=server.encode(), capture_output=True, timeout=HELPER_TIMEOUT)
        except FileNotFoundError:
            log.warning("credential helper %s not found", exe)
            return None
        except subprocess.TimeoutExpired:
            log.warning("credential helper %s timed out", exe)
            return None
        if p.returncode != 0:
            # "credentials not found in native keychain" is the normal miss
            log.debug("credential helper %s: no credentials for %s", exe, server)
            return None
        try:
            d = json.loads(p.stdout)
        except ValueError:
            log.warning("credential helper %s printed something that is not JSON", exe)
            return None
        user, secret = d.get("Username", ""), d.get("Secret", "")
        if user == "<token>":
            return Credentials(identity_token=secret)
        return Credentials(user, secret)


_CHALLENGE_RE = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


def parse_challenges(header: str) -> list[tuple[str, dict[str, str]]]:
    """``WWW-Authenticate`` -> ``[(scheme_lower, {param: value})]`` (quoted values may hold commas)."""
    out: list[tuple[str, dict[str, str]]] = []
    pos = 0
    header = header or ""
    scheme_re = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9_-]*)(?:\s+|$)")
    while pos < len(header):
        m = scheme_re.match(header, pos)
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while pos < len(header):
            pm = _CHALLENGE_RE.match(header, pos)
            if not pm:
                break
            val = pm.group(2) if pm.group(2) is not None else pm.group(3)
            params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", val)
            pos = pm.end()
            sep = re.match(r"\s*,\s*", header[pos:])
            if not sep:
                break
            pos += sep.end()
            # the next item is a new scheme if it is not k=v
            if not _CHALLENGE_RE.match(header, pos):
                break
        out.append((scheme, params))
    return out


def scope_for(repo: str, actions: str) -> str:
    return f"repository:{repo}:{actions}"


@dataclass
class _Token:
    value: str = field(repr=False)
    expires: float


def host_port(url: httpx.URL) -> str:
    """``host:port`` with the scheme's default port filled in (how realms and endpoints compare)."""
    port = url.port or (443 if url.scheme == "https" else 80)
    host = url.host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AuthState:
    """What one endpoint taught us (the scheme it wants, tokens per scope set) and what it may get.

    ``origin`` is the endpoint's base URL; ``creds_for`` the name its credentials are looked up
    under (the upstream for the server, the mirror's own host for a mirror); ``token_hosts`` the
    ``host[:port]`` names, besides the endpoint's own, that may receive credentials as token realms.
    Shared by all threads using the endpoint; tokens are fetched once for all of them.
    """

    def __init__(self, origin: str, creds: CredentialStore, creds_for: str, token_hosts: Iterable[str] = ()):
        self.origin = httpx.URL(origin)
        self.name = creds_for
        self._store = creds
        self._creds_for = creds_for
        self.withheld = ""
        if self.origin.scheme == "http" and not is_loopback(self.origin.host):
            self.withheld = f"{self.origin.host} speaks plain HTTP and is not loopback"
        self._token_hosts = {host_port(self.origin)} | {
            host_port(httpx.URL(f"{self.origin.scheme}://{h}")) for h in token_hosts}
        self._lock = threading.Lock()
        self.fetch_lock = threading.Lock()  # one token fetch at a time per endpoint (single flight)
        self._scheme: str | None = None
        self._tokens: dict[tuple[str, ...], _Token] = {}

    def credentials(self, refresh: bool = False) -> Credentials | None:
        if self.withheld:
            return None
        return self._store.get(self._creds_for, refresh=refresh)

    def header(self, scopes: tuple[str, ...]) -> str | None:
        """The Authorization value to send proactively (None before the first challenge)."""
        with self._lock:
            scheme = self._scheme
            t = self._tokens.get(tuple(sorted(scopes)))
        if scheme == "basic":
            c = self.credentials()
            return c.basic_header() if c else None
        if scheme == "bearer" and t and t.expires - TOKEN_REFRESH_MARGIN > time.monotonic():
            return "Bearer " + t.value
        return None

    def _no_credentials(self, what: str) -> AuthError:
        if self.withheld and self._store.get(self._creds_for) is not None:
            return AuthError(f"{self.name}: {what}, but {self.withheld}: bdserver sends credentials over plain "
                             f"HTTP only to loopback registries (use https:// for it in hosts.toml)")
        return AuthError(f"{self.name}: {what}; none configured for {self._creds_for}")

    def check_realm(self, realm: str, creds: Credentials | None) -> httpx.URL:
        """The realm URL if it may be asked for a token (with ``creds`` if given), else AuthError."""
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            raise AuthError(f"{self.name}: the registry names an invalid token realm") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise AuthError(f"{self.name}: the registry names a token realm that is not an http(s) URL")
        if url.scheme == "http" and self.origin.scheme == "https":
            raise AuthError(f"{self.name}: the registry (https) names a plain-HTTP token realm {url.host}; refused")
        if creds:
            if host_port(url) not in self._token_hosts:
                raise AuthError(f"{self.name}: refusing to send credentials to token realm {host_port(url)} "
                                f"(not the registry's own host); allow it in the token_realms configuration")
            if url.scheme == "http" and not is_loopback(url.host):
                raise AuthError(f"{self.name}: refusing to send credentials over plain HTTP to token realm {url.host}")
        return url

    def token_requests(self, params: dict[str, str], scopes: list[str]) -> list[httpx.Request]:
        """The token request(s) for a Bearer challenge: the OAuth2 refresh-token POST (then, if the
        server lacks it, the GET), or the GET with Basic credentials or anonymous."""
        c = self.credentials()
        realm = self.check_realm(params["realm"], c)
        service = params.get("service")
        query: list[tuple[str, str]] = ([("service", service)] if service else []) + [("scope", s) for s in scopes]
        get_headers = {"Authorization": c.basic_header()} if c and (c.username or c.password) else {}
        get = httpx.Request("GET", realm.copy_merge_params(query), headers=get_headers)
        if c and c.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": c.identity_token, "client_id": "bdserver",
                    "access_type": "offline"}
            if service:
                form["service"] = service
            if scopes:
                form["scope"] = " ".join(scopes)
            return [httpx.Request("POST", realm, data=form), get]
        return [get]

    def take_token(self, resp: httpx.Response, scopes: tuple[str, ...]) -> str:
        """Read a token response (bounded) and cache the token for ``scopes``."""
        if resp.status_code in (401, 403):
            discard(resp)
            if self.withheld:
                raise self._no_credentials("the token server wants credentials")
            raise AuthError(f"{self.name}: the token server refused the credentials (HTTP {resp.status_code})")
        if resp.status_code == 429 or resp.status_code >= 500:
            discard(resp)
            raise Transient(f"token server answered HTTP {resp.status_code}", retry_after=retry_after(resp))
        if resp.status_code != 200:
            discard(resp)
            raise AuthError(f"{self.name}: token endpoint answered HTTP {resp.status_code}")
        try:
            body = json.loads(read_body(resp, MAX_TOKEN_BODY, f"{self.name}: token response"))
            tok = body.get("token") or body.get("access_token")
            life = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            raise AuthError(f"{self.name}: token endpoint answered something that is not a token document") from None
        if not tok or not isinstance(tok, str):
            raise AuthError(f"{self.name}: token endpoint answered without a token")
        log.debug("token for %s scopes=%s lifetime=%.0fs", self.name, scopes, life)
        with self._lock:
            self._scheme = "bearer"
            self._tokens[tuple(sorted(scopes))] = _Token(tok, time.monotonic() + max(life, TOKEN_REFRESH_MARGIN + 1))
        return "Bearer " + tok

    def use_basic(self, sent: str | None) -> str | None:
        """The Basic header to retry with, or None when the one just refused was already it."""
        with self._lock:
            already = self._scheme == "basic"
            self._scheme = "basic"
        c = self.credentials(refresh=already)
        if not c or not (c.username or c.password):
            raise self._no_credentials("the registry wants a user name and password")
        h = c.basic_header()
        return None if already and h == sent else h


class RegistryAuth(httpx.Auth):
    """One request's authentication: an httpx auth flow over the endpoint's shared AuthState.

    Yields the request (with a cached token or Basic header once the endpoint is known to want
    one); on a 401 it reads the challenge, yields the token request(s) unless another thread has
    just refreshed the token, then yields the request once more. A second 401 ends the flow and
    the caller raises AuthError. Driven by the registry client's one send path, which reads every
    body it hands over within a cap (httpx's own driver would read intermediate bodies whole).
    """

    def __init__(self, state: AuthState, scopes: tuple[str, ...]):
        self.state = state
        self.scopes = scopes

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        st = self.state
        sent = st.header(self.scopes)
        if sent:
            request.headers["Authorization"] = sent
        response = yield request
        if response.status_code != 401:
            return
        challenges = parse_challenges(response.headers.get("www-authenticate", ""))
        bearer = next((p for s, p in challenges if s == "bearer" and p.get("realm")), None)
        if bearer is not None:
            want = sorted(set(self.scopes) | {x for x in bearer.get("scope", "").split(" ") if x})
            with st.fetch_lock:
                now = st.header(self.scopes)
                if now is None or now == sent:  # nobody refreshed it meanwhile: fetch it ourselves
                    reqs = st.token_requests(bearer, want)
                    for i, treq in enumerate(reqs):
                        tresp = yield treq
                        if tresp.status_code == 404 and i + 1 < len(reqs):
                            continue  # no OAuth2 POST on this server: the GET comes next
                        now = st.take_token(tresp, self.scopes)
                        break
        elif any(s == "basic" for s, _ in challenges):
            now = st.use_basic(sent)
            if now is None:
                return  # the same credentials were refused twice: they are wrong
        else:
            raise AuthError(f"{st.name}: unsupported or missing authentication challenge")
        request.headers["Authorization"] = now
        yield request

    def async_auth_flow(self, request):  # type: ignore[override]
        raise NotImplementedError("bdserver's registry client is synchronous")
