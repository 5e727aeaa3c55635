"""The registry client against Debian's real docker-registry (distribution 2.8) on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import stat
import threading
import time

import pytest

from bdserver.errors import AuthError, FetchError, IntegrityError, NotFoundError, RegistryError
from bdserver.oci import mediatypes as mt
from bdserver.digest import sha256_digest
from bdserver.oci.model import parse_manifest
from bdserver.oci.store import ImageStore, open_store
from tests.fixtures.proxy import FaultProxy

from .helpers import FAST_RETRY, client, push_image, rand_bytes, unique


def test_push_pull_roundtrip(registry_session):
    c = client(registry_session.host)
    repo = c.repository(unique("rt/"))
    assert isinstance(repo, ImageStore)
    blob = rand_bytes(300_000, 1)
    d = sha256_digest(blob)
    assert repo.put_blob(io.BytesIO(blob), d, len(blob)) is True
    assert repo.put_blob(io.BytesIO(blob), d, len(blob)) is False  # HEAD says it exists
    assert repo.has_blob(d) and not repo.has_blob(sha256_digest(b"nope"))
    desc = push_image(repo, "v1", [blob])
    assert repo.resolve("v1") == desc
    data, gdesc = repo.get_manifest("v1")
    assert sha256_digest(data) == desc.digest and gdesc.media_type == mt.OCI_MANIFEST
    assert repo.get_manifest(desc.digest)[0] == data
    assert repo.read_blob(d) == blob
    with repo.open_blob(d, len(blob)) as f:
        assert f.read(10) == blob[:10] and f.read() == blob[10:]
    assert repo.list_tags() == ["v1"]
    with pytest.raises(NotFoundError):
        repo.resolve("missing")
    with pytest.raises(NotFoundError):
        repo.read_blob(sha256_digest(b"nope"))
    # the same store through a reference string
    s = open_store(f"{registry_session.host}/{repo.name}:v1", retry=FAST_RETRY, hosts_dirs=[])
    assert s.resolve("v1").digest == desc.digest


def test_put_blob_refuses_wrong_content(registry_session):
    repo = client(registry_session.host).repository(unique("bad/"))
    with pytest.raises(IntegrityError):
        repo.put_blob(io.BytesIO(b"abc"), sha256_digest(b"abd"), 3)
    assert not repo.has_blob(sha256_digest(b"abd"))


def test_read_range_206_and_clamping(registry_session, ):
    c = client(registry_session.host)
    repo = c.repository(unique("rr/"))
    blob = rand_bytes(1 << 20, 2)
    d = repo.put_blob_bytes(blob)
    assert repo.read_range(d, 0, 1) == blob[:1]
    assert repo.read_range(d, 12345, 65536) == blob[12345 : 12345 + 65536]
    assert repo.read_range(d, len(blob) - 100, 4096) == blob[-100:]  # clamped, no 416
    assert repo.read_range(d, len(blob), 10) == b""
    assert repo.read_range(d, len(blob) + 5, 10) == b""
    assert repo.read_range(d, 5, 0) == b""
    with pytest.raises(ValueError):
        repo.read_range(d, -1, 10)


def test_read_range_reuses_its_connection(registry, fault_proxy):
    """A range read consumes its whole 206 body, so the next one goes over the same connection."""
    p = fault_proxy
    repo = client(p.host).repository("keep/alive")
    blob = rand_bytes(1 << 20, 4)
    d = repo.put_blob_bytes(blob)
    repo.blob_size(d)
    before = p.connections
    for i in range(20):
        off = i * 40_000
        assert repo.read_range(d, off, 30_000) == blob[off: off + 30_000]
    assert p.connections - before <= 1


def test_read_range_many_threads_one_client(registry_session):
    c = client(registry_session.host, max_connections=16)
    repo = c.repository(unique("mt/"))
    blob = rand_bytes(2 << 20, 3)
    d = repo.put_blob_bytes(blob)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(20):
                off = ((k * 7919 + i * 104729) * 4096) % len(blob)
                assert repo.read_range(d, off, 65536) == blob[off : off + 65536]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not errors, errors[:3]


def test_chunked_upload_and_mount(registry, fault_proxy):
    p = fault_proxy
    c = client(p.host, chunk_size=64 * 1024)
    src = c.repository("src/a")
    blob = rand_bytes(300_000, 4)
    d = sha256_digest(blob)
    assert src.put_blob(io.BytesIO(blob), d, len(blob))
    assert p.stats.requests(r"/blobs/uploads/", "PATCH") == 5  # 4 x 64 KiB + rest
    assert src.read_blob(d) == blob
    p.stats.reset()
    dst = c.repository("dst/b")
    assert dst.put_blob(io.BytesIO(blob), d, len(blob), mount_from="src/a") is False
    assert p.stats.requests(method="PATCH") == 0 and p.stats.requests(method="PUT") == 0
    assert p.stats.statuses(r"/blobs/uploads/", "POST") == [201]
    assert dst.read_blob(d) == blob
    # mount from a repo that lacks it: falls back to an upload
    other = rand_bytes(1000, 5)
    od = sha256_digest(other)
    assert dst.mount_blob(od, "src/a") is False
    assert dst.put_blob(io.BytesIO(other), od, len(other), mount_from="src/a") is True
    assert dst.read_blob(od) == other


@pytest.mark.parametrize("kind", ["status", "reset", "reset_mid", "truncate", "short", "delay"])
def test_read_range_survives_faults(registry, fault_proxy, kind):
    p = fault_proxy
    repo = client(p.host).repository("f/r")
    blob = rand_bytes(500_000, 6)
    d = repo.put_blob_bytes(blob)
    repo.blob_size(d)
    p.stats.reset()
    kw = {"seconds": 0.2} if kind == "delay" else {}
    p.inject(kind, count=2, match=r"/blobs/sha256", method="GET", **kw)
    assert repo.read_range(d, 1000, 200_000) == blob[1000:201_000]
    if kind == "delay":  # a slow answer is not a failure: one request, one fault left
        assert p.faults_left() == 1 and p.stats.requests(r"/blobs/sha256", "GET") == 1
    else:
        assert p.faults_left() == 0 and p.stats.requests(r"/blobs/sha256", "GET") == 3
        assert repo.client.stats["retries"] >= 2


def test_429_retry_after_is_honoured(registry, fault_proxy):
    """The client waits as long as Retry-After says (FAST_RETRY's own backoff is <= 0.05 s)."""
    p = fault_proxy
    repo = client(p.host).repository("f/429")
    blob = rand_bytes(10_000, 7)
    d = repo.put_blob_bytes(blob)
    repo.blob_size(d)
    p.stats.reset()
    p.inject("status", status=429, retry_after=1, count=1, match=r"/blobs/sha256", method="GET")
    t0 = time.monotonic()
    assert repo.read_range(d, 0, 100) == blob[:100]
    assert time.monotonic() - t0 >= 1.0
    assert p.stats.statuses(r"/blobs/sha256", "GET") == [429, 206]


def test_streaming_read_honours_retry_after(registry, fault_proxy):
    """open_blob goes through the same send path as read_range: Retry-After is waited for there too."""
    p = fault_proxy
    repo = client(p.host).repository("f/429s")
    blob = rand_bytes(200_000, 17)
    d = repo.put_blob_bytes(blob)
    p.stats.reset()
    p.inject("status", status=429, retry_after=1, count=1, match=r"/blobs/sha256", method="GET")
    t0 = time.monotonic()
    assert repo.read_blob(d, len(blob)) == blob
    assert time.monotonic() - t0 >= 1.0
    assert p.stats.statuses(r"/blobs/sha256", "GET") == [429, 200]


def test_retries_exhausted_is_fetch_error(registry, fault_proxy):
    p = fault_proxy
    repo = client(p.host).repository("f/x")
    d = repo.put_blob_bytes(rand_bytes(10_000, 8))
    repo.blob_size(d)
    p.inject("status", status=503, count=100, match=r"/blobs/sha256")
    with pytest.raises(FetchError):
        repo.read_range(d, 0, 100)
    assert p.faults_left() == 100 - FAST_RETRY.attempts
    p.clear_faults()
    p.inject("reset", count=100, match=r"/blobs/sha256")
    with pytest.raises(FetchError):
        repo.read_range(d, 0, 100)


def test_open_blob_resumes_and_verifies(registry, fault_proxy):
    p = fault_proxy
    repo = client(p.host).repository("f/stream")
    blob = rand_bytes(3 << 20, 9)
    d = repo.put_blob_bytes(blob)
    for kind in ("truncate", "reset_mid", "short", "status"):
        p.stats.reset()
        p.inject(kind, count=1, match=r"/blobs/sha256", method="GET")
        assert repo.read_blob(d, len(blob)) == blob, kind
        assert p.stats.requests(r"/blobs/sha256", "GET") == 2, kind
    p.inject("corrupt", count=1, match=r"/blobs/sha256", method="GET")
    with pytest.raises(IntegrityError):
        repo.read_blob(d, len(blob))


def test_manifest_corruption_retried_then_integrity_error(registry, fault_proxy):
    p = fault_proxy
    repo = client(p.host).repository("f/man")
    desc = push_image(repo, "v1", [b"x"])
    p.inject("corrupt", count=1, match=r"/manifests/", method="GET")
    assert sha256_digest(repo.get_manifest(desc.digest)[0]) == desc.digest
    p.inject("corrupt", count=100, match=r"/manifests/", method="GET")
    with pytest.raises(IntegrityError):
        repo.get_manifest(desc.digest)


def test_upload_survives_faults(registry, fault_proxy):
    p = fault_proxy
    c = client(p.host, chunk_size=64 * 1024)
    repo = c.repository("f/up")
    blob = rand_bytes(200_000, 10)
    d = sha256_digest(blob)
    p.inject("status", status=503, count=1, method="PATCH")
    p.inject("reset", count=1, method="POST")
    assert repo.put_blob(io.BytesIO(blob), d, len(blob))
    assert repo.read_blob(d) == blob
    small = rand_bytes(1000, 11)
    p.inject("status", status=500, count=2, method="PUT")
    assert repo.put_blob_bytes(small) == sha256_digest(small)
    desc = push_image(repo, None, [small])
    p.inject("status", status=502, count=2, method="PUT", match="/manifests/")
    assert repo.put_manifest(repo.get_manifest(desc.digest)[0], mt.OCI_MANIFEST, tag="t").digest == desc.digest


def _docker_config(tmp_path, host: str, user: str, pw: str, **extra) -> str:
    import base64

    cfg = {"auths": {host: {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()}}, **extra}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def test_basic_auth_with_real_registry_htpasswd(tmp_path):
    from tests.fixtures.registry import start_registry

    with start_registry(tmp_path / "reg", htpasswd={"alice": "s3cret"}) as reg:
        cfg = _docker_config(tmp_path, f"http://{reg.host}/v1/", "alice", "s3cret")
        repo = client(reg.host, docker_config=cfg).repository("auth/basic")
        blob = rand_bytes(5000, 12)
        d = repo.put_blob_bytes(blob)
        desc = push_image(repo, "v1", [blob])
        assert repo.read_range(d, 10, 10) == blob[10:20]
        assert repo.resolve("v1").digest == desc.digest
        bad = _docker_config(tmp_path, reg.host, "alice", "wrong")
        with pytest.raises(AuthError):
            client(reg.host, docker_config=bad).repository("auth/basic").resolve("v1")
        with pytest.raises(AuthError):
            client(reg.host).repository("auth/basic").resolve("v1")


def test_credential_helper(tmp_path, monkeypatch):
    from tests.fixtures.registry import start_registry

    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-bdtest"
    helper.write_text('#!/bin/sh\nread server\necho "$server" > "$(dirname "$0")/asked"\n'
                      'echo \'{"ServerURL":"x","Username":"bob","Secret":"hunter2"}\'\n')
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    with start_registry(tmp_path / "reg", htpasswd={"bob": "hunter2"}) as reg:
        cfg = tmp_path / "config.json"
        cfg.write_text(json.dumps({"credHelpers": {reg.host: "bdtest"}}))
        repo = client(reg.host, docker_config=str(cfg)).repository("auth/helper")
        push_image(repo, "v1", [b"abc"])
        assert (bindir / "asked").read_text().strip() == reg.host
        cfg.write_text(json.dumps({"credsStore": "bdtest"}))
        assert client(reg.host, docker_config=str(cfg)).repository("auth/helper").list_tags() == ["v1"]


def test_bearer_token_flow_and_redirects_without_auth(registry, fault_proxy, tmp_path, caplog):
    p = fault_proxy
    p.require_auth("bearer", {"carol": "pw-carol"})
    cfg = _docker_config(tmp_path, p.host, "carol", "pw-carol")
    c = client(p.host, docker_config=cfg)
    repo = c.repository("tok/en")
    blob = rand_bytes(100_000, 13)
    caplog.set_level("DEBUG")
    d = repo.put_blob_bytes(blob)
    desc = push_image(repo, "v1", [blob])
    assert repo.read_range(d, 0, 10) == blob[:10]
    assert repo.resolve("v1").digest == desc.digest
    assert 1 <= p.token_requests <= 3  # tokens are cached per scope
    # a token the registry no longer accepts: one 401, a new token, success
    p.revoke_tokens()
    before = p.token_requests
    assert repo.read_range(d, 10, 10, size=len(blob)) == blob[10:20]
    assert p.token_requests == before + 1
    assert "pw-carol" not in caplog.text and "Basic " not in caplog.text
    # blob storage redirects: followed, without the registry's Authorization; cached
    p.redirect_blobs = True
    p.stats.reset()
    for off in (0, 1000, 50_000):
        assert repo.read_range(d, off, 500) == blob[off : off + 500]
    assert p.storage_requests_with_auth == 0
    assert p.stats.requests(r"^/v2/.*/blobs/sha256", "GET") == 1
    assert p.stats.requests(r"^/_storage/", "GET") == 3
    assert repo.read_blob(d) == blob
    assert p.storage_requests_with_auth == 0
    # wrong password -> AuthError, anonymous -> AuthError
    bad = _docker_config(tmp_path, p.host, "carol", "nope")
    with pytest.raises(AuthError):
        client(p.host, docker_config=bad).repository("tok/en").resolve("v1")
    with pytest.raises(AuthError):
        client(p.host).repository("tok/en").resolve("v1")


def test_anonymous_bearer_token(registry, fault_proxy):
    fault_proxy.require_auth("bearer", {})
    repo = client(fault_proxy.host).repository("anon/x")
    desc = push_image(repo, "v1", [b"hello"])
    assert repo.resolve("v1").digest == desc.digest


def test_hosts_toml_mirror_then_fallback(registry, tmp_path):
    upstream = registry.host
    with FaultProxy(registry.url) as mirror:
        hd = tmp_path / "certs.d" / upstream
        hd.mkdir(parents=True)
        (hd / "hosts.toml").write_text(
            f'server = "http://{upstream}"\n'
            f'[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n'
            f'  [host."http://{mirror.host}".header]\n    X-Test-Mirror = "yes"\n'
        )
        c = client(upstream, hosts_dirs=[str(tmp_path / "certs.d")])
        assert [e.netloc for e in c.endpoints] == [mirror.host, upstream]
        repo = c.repository("mir/ror")
        blob = rand_bytes(50_000, 14)
        d = repo.put_blob_bytes(blob)  # push goes to the server only
        assert mirror.stats.requests(method="PUT") == 0 and mirror.stats.requests(method="POST") == 0
        assert repo.read_range(d, 0, 1000) == blob[:1000]
        assert mirror.stats.bytes(r"/blobs/sha256", "GET") == 1000
        mirror.inject("status", status=503, count=100)
        assert repo.read_range(d, 1000, 1000) == blob[1000:2000]  # mirror down: upstream answers
        mirror.clear_faults()
        # writes (and the reads of a read-modify-write) never go through the mirror
        from bdserver.oci.referrers import add_referrer, list_referrers

        from .helpers import lazy_manifest

        src = push_image(repo, "v1", [blob])
        mirror.stats.reset()
        lz = add_referrer(repo, lazy_manifest(repo, src), mt.OCI_MANIFEST)
        assert mirror.stats.requests() == 0
        assert [x.digest for x in list_referrers(repo, src.digest)] == [lz.digest]
        assert mirror.stats.requests(r"/manifests/sha256-", "GET") == 1


def test_no_redirect_auth_leak_in_repr():
    from bdserver.oci.auth import Credentials

    assert "hunter2" not in repr(Credentials("u", "hunter2", "tok"))


def test_docker_schema2_and_manifest_list_on_registry(registry_session):
    from bdserver.oci.model import Descriptor, Index, Manifest, Platform, select_platform

    repo = client(registry_session.host).repository(unique("docker/"))
    cfg = b'{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    layer = rand_bytes(3000, 20)
    repo.put_blob_bytes(cfg)
    repo.put_blob_bytes(layer)
    m = Manifest(config=Descriptor.for_bytes(cfg, mt.DOCKER_CONFIG),
                 layers=[Descriptor.for_bytes(layer, mt.DOCKER_LAYER_TAR_GZIP)], media_type=mt.DOCKER_MANIFEST)
    md = repo.put_manifest(m.to_bytes(), mt.DOCKER_MANIFEST)
    lst = Index(manifests=[Descriptor(mt.DOCKER_MANIFEST, md.digest, md.size, platform=Platform("linux", "arm64", "v8"))],
                media_type=mt.DOCKER_MANIFEST_LIST)
    repo.put_manifest(lst.to_bytes(), mt.DOCKER_MANIFEST_LIST, tag="multi")
    data, desc = repo.get_manifest("multi")
    assert desc.media_type == mt.DOCKER_MANIFEST_LIST
    idx = parse_manifest(data, desc.media_type)
    pick = select_platform(idx.manifests, Platform("linux", "arm64"))
    mdata, mdesc = repo.get_manifest(pick.digest)
    assert mdesc.media_type == mt.DOCKER_MANIFEST and parse_manifest(mdata).layers[0].digest == sha256_digest(layer)
    assert repo.resolve("multi").media_type == mt.DOCKER_MANIFEST_LIST


def test_real_registry_token_auth(tmp_path):
    """distribution 2.8 with `auth: token` and a loopback JWT issuer: the whole Bearer flow for real."""
    from tests.fixtures.registry import start_token_registry

    reg, ts = start_token_registry(tmp_path / "tok", users={"dave": "pw-dave"})
    try:
        cfg = _docker_config(tmp_path, reg.host, "dave", "pw-dave")
        # the realm is another host:port than the registry's: credentials go there only if allowed
        with pytest.raises(AuthError, match="refusing to send credentials to token realm"):
            client(reg.host, docker_config=cfg).repository("tok/real").resolve("v1")
        assert ts.requests == 0
        c = client(reg.host, docker_config=cfg, token_realms={reg.host: [ts.netloc]})
        repo = c.repository("tok/real")
        blob = rand_bytes(70_000, 21)
        d = repo.put_blob_bytes(blob)
        desc = push_image(repo, "v1", [blob])
        assert repo.resolve("v1").digest == desc.digest
        assert repo.read_range(d, 5, 5) == blob[5:10]
        assert repo.read_blob(d) == blob
        other = c.repository("tok/other")
        assert other.mount_blob(d, "tok/real") is True  # token carries pull on the source repo too
        assert other.read_range(d, 0, 3) == blob[:3]
        assert ts.requests <= 6  # one token per scope set, reused
        with pytest.raises(AuthError):
            client(reg.host, docker_config=_docker_config(tmp_path, reg.host, "dave", "nope"),
                   token_realms={reg.host: [ts.netloc]}).repository("tok/real").resolve("v1")
        with pytest.raises(AuthError):
            client(reg.host).repository("tok/real").resolve("v1")
    finally:
        reg.stop()
        ts.stop()


def test_token_refresh_under_many_threads_fetches_once(registry, fault_proxy):
    p = fault_proxy
    p.require_auth("bearer", {})
    repo = client(p.host).repository("herd/x")
    blob = rand_bytes(200_000, 22)
    d = repo.put_blob_bytes(blob)
    assert repo.read_range(d, 0, 10) == blob[:10]
    p.revoke_tokens()
    before = p.token_requests
    errors: list[BaseException] = []

    def reader(k: int) -> None:
        try:
            off = k * 4096
            assert repo.read_range(d, off, 4096) == blob[off : off + 4096]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=reader, args=(k,)) for k in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert not errors
    assert p.token_requests - before <= 2


