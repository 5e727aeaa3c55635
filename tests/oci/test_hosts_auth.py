"""hosts.toml parsing, WWW-Authenticate parsing and docker config lookups (no network)."""

from __future__ import annotations

import base64
import json

import pytest

from bdserver.errors import FormatError
from bdserver.oci.auth import CredentialStore, parse_challenges
from bdserver.oci.hosts import load_hosts


def test_default_hosts(tmp_path):
    [h] = load_hosts("127.0.0.1:5000", [str(tmp_path)])
    assert h.base == "http://127.0.0.1:5000/v2" and h.mirror_of is None
    [h] = load_hosts("registry.example.com", [str(tmp_path)])
    assert h.base == "https://registry.example.com/v2"
    [h] = load_hosts("docker.io", [str(tmp_path)])
    assert h.base == "https://registry-1.docker.io/v2"
    [h] = load_hosts("localhost:5000", [str(tmp_path)], plain_http=False)
    assert h.scheme == "https"


def test_hosts_toml_full(tmp_path):
    d = tmp_path / "docker.io"
    d.mkdir()
    (d / "ca.pem").write_text("x")
    (d / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n'
        '[host."http://127.0.0.1:4001"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        '  [host."http://127.0.0.1:4001".header]\n'
        '    X-Dragonfly-Registry = "https://index.docker.io"\n'
        '    X-Multi = ["a", "b"]\n'
        '[host."https://mirror.example.com/v2/upstream"]\n'
        '  capabilities = ["pull"]\n'
        '  override_path = true\n'
        '  ca = "ca.pem"\n'
        '  skip_verify = true\n'
    )
    eps = load_hosts("docker.io", [str(tmp_path / "missing"), str(tmp_path)])
    assert [e.base for e in eps] == ["http://127.0.0.1:4001/v2", "https://mirror.example.com/v2/upstream",
                                      "https://registry-1.docker.io/v2"]
    assert eps[0].mirror_of == "docker.io" and eps[0].can("resolve") and not eps[0].can("push")
    assert ("X-Dragonfly-Registry", "https://index.docker.io") in eps[0].headers
    assert ("X-Multi", "b") in eps[0].headers
    assert eps[1].ca == (str(d / "ca.pem"),) and eps[1].skip_verify and not eps[1].can("resolve")
    assert eps[1].url("/r/blobs/x") == "https://mirror.example.com/v2/upstream/r/blobs/x"
    assert eps[2].mirror_of is None and eps[2].can("push")


def test_hosts_default_dir_and_no_server(tmp_path):
    d = tmp_path / "_default"
    d.mkdir()
    (d / "hosts.toml").write_text('[host."http://127.0.0.1:4001"]\n  capabilities = ["pull"]\n')
    eps = load_hosts("quay.io", [str(tmp_path)])
    assert [e.base for e in eps] == ["http://127.0.0.1:4001/v2", "https://quay.io/v2"]
    (d / "hosts.toml").write_text("not = [toml")
    with pytest.raises(FormatError):
        load_hosts("quay.io", [str(tmp_path)])


def test_docker_style_certs_dir(tmp_path):
    d = tmp_path / "reg.example.com:5000"
    d.mkdir()
    (d / "ca.crt").write_text("x")
    (d / "client.cert").write_text("x")
    (d / "client.key").write_text("x")
    [h] = load_hosts("reg.example.com:5000", [str(tmp_path)])
    assert h.ca == (str(d / "ca.crt"),) and h.client_certs == ((str(d / "client.cert"), str(d / "client.key")),)


@pytest.mark.parametrize(
    "header,want",
    [
        ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
         'scope="repository:samalba/my-app:pull,push"',
         [("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                      "scope": "repository:samalba/my-app:pull,push"})]),
        ('Basic realm="Registry Realm"', [("basic", {"realm": "Registry Realm"})]),
        ('Bearer realm="r",error="insufficient_scope", Basic realm="b"',
         [("bearer", {"realm": "r", "error": "insufficient_scope"}), ("basic", {"realm": "b"})]),
        ("Bearer realm=unquoted,service=s", [("bearer", {"realm": "unquoted", "service": "s"})]),
        ('Bearer realm="with \\"quote\\""', [("bearer", {"realm": 'with "quote"'})]),
        ("", []),
    ],
)
def test_parse_challenges(header, want):
    assert parse_challenges(header) == want


def test_docker_config_keys(tmp_path):
    enc = base64.b64encode(b"u1:p:with:colons").decode()
    cfg = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:hubpw").decode()},
            "http://127.0.0.1:5000/v1/": {"auth": enc},
            "reg.example.com": {"username": "u2", "password": "p2"},
            "tok.example.com": {"identitytoken": "refresh"},
        }
    }
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    s = CredentialStore(p)
    assert s.get("docker.io").username == "hub"
    assert s.get("registry-1.docker.io").password == "hubpw"
    c = s.get("127.0.0.1:5000")
    assert (c.username, c.password) == ("u1", "p:with:colons")
    assert s.get("reg.example.com").password == "p2"
    assert s.get("tok.example.com").identity_token == "refresh"
    assert s.get("other.example.com") is None
    assert CredentialStore(tmp_path / "missing.json").get("docker.io") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert CredentialStore(tmp_path / "bad.json").get("docker.io") is None
