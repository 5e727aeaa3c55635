"""Image references: ``HOST[:PORT]/REPO[:TAG|@DIGEST]`` and ``oci:PATH[:TAG|@DIGEST]``.

One parser for the CLI, the daemon and the converter, so that every component agrees on which
registry and which scheme a reference means. Loopback registries speak plain HTTP (what Docker
and containerd assume); other hosts use TLS unless hosts.toml says otherwise (see hosts.py).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from bdserver.errors import FormatError
from bdserver.digest import is_digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_HOST_RE = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)"
    r"(?::[0-9]{1,5})?$"
)


def split_host_port(host: str) -> tuple[str, int | None]:
    """``"[::1]:5000"`` -> ``("::1", 5000)``; ``"127.0.0.1"`` -> ``("127.0.0.1", None)``."""
    if host.startswith("["):
        end = host.index("]")
        name, rest = host[1:end], host[end + 1 :]
        return name, int(rest[1:]) if rest.startswith(":") else None
    if host.count(":") == 1:
        name, port = host.split(":")
        return name, int(port)
    return host, None


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port)."""
    name, _ = split_host_port(host)
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Reference:
    """A parsed reference. ``layout_path`` is set (and ``host`` empty) for ``oci:`` references."""

    host: str = ""
    repository: str = ""
    tag: str | None = None
    digest: str | None = None
    layout_path: str | None = None

    @property
    def is_layout(self) -> bool:
        return self.layout_path is not None

    @property
    def api_host(self) -> str:
        """The host that answers /v2/ (Docker Hub's API lives on another name)."""
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def plain_http(self) -> bool:
        """Default scheme choice before hosts.toml: loopback registries speak plain HTTP."""
        return is_loopback(self.host)

    @property
    def target(self) -> str | None:
        """What to resolve: the digest if pinned, else the tag (``latest`` if neither)."""
        return self.digest or self.tag or ("latest" if not self.is_layout else None)

    def with_digest(self, digest: str) -> "Reference":
        return replace(self, digest=digest)

    def with_tag(self, tag: str | None) -> "Reference":
        return replace(self, tag=tag, digest=None)

    def store_ref(self) -> "Reference":
        """Where the image lives: its repository (tag and digest dropped), or the OCI layout as given."""
        return self if self.is_layout else self.with_tag(None)

    def with_repository(self, repository: str) -> "Reference":
        return replace(self, repository=repository)

    @property
    def name(self) -> str:
        """``host/repo`` or ``oci:path`` without tag or digest."""
        return f"oci:{self.layout_path}" if self.is_layout else f"{self.host}/{self.repository}"

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def _split_digest(s: str, what: str) -> tuple[str, str | None]:
    if "@" not in s:
        return s, None
    rest, digest = s.rsplit("@", 1)
    if not is_digest(digest):
        raise FormatError(f"invalid digest in {what!r}: {digest!r}")
    return rest, digest


def _split_tag(s: str, what: str) -> tuple[str, str | None]:
    slash = s.rfind("/")
    colon = s.rfind(":")
    if colon <= slash:
        return s, None
    tag = s[colon + 1 :]
    if not _TAG_RE.match(tag):
        raise FormatError(f"invalid tag in {what!r}: {tag!r}")
    return s[:colon], tag


def parse_reference(s: str) -> Reference:
    """Parse a reference; raises FormatError with the reason (never guesses a registry for bad input).

    Accepted: ``HOST[:PORT]/REPO[:TAG][@DIGEST]``, ``docker://`` of that, Docker Hub short forms
    (``alpine`` -> ``docker.io/library/alpine``), and ``oci:PATH[:TAG][@DIGEST]``.
    """
    orig = s
    if not s or any(c.isspace() for c in s):
        raise FormatError(f"invalid reference {orig!r}")
    if s.startswith("oci:"):
        path = s[4:]
        path, digest = _split_digest(path, orig)
        tag = None
        colon = path.rfind(":")
        if colon > 0 and "/" not in path[colon + 1 :]:
            path, tag = path[:colon], path[colon + 1 :]
            if not _TAG_RE.match(tag):
                raise FormatError(f"invalid tag in {orig!r}: {tag!r}")
        if not path:
            raise FormatError(f"empty layout path in {orig!r}")
        return Reference(layout_path=path, tag=tag, digest=digest)
    if s.startswith("docker://"):
        s = s[len("docker://") :]
    s, digest = _split_digest(s, orig)
    s, tag = _split_tag(s, orig)
    first, _, rest = s.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host, repo = first, rest
        if not _HOST_RE.match(host):
            raise FormatError(f"invalid registry host in {orig!r}: {host!r}")
    else:
        host, repo = DOCKER_HUB, s
        if "/" not in repo:
            repo = "library/" + repo
    if host in ("index.docker.io", DOCKER_HUB_API):
        host = DOCKER_HUB
    if not _REPO_RE.match(repo):
        raise FormatError(f"invalid repository in {orig!r}: {repo!r} (lower case, digits, . _ - and /)")
    if len(host) + 1 + len(repo) > 255:
        raise FormatError(f"reference too long: {orig!r}")
    return Reference(host=host, repository=repo, tag=tag, digest=digest)