def test_registry_that_ignores_range(registry, fault_proxy):
    """A pull-through cache answers 200 with the whole blob on a miss: ranges still come out right."""
    p = fault_proxy
    repo = client(p.host).repository("norange/x")
    blob = rand_bytes(400_000, 23)
    d = repo.put_blob_bytes(blob)
    p.ignore_range = True
    assert repo.read_range(d, 123_456, 1000) == blob[123_456:124_456]
    assert repo.read_range(d, len(blob) - 10, 100) == blob[-10:]
    assert p.stats.statuses(r"/blobs/sha256", "GET") == [200, 200]
    p.inject("truncate", count=1, match=r"/blobs/sha256", method="GET")  # resume gets a 200: skip ahead
    assert repo.read_blob(d, len(blob)) == blob


def test_tls_registry_via_hosts_toml(tmp_path):
    """HTTPS with a private CA from hosts.toml (`ca`), and `skip_verify`; without either, TLS fails."""
    from tests.fixtures.registry import start_registry

    with start_registry(tmp_path / "reg", tls=True) as reg:
        hd = tmp_path / "certs.d" / reg.host
        hd.mkdir(parents=True)
        (hd / "hosts.toml").write_text(f'server = "https://{reg.host}"\nca = "{reg.ca}"\n')
        c = client(reg.host, hosts_dirs=[str(tmp_path / "certs.d")])
        assert c.endpoints[0].scheme == "https"
        repo = c.repository("tls/x")
        desc = push_image(repo, "v1", [b"secure"])
        assert repo.resolve("v1").digest == desc.digest
        (hd / "hosts.toml").write_text(f'server = "https://{reg.host}"\nskip_verify = true\n')
        assert client(reg.host, hosts_dirs=[str(tmp_path / "certs.d")]).repository("tls/x").resolve("v1") == desc
        (hd / "hosts.toml").write_text(f'server = "https://{reg.host}"\n')
        c3 = client(reg.host, hosts_dirs=[str(tmp_path / "certs.d")])
        with pytest.raises(RegistryError, match="hosts.toml"):
            c3.repository("tls/x").resolve("v1")
        assert c3.stats["retries"] == 0


