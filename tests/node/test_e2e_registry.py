"""End to end through Debian's docker-registry (and a byte-counting proxy): convert, mount lazily, share
chunks across images, restart with a warm cache, read little, run a container, convert on the node."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.fixtures.converter import convert_cli
from tests.fixtures.reftree import reference_tree
from tests.fixtures.trees import assert_same_tree

pytestmark = pytest.mark.slow

from tests.fixtures.layers import build_oci_layout, debian_layers, debian_oci_layout, small_tar_layer
from tests.fixtures.proxy import FaultProxy
from tests.fixtures.registry import REGISTRY_BIN, start_registry

if not os.path.exists(REGISTRY_BIN):  # installed by `make setup`: a missing one is a setup bug, not a skip
    pytest.fail(f"{REGISTRY_BIN} is missing: run kernel-setup/install-packages", pytrace=False)


@dataclass
class World:
    base: Path
    registry: object
    host: str
    deb_layers: list[Path]
    lazy: dict[str, dict]  # repo -> convert result (lazy, source digests)
    shared: dict[str, list[Path]]  # repo -> layers of the images sharing debian's base layer
    plain_layers: list[Path]  # the image pushed without a lazy image

    def trust_toml(self) -> str:
        allowed = ", ".join(f'"{r["lazy"]}"' for r in self.lazy.values())
        return f"[trust]\nallowed = [{allowed}]\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("e2e")
    reg = start_registry(base / "registry")
    try:
        deb_layers = debian_layers()
        reg.push_layout(debian_oci_layout(), "latest", "deb", "v1")
        lazy = {"deb": convert_cli(base, f"{reg.host}/deb:v1")}
        shared = {}
        for name in ("one", "two", "three"):
            top = small_tar_layer(base / f"top-{name}.tar", {f"srv/{name}/id": name.encode() * 100,
                                                         "etc/image-name": name.encode() + b"\n"})
            layers = [deb_layers[0], top]
            build_oci_layout(layers, base / f"layout-{name}")
            reg.push_layout(base / f"layout-{name}", "latest", name, "v1")
            lazy[name] = convert_cli(base, f"{reg.host}/{name}:v1")
            shared[name] = layers
        plain = [small_tar_layer(base / "plain1.tar", {"a/file": b"x" * 70_000, "a/gone": b"bye", "b/keep": b"k"}),
                 small_tar_layer(base / "plain2.tar", {"a/new": b"new\n"}, whiteouts=("a/gone",))]
        build_oci_layout(plain, base / "layout-plain")
        reg.push_layout(base / "layout-plain", "latest", "plain", "v1")
        yield World(base, reg, reg.host, deb_layers, lazy, shared, plain)
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def deb_reference(world: World) -> Path:
    return reference_tree(world.deb_layers, world.base / "deb-reference", world.base / "deb-reference-work")


@pytest.fixture
def proxy(world: World) -> Iterator[FaultProxy]:
    p = FaultProxy(world.registry.url)
    try:
        yield p
    finally:
        p.stop()


def _blob_sizes(daemon, ref: str) -> dict[str, int]:
    info = json.loads(daemon.cli("inspect", ref, "--json").stdout)
    return {d["digest"]: d["size"] for d in info["layers"]}


def _read_all(root: Path, sub: str = "") -> int:
    n = 0
    for dirpath, _, files in os.walk(root / sub):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        n += len(chunk)
    return n


def test_mount_equals_reference_tree(world: World, daemon, deb_reference: Path, tmp_path: Path) -> None:
    daemon.write_config(world.trust_toml())
    target = tmp_path / "deb"
    r = daemon.json("mount", f"{world.host}/deb:v1", str(target), "--lower-only")
    assert r["kind"] == "lazy" and r["backend"] == "fuse"
    assert_same_tree(target, deb_reference)
    assert sum(1 for _ in target.rglob("*")) > 1000
    st = daemon.json("stats", r["id"])[0]["stats"]
    assert st["device"]["misses"] > 0 and st["read_errors"] == 0
    daemon.cli("umount", str(target))


def test_shared_base_layer_is_fetched_once(world: World, daemon, proxy: FaultProxy, tmp_path: Path) -> None:
    daemon.write_config(world.trust_toml())
    sizes = _blob_sizes(daemon, f"{world.host}/one:v1")
    targets = {}
    for name in ("one", "two", "three"):  # three containers at once
        targets[name] = tmp_path / name
        daemon.cli("mount", f"{proxy.host}/{name}:v1", str(targets[name]))
    lazy_layers = {n: _blob_sizes(daemon, f"{world.host}/{n}:v1") for n in ("one", "two", "three")}
    common = set.intersection(*(set(v) for v in lazy_layers.values()))
    base_blobs = [d for d in common if sizes[d] > 1_000_000]
    assert len(base_blobs) == 1, "the EROFS layer of the shared base must be the same blob in all three"
    base = base_blobs[0]
    # Image one reads every file of the base; the other two then read the same files and must be
    # served entirely from the node cache (readahead may stray differently, so read everything).
    assert _read_all(targets["one"]) > 10_000_000
    first = proxy.stats.bytes(f"/blobs/{base}")
    assert 0 < first <= sizes[base]
    for name in ("two", "three"):
        _read_all(targets[name])
        assert (targets[name] / "etc" / "image-name").read_text() == f"{name}\n"
    assert proxy.stats.bytes(f"/blobs/{base}") == first, "base chunks were fetched again for another image"
    print(f"\nshared base: {first} bytes fetched once for 3 images (blob {sizes[base]} bytes)")
    for name, t in targets.items():
        daemon.cli("umount", str(t))


def _read_file(path: str | Path) -> int:
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            n += len(chunk)
    return n


def test_restart_with_warm_cache_fetches_nothing(world: World, daemon, proxy: FaultProxy, tmp_path: Path) -> None:
    """A graceful restart (`bdserver stop`, as systemd does) or a crash loses nothing of the node cache.

    The cache is warmed with the whole device: what the kernel reads is not a fixed set. Its readahead
    on the device file lays out its windows by how fast the device answers (the network before the
    restart, the cache after it), so a re-read may reach a chunk that the first read never touched and
    that best-effort fetch-ahead did not happen to cover (seen once: one sequential stream's last
    window ended 128 KiB further, 1 demand miss + 12 fetch-aheads, nothing fetched twice). Fetches
    still on the wire when a daemon stops are tests/vdev/test_prefetch.py's
    test_close_lets_fetches_on_the_wire_reach_the_cache.
    """
    daemon.write_config(world.trust_toml())
    target = tmp_path / "rootfs"
    daemon.cli("mount", f"{proxy.host}/deb:v1", str(target))

    def read() -> int:
        return _read_all(target, "etc") + _read_all(target, "usr/lib/x86_64-linux-gnu")

    n = read()
    first = proxy.stats.bytes("/blobs/")
    assert n > 0 and first > 0
    disk = daemon.json("ls")[0]["path"]
    size = _read_file(disk)  # every chunk of the device is in the node cache now
    cold = proxy.stats.bytes("/blobs/")
    # graceful restart: not one request to the registry
    daemon.stop()
    proxy.stats.reset()
    daemon.start()
    assert [d["status"] for d in daemon.json("ls")] == ["attached"]
    assert read() == n and _read_file(disk) == size
    assert proxy.stats.requests() == 0, f"restart fetched: {proxy.stats.entries[:5]}"
    # crash (SIGKILL): every chunk was durable in the cache before it was handed out, so none either
    daemon.kill()
    proxy.stats.reset()
    daemon.start()
    assert [d["status"] for d in daemon.json("ls")] == ["attached"]
    assert read() == n
    assert proxy.stats.requests() == 0, f"restart after SIGKILL fetched: {proxy.stats.entries[:5]}"
    print(f"\nfiles: {first} bytes fetched; whole device: {cold}; after a graceful restart 0; after SIGKILL 0")
    daemon.cli("umount", str(target))


def _largest_file(root: Path, sub: str) -> Path:
    best, size = None, -1
    for dirpath, _, files in os.walk(root / sub):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if stat.S_ISREG(st.st_mode) and st.st_size > size:
                best, size = Path(dirpath) / f, st.st_size
    assert best is not None
    return best


def test_restart_while_the_registry_is_down(world: World, daemon, proxy: FaultProxy, deb_reference: Path,
                                            tmp_path: Path) -> None:
    """The daemon comes back with its devices and serves what is cached; an uncached read fails with
    EIO in bounded time and succeeds once the registry is back (issue 9.4)."""
    daemon.write_config(world.trust_toml())
    target = tmp_path / "deb"
    daemon.cli("mount", f"{proxy.host}/deb:v1", str(target), "--lower-only")
    n = _read_all(target, "etc")
    daemon.stop()
    proxy.inject("reset", count=1_000_000)  # every connection to the registry is dropped from now on
    daemon.start()  # the devices are recovered before the daemon answers
    assert [d["status"] for d in daemon.json("ls")] == ["attached"]
    assert _read_all(target, "etc") == n  # everything cached is served
    big = _largest_file(target, "usr")  # never read: its chunks (beyond any fetch-ahead) are not cached
    rel = big.relative_to(target)
    assert big.stat().st_size > 4 << 20
    p = subprocess.run(["cat", str(big)], capture_output=True, timeout=120)  # bounded: EIO, not a hang
    assert p.returncode != 0 and b"Input/output error" in p.stderr, p.stderr
    assert daemon.json("stats")[0]["stats"]["device"]["fetch_errors"] > 0
    proxy.clear_faults()  # the registry is back
    assert big.read_bytes() == (deb_reference / rel).read_bytes()
    daemon.cli("umount", str(target))


def test_small_read_fetches_little(world: World, daemon, proxy: FaultProxy, tmp_path: Path) -> None:
    daemon.write_config(world.trust_toml())
    total = sum(_blob_sizes(daemon, f"{world.host}/deb:v1").values())
    target = tmp_path / "deb"
    daemon.cli("mount", f"{proxy.host}/deb:v1", str(target), "--lower-only")
    assert (target / "etc" / "hostname").read_text() == "bdserver-test\n"
    assert (target / "etc" / "debian_version").read_text().strip()
    fetched = proxy.stats.bytes("/blobs/")
    print(f"\nsmall read: {fetched} of {total} blob bytes fetched ({100 * fetched / total:.2f} %)")
    assert 0 < fetched < 0.05 * total
    daemon.cli("umount", str(target))


def test_run_command_in_image(world: World, daemon) -> None:
    daemon.write_config(world.trust_toml())
    p = daemon.cli("run", f"{world.host}/deb:v1", "--", "/bin/sh", "-c",
                   "cat /etc/hostname; python3 -c 'print(6*7)'; test -d /usr/share/doc || echo no-doc")
    assert p.stdout.split("\n")[:3] == ["bdserver-test", "42", "no-doc"]
    assert daemon.json("ls") == []


def test_attach_without_lazy_image_converts_on_node(world: World, daemon, tmp_path: Path) -> None:
    daemon.write_config(world.trust_toml())
    r = daemon.json("attach", f"{world.host}/plain:v1")
    assert r["kind"] == "converted-on-node" and "converted on the node" in r["message"]
    p = daemon.cli("attach", f"{world.host}/plain:v1")  # the human form says so on stderr
    assert "on-node conversion" in p.stderr or "converted on the node" in p.stderr
    target = tmp_path / "plain"
    daemon.cli("mount", f"{world.host}/plain:v1", str(target), "--lower-only")
    ref = reference_tree(world.plain_layers, tmp_path / "plain-ref", tmp_path / "plain-work")
    assert_same_tree(target, ref)
    assert not (target / "a" / "gone").exists() and (target / "a" / "new").read_text() == "new\n"
    # still ONE device per container
    assert len([d for d in daemon.json("ls") if d["mounts"]]) == 1
    daemon.cli("umount", str(target))


def test_untrusted_lazy_image_is_not_used(world: World, daemon, tmp_path: Path) -> None:
    """Anyone who can push can add a referrer: without trust the node converts for itself."""
    daemon.write_config("[trust]\nallowed = []\nconverted_here = true\n")
    r = daemon.json("attach", f"{world.host}/one:v1")
    assert r["kind"] == "converted-on-node" and "none is trusted" in r["message"]
    target = tmp_path / "one"
    mounts_before = daemon.json("ls")
    assert len(mounts_before) == 1
    daemon.cli("mount", f"{world.host}/one:v1", str(target), "--lower-only")
    assert (target / "etc" / "image-name").read_text() == "one\n"
    daemon.cli("umount", str(target))
    daemon.cli("detach", r["id"])


def test_trust_allow_makes_a_lazy_image_usable(world: World, daemon, tmp_path: Path) -> None:
    daemon.write_config("[trust]\nallowed = []\n")
    p = daemon.cli("trust", "allow", "not-a-digest", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    daemon.cli("trust", "allow", world.lazy["two"]["lazy"])
    assert world.lazy["two"]["lazy"] in daemon.json("trust", "ls")["allowed"]
    r = daemon.json("attach", f"{world.host}/two:v1")
    assert r["kind"] == "lazy"
    daemon.cli("detach", r["id"])


def test_cache_prune_evicts_down_to_a_lowered_cap(world: World, daemon, tmp_path: Path) -> None:
    daemon.write_config(world.trust_toml())
    target = tmp_path / "deb"
    daemon.cli("mount", f"{world.host}/deb:v1", str(target), "--lower-only")
    _read_all(target, "usr/lib")
    daemon.cli("umount", str(target))
    daemon.stop()
    used = sum(f.stat().st_blocks * 512 for f in (daemon.base / "cache").rglob("*") if f.is_file())
    assert used > 4 << 20
    cap = used // 4
    daemon.write_config(f"cache_max_bytes = {cap}\n" + world.trust_toml())  # before the [trust] table
    r = daemon.json("cache", "prune")  # no daemon running: done in-process
    assert r["pruned_bytes"] > 0 and r["used_bytes"] <= cap
