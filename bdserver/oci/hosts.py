"""containerd-style ``hosts.toml`` registry host configuration (mirrors, TLS, headers).

Nodes already describe their mirrors (Dragonfly, a local pull-through cache, an air-gapped
copy) for containerd in ``/etc/containerd/certs.d/<host>/hosts.toml``; reading the same files
means bdserver fetches through the same mirrors without a second configuration. Semantics follow
containerd 1.6 ``docs/hosts.md``: hosts are tried in file order, then ``server``; mirrors get
``?ns=<upstream>``; ``override_path`` means the URL already holds the API root.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bdserver.errors import FormatError
from bdserver.oci.reference import DOCKER_HUB, DOCKER_HUB_API, is_loopback

log = logging.getLogger(__name__)

DEFAULT_HOSTS_DIRS = ("/etc/containerd/certs.d",)
ALL_CAPS = frozenset({"pull", "resolve", "push"})


@dataclass(frozen=True)
class RegistryHost:
    """One endpoint that can answer /v2/ requests for an upstream registry."""

    scheme: str
    netloc: str
    api_root: str = "/v2"  # path prefix of the API
    capabilities: frozenset[str] = ALL_CAPS
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client_certs: tuple[tuple[str, str | None], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    mirror_of: str | None = None  # upstream host when this is a mirror (adds ?ns=)

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.api_root}"

    def url(self, path: str) -> str:
        """``path`` starts with ``/`` and is relative to the API root (``/<repo>/blobs/<d>``)."""
        return self.base + path

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def __str__(self) -> str:
        return self.base + (f" (mirror of {self.mirror_of})" if self.mirror_of else "")


def hosts_dirs_from_env() -> list[str]:
    env = os.environ.get("BDSERVER_HOSTS_DIR")
    extra = [d for d in env.split(":") if d] if env else []
    return extra + list(DEFAULT_HOSTS_DIRS)


def _paths(v, base: Path) -> tuple[str, ...]:
    if v is None:
        return ()
    items = v if isinstance(v, list) else [v]
    return tuple(str((base / p) if not os.path.isabs(p) else Path(p)) for p in items)


def _client(v, base: Path) -> tuple[tuple[str, str | None], ...]:
    if v is None:
        return ()
    items = v if isinstance(v, list) else [v]
    out = []
    for it in items:
        if isinstance(it, list):
            cert, key = it[0], it[1] if len(it) > 1 else None
        else:
            cert, key = it, None
        out.append((_paths(cert, base)[0], _paths(key, base)[0] if key else None))
    return tuple(out)


def _headers(v) -> tuple[tuple[str, str], ...]:
    if not v:
        return ()
    out = []
    for k, val in v.items():
        for x in val if isinstance(val, list) else [val]:
            out.append((str(k), str(x)))
    return tuple(out)


def _endpoint(url: str, spec: dict, base: Path, upstream: str, is_server: bool) -> RegistryHost:
    u = urlsplit(url if "://" in url else f"https://{url}")
    if u.scheme not in ("http", "https") or not u.netloc:
        raise FormatError(f"hosts.toml: bad host URL {url!r}")
    path = u.path.rstrip("/")
    if spec.get("override_path"):
        api_root = path
    else:
        api_root = (path + "/v2") if not path.endswith("/v2") else path
    caps = spec.get("capabilities")
    return RegistryHost(
        scheme=u.scheme,
        netloc=u.netloc,
        api_root=api_root,
        capabilities=frozenset(caps) if caps is not None else ALL_CAPS,
        skip_verify=bool(spec.get("skip_verify", False)),
        ca=_paths(spec.get("ca"), base),
        client_certs=_client(spec.get("client"), base),
        headers=_headers(spec.get("header")),
        mirror_of=None if is_server else upstream,
    )


def default_server(host: str, plain_http: bool | None = None) -> RegistryHost:
    api = DOCKER_HUB_API if host == DOCKER_HUB else host
    plain = is_loopback(host) if plain_http is None else plain_http
    return RegistryHost(scheme="http" if plain else "https", netloc=api)


def load_hosts(host: str, dirs: list[str] | tuple[str, ...] | None = None,
               plain_http: bool | None = None) -> list[RegistryHost]:
    """Endpoints to try for ``host``, in order (mirrors first, the server last).

    Looks for ``<dir>/<host>/hosts.toml`` then ``<dir>/_default/hosts.toml`` in each dir; the first
    file found wins. Without one, the Docker-style ``*.crt``/``*.cert``+``*.key`` files in
    ``<dir>/<host>/`` configure TLS of the default server.
    """
    dirs = list(dirs) if dirs is not None else hosts_dirs_from_env()
    server = default_server(host, plain_http)
    for d in dirs:
        for name in (host, "_default"):
            f = Path(d) / name / "hosts.toml"
            if not f.is_file():
                continue
            try:
                data = tomllib.loads(f.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise FormatError(f"{f}: {e}") from None
            eps = []
            for url, spec in (data.get("host") or {}).items():
                eps.append(_endpoint(url, spec or {}, f.parent, host, is_server=False))
            if "server" in data:
                eps.append(_endpoint(data["server"], data, f.parent, host, is_server=True))
            else:
                # containerd: without `server`, the default upstream comes after the hosts
                eps.append(
                    RegistryHost(
                        scheme=server.scheme,
                        netloc=server.netloc,
                        skip_verify=bool(data.get("skip_verify", False)),
                        ca=_paths(data.get("ca"), f.parent),
                        client_certs=_client(data.get("client"), f.parent),
                        headers=_headers(data.get("header")),
                    )
                )
            log.debug("hosts.toml %s: %s", f, ", ".join(map(str, eps)))
            return eps
        certs = Path(d) / host
        if certs.is_dir():
            cas = tuple(sorted(str(p) for p in certs.glob("*.crt")))
            pairs = tuple(
                (str(c), str(c.with_suffix(".key"))) for c in sorted(certs.glob("*.cert")) if c.with_suffix(".key").exists()
            )
            if cas or pairs:
                return [RegistryHost(scheme=server.scheme, netloc=server.netloc, ca=cas, client_certs=pairs)]
    return [server]
