"""Registry credentials and the Bearer/Basic challenge flow.

Credentials come from where users already keep them (``~/.docker/config.json``: ``auths``,
``credsStore``, ``credHelpers``); tokens are cached per (realm, service, scopes) and refreshed on
expiry or a new 401. Secrets never appear in logs or in ``repr``.
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

import httpx

from bdserver.errors import AuthError
from bdserver.oci.reference import DOCKER_HUB, DOCKER_HUB_API

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
    value: str
    expires: float


class Authorizer:
    """Per-registry-endpoint auth state: which scheme the registry wants and cached tokens."""

    def __init__(self, host: str, creds: CredentialStore):
        self.host = host
        self.creds = creds
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        self._scheme: str | None = None
        self._bearer: dict[str, str] = {}
        self._tokens: dict[tuple[str, ...], _Token] = {}

    def header(self, scopes: tuple[str, ...]) -> str | None:
        """The Authorization value to send proactively (None before the first challenge)."""
        with self._lock:
            if self._scheme == "basic":
                c = self.creds.get(self.host)
                return c.basic_header() if c else None
            if self._scheme == "bearer":
                t = self._tokens.get(tuple(sorted(scopes)))
                if t and t.expires - TOKEN_REFRESH_MARGIN > time.monotonic():
                    return "Bearer " + t.value
        return None

    def challenge(self, resp: httpx.Response, scopes: tuple[str, ...], client: httpx.Client,
                  sent: str | None = None) -> bool:
        """Handle a 401: learn the scheme, fetch a token. True if a retry may succeed.

        ``sent`` is the Authorization value the refused request carried: when many threads hit
        an expired token at once, the first fetches a new one and the others reuse it.
        """
        chs = parse_challenges(resp.headers.get("www-authenticate", ""))
        for scheme, params in chs:
            if scheme == "bearer" and params.get("realm"):
                want = set(scopes)
                if params.get("scope"):
                    want.update(s for s in params["scope"].split(" ") if s)
                key = tuple(sorted(scopes))
                with self._fetch_lock:
                    now = self.header(scopes)
                    if now is not None and now != sent and self._scheme == "bearer":
                        return True  # another thread refreshed it meanwhile
                    token = self._fetch_token(client, params["realm"], params.get("service"), sorted(want))
                    with self._lock:
                        self._scheme = "bearer"
                        self._bearer = params
                        self._tokens[key] = token
                return True
            if scheme == "basic":
                c = self.creds.get(self.host, refresh=self._scheme == "basic")
                if not c or not (c.username or c.password):
                    raise AuthError(f"{self.host}: the registry wants a user name and password; none configured")
                with self._lock:
                    already = self._scheme == "basic"
                    self._scheme = "basic"
                return not already  # a second 401 with the same credentials: they are wrong
        raise AuthError(f"{self.host}: unsupported or missing authentication challenge")

    def _fetch_token(self, client: httpx.Client, realm: str, service: str | None, scopes: list[str]) -> _Token:
        c = self.creds.get(self.host)
        params: list[tuple[str, str]] = []
        if service:
            params.append(("service", service))
        params += [("scope", s) for s in scopes]
        try:
            if c and c.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": c.identity_token,
                        "client_id": "bdserver", "access_type": "offline"}
                if service:
                    form["service"] = service
                if scopes:
                    form["scope"] = " ".join(scopes)
                r = client.post(realm, data=form, timeout=30)
                if r.status_code == 404:
                    r = client.get(realm, params=params, timeout=30)
            else:
                headers = {"Authorization": c.basic_header()} if c and (c.username or c.password) else {}
                r = client.get(realm, params=params, headers=headers, timeout=30)
        except httpx.HTTPError as e:
            raise AuthError(f"{self.host}: token endpoint unreachable ({e.__class__.__name__})") from None
        if r.status_code in (401, 403):
            raise AuthError(f"{self.host}: the token server refused the credentials (HTTP {r.status_code})")
        if r.status_code != 200:
            raise AuthError(f"{self.host}: token endpoint answered HTTP {r.status_code}")
        try:
            body = r.json()
        except ValueError:
            raise AuthError(f"{self.host}: token endpoint answered something that is not JSON") from None
        tok = body.get("token") or body.get("access_token")
        if not tok:
            raise AuthError(f"{self.host}: token endpoint answered without a token")
        life = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        log.debug("token for %s scopes=%s lifetime=%.0fs", self.host, scopes, life)
        return _Token(tok, time.monotonic() + max(life, TOKEN_REFRESH_MARGIN + 1))

    def forget(self, scopes: tuple[str, ...]) -> None:
        with self._lock:
            self._tokens.pop(tuple(sorted(scopes)), None)
