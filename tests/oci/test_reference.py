import pytest

from bdserver.errors import FormatError
from bdserver.oci.reference import is_loopback, parse_reference

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "s,host,repo,tag,digest",
    [
        ("127.0.0.1:5000/a/b:v1", "127.0.0.1:5000", "a/b", "v1", None),
        ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", None, None),
        (f"localhost:5000/x@{D}", "localhost:5000", "x", None, D),
        (f"reg.example.com/x/y:t@{D}", "reg.example.com", "x/y", "t", D),
        ("alpine", "docker.io", "library/alpine", None, None),
        ("alpine:3.19", "docker.io", "library/alpine", "3.19", None),
        ("user/img:1", "docker.io", "user/img", "1", None),
        ("docker://ghcr.io/o/r:latest", "ghcr.io", "o/r", "latest", None),
        ("[::1]:5000/r:t", "[::1]:5000", "r", "t", None),
        ("index.docker.io/library/busybox", "docker.io", "library/busybox", None, None),
    ],
)
def test_parse_registry(s, host, repo, tag, digest):
    r = parse_reference(s)
    assert (r.host, r.repository, r.tag, r.digest) == (host, repo, tag, digest)
    assert not r.is_layout
    assert parse_reference(str(r)) == r


def test_str_roundtrip_and_target():
    r = parse_reference("127.0.0.1:5000/a/b:v1")
    assert str(r) == "127.0.0.1:5000/a/b:v1"
    assert r.target == "v1"
    assert r.with_digest(D).target == D
    assert parse_reference("127.0.0.1:5000/a").target == "latest"
    assert parse_reference("alpine").api_host == "registry-1.docker.io"


@pytest.mark.parametrize(
    "s,path,tag,digest",
    [
        ("oci:/tmp/lay", "/tmp/lay", None, None),
        ("oci:/tmp/lay:v1", "/tmp/lay", "v1", None),
        ("oci:rel/dir:t", "rel/dir", "t", None),
        (f"oci:/tmp/lay@{D}", "/tmp/lay", None, D),
    ],
)
def test_parse_layout(s, path, tag, digest):
    r = parse_reference(s)
    assert r.is_layout and (r.layout_path, r.tag, r.digest) == (path, tag, digest)
    assert str(r) == s


@pytest.mark.parametrize(
    "s", ["", "UPPER/case", "host:5000/repo:bad tag", "reg.io/r@sha256:abc", "reg.io/r:t!", "oci:", "a//b"]
)
def test_invalid(s):
    with pytest.raises(FormatError):
        parse_reference(s)


@pytest.mark.parametrize(
    "host,lo",
    [
        ("127.0.0.1:5000", True),
        ("127.3.4.5", True),
        ("localhost", True),
        ("localhost:80", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("registry.example.com", False),
        ("docker.io", False),
    ],
)
def test_loopback(host, lo):
    assert is_loopback(host) is lo
    if "/" not in host:
        assert parse_reference(f"{host}/r").plain_http is lo