def test_mirror_without_the_blob_falls_through(registry, tmp_path):
    """A mirror in front of an EMPTY registry: every read 404s there and must come from upstream."""
    from tests.fixtures.registry import start_registry

    with start_registry(tmp_path / "empty") as empty, FaultProxy(empty.url) as mirror:
        hd = tmp_path / "certs.d" / registry.host
        hd.mkdir(parents=True)
        (hd / "hosts.toml").write_text(f'server = "http://{registry.host}"\n'
                                       f'[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
        repo = client(registry.host, hosts_dirs=[str(tmp_path / "certs.d")]).repository("fall/through")
        blob = rand_bytes(30_000, 24)
        d = repo.put_blob_bytes(blob)
        desc = push_image(repo, "v1", [blob])
        assert repo.resolve("v1").digest == desc.digest
        assert repo.get_manifest("v1")[1].digest == desc.digest
        assert repo.read_range(d, 7, 7) == blob[7:14]
        assert repo.read_blob(d) == blob
        assert mirror.stats.requests(method="GET") >= 3 and set(mirror.stats.statuses(method="GET")) == {404}


def test_identity_token_from_credential_helper(registry, fault_proxy, tmp_path, monkeypatch):
    """`Username: <token>` from a helper means an OAuth2 refresh token: POST grant_type=refresh_token."""
    p = fault_proxy
    p.require_auth("bearer", {"someone": "else"})
    p.refresh_tokens.add("rt-123")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-bdtok"
    helper.write_text('#!/bin/sh\nread server\necho \'{"ServerURL":"x","Username":"<token>","Secret":"rt-123"}\'\n')
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"credsStore": "bdtok"}))
    repo = client(p.host, docker_config=str(cfg)).repository("oauth/x")
    desc = push_image(repo, "v1", [b"oauth"])
    assert repo.resolve("v1").digest == desc.digest
    assert p.stats.requests("^/token$", "POST") >= 1 and p.stats.requests("^/token$", "GET") == 0
    p.refresh_tokens.clear()
    p.revoke_tokens()
    with pytest.raises(AuthError):
        client(p.host, docker_config=str(cfg)).repository("oauth/x").resolve("v1")
