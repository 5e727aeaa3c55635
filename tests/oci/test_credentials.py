"""Credentials go only where they belong: the real registry (htpasswd, token auth, TLS) and
listeners that record every Authorization header they receive."""

from __future__ import annotations

import base64
import json

import pytest

from bdserver.errors import AuthError
from tests.fixtures.proxy import FaultProxy
from tests.fixtures.registry import TokenAuth, TokenServer, start_registry

from .helpers import client, push_image, rand_bytes


def _basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


def _config(path, creds: dict[str, tuple[str, str]]) -> str:
    path.write_text(json.dumps({"auths": {h: {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()}
                                          for h, (u, p) in creds.items()}}))
    return str(path)


def _hosts(tmp_path, upstream: str, server: str, mirror: str | None = None) -> list[str]:
    d = tmp_path / "certs.d" / upstream
    d.mkdir(parents=True, exist_ok=True)
    text = f'server = "{server}"\n'
    if mirror:
        text += f'[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
    (d / "hosts.toml").write_text(text)
    return [str(tmp_path / "certs.d")]


def test_mirror_gets_its_own_credentials_never_the_upstreams(registry, tmp_path):
    """Upstream: a real htpasswd registry. Mirror: a recording proxy (with its own Basic users) in
    front of an open registry holding the same image."""
    with start_registry(tmp_path / "up", htpasswd={"alice": "s3cret"}) as up, FaultProxy(registry.url) as mirror:
        mirror.require_auth("basic", {"m": "mirror-pw"})
        up_cfg = _config(tmp_path / "up.json", {up.host: ("alice", "s3cret")})
        blob = rand_bytes(20_000, 1)
        for host, cfg in ((up.host, up_cfg), (registry.host, None)):
            repo = client(host, **({"docker_config": cfg} if cfg else {})).repository("cred/m")
            d = repo.put_blob_bytes(blob)
            desc = push_image(repo, "v1", [blob])
        dirs = _hosts(tmp_path, up.host, f"http://{up.host}", mirror.host)

        # credentials only for the upstream: the mirror is asked anonymously, then the upstream answers
        repo = client(up.host, hosts_dirs=dirs, docker_config=up_cfg).repository("cred/m")
        assert repo.get_manifest("v1")[1].digest == desc.digest
        assert repo.read_range(d, 100, 100) == blob[100:200]
        assert mirror.stats.requests() >= 2 and set(mirror.stats.statuses()) == {401}
        assert mirror.received_auth == []

        # the mirror has an entry of its own: it gets that one, and serves
        both = _config(tmp_path / "both.json", {up.host: ("alice", "s3cret"), mirror.host: ("m", "mirror-pw")})
        mirror.stats.reset()
        repo = client(up.host, hosts_dirs=dirs, docker_config=both).repository("cred/m")
        assert repo.get_manifest("v1")[1].digest == desc.digest
        assert repo.read_range(d, 0, 100) == blob[:100]
        assert 200 in mirror.stats.statuses() and 206 in mirror.stats.statuses()
        assert {v for _, v in mirror.received_auth} == {_basic("m", "mirror-pw")}


def test_no_credentials_over_plain_http_to_a_non_loopback_host(registry, fault_proxy, tmp_path, monkeypatch):
    """registry.example.test over plain HTTP (reached through an HTTP proxy on loopback): its
    credentials are configured, the registry asks for them, and they are not sent."""
    p = fault_proxy
    push_image(client(registry.host).repository("plain/x"), "v1", [b"x"])
    p.require_auth("basic", {"bob": "pw"})
    for k in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HTTP_PROXY", p.url)
    name = "registry.example.test"
    cfg = _config(tmp_path / "c.json", {name: ("bob", "pw")})
    repo = client(name, hosts_dirs=_hosts(tmp_path, name, f"http://{name}"), docker_config=cfg).repository("plain/x")
    with pytest.raises(AuthError, match="plain HTTP"):
        repo.resolve("v1")
    assert p.stats.statuses() == [401]  # the request did reach it, through the proxy
    assert p.received_auth == []


def test_credentials_go_only_to_an_allowed_token_realm(registry, fault_proxy, tmp_path):
    """The registry's Bearer challenge names a realm on another listener: it receives no credentials
    (and with no credentials it may still be asked anonymously)."""
    p = fault_proxy
    push_image(client(registry.host).repository("realm/x"), "v1", [b"x"])
    p.require_auth("bearer", {"carol": "pw"})
    with FaultProxy(registry.url) as other:
        other.require_auth("bearer", {})
        p.token_realm = f"http://{other.host}/token"
        cfg = _config(tmp_path / "c.json", {p.host: ("carol", "pw")})
        with pytest.raises(AuthError, match="refusing to send credentials to token realm"):
            client(p.host, docker_config=cfg).repository("realm/x").resolve("v1")
        assert other.token_requests == 0 and other.received_auth == []
        with pytest.raises(AuthError):  # anonymous: asked, but its token is no good at the registry
            client(p.host).repository("realm/x").resolve("v1")
        assert other.token_requests == 1 and other.received_auth == []
        # allowed by configuration: the credentials go there
        with pytest.raises(AuthError):
            client(p.host, docker_config=cfg, token_realms={p.host: [other.host]}).repository("realm/x").resolve("v1")
        assert [v for path, v in other.received_auth if path == "/token"] == [_basic("carol", "pw")]


def test_https_registry_naming_a_plain_http_realm_is_refused(tmp_path):
    """A real TLS registry with token auth whose realm is plain HTTP: no token request at all."""
    ts = TokenServer(tmp_path, {"dave": "pw"})
    try:
        with start_registry(tmp_path / "reg", tls=True, token=TokenAuth(realm=ts.realm, service=ts.service,
                                                                         issuer=ts.issuer,
                                                                         rootcertbundle=str(ts.cert))) as reg:
            d = tmp_path / "certs.d" / reg.host
            d.mkdir(parents=True)
            (d / "hosts.toml").write_text(f'server = "https://{reg.host}"\nca = "{reg.ca}"\n')
            cfg = _config(tmp_path / "c.json", {reg.host: ("dave", "pw")})
            for kw in ({}, {"docker_config": cfg, "token_realms": {reg.host: [ts.netloc]}}):
                with pytest.raises(AuthError, match="plain-HTTP token realm"):
                    client(reg.host, hosts_dirs=[str(tmp_path / "certs.d")], **kw).repository("tls/x").resolve("v1")
            assert ts.requests == 0
    finally:
        ts.stop()
