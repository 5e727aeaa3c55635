"""EROFS-native images through Debian's docker-registry and the daemon (`bdserver mount`): made by
mkfs.erofs (plain and -zlz4hc, from overlay layer views with whiteouts and opaque directories),
shipped with chunk indexes (lazy: a small read fetches a fraction of the layers, the chunks
holding their metadata) or as containerd's media
type (fetched whole); a malformed layer is refused before anything is attached; `bdserver convert`
of a native image publishes the same kind of lazy image a tar image gets."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.fixtures.erofs_layers import native_oci_layout
from tests.fixtures.layers import debian_layers
from tests.fixtures.proxy import FaultProxy
from tests.fixtures.reftree import extract_layer
from tests.fixtures.registry import REGISTRY_BIN, start_registry
from tests.fixtures.trees import assert_same_tree
from tests.native.conftest import NativeLayers
from tests.native.test_open import _corrupt_first_file_block
from tests.node.conftest import BDSERVER, REPO

pytestmark = pytest.mark.slow

if not os.path.exists(REGISTRY_BIN):  # installed by `make setup`: a missing one is a setup bug, not a skip
    pytest.fail(f"{REGISTRY_BIN} is missing: run kernel-setup/install-packages", pytrace=False)


@dataclass
class World:
    base: Path
    registry: object
    host: str
    blob_bytes: dict[str, int]  # repo -> bytes of all its layer blobs


def _push(world_base: Path, reg, images: list[Path], form: str, repo: str,  # type: ignore[no-untyped-def]
          chunk_size: int = 64 << 10) -> int:
    layout = native_oci_layout(images, world_base / f"layout-{repo}", form, chunk_size=chunk_size)
    reg.push_layout(layout, "latest", repo, "v1", tool="bdserver")
    index = json.loads((layout / "index.json").read_text())
    man = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    return sum(l["size"] for l in man["layers"])


@pytest.fixture(scope="module")
def world(native_layers: NativeLayers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("native-reg")
    reg = start_registry(base / "registry")
    try:
        sizes = {}
        for form, repo in (("zstd-index", "native-zstd"), ("standalone", "native-standalone"),
                           ("containerd-zstd", "native-ctd")):
            sizes[repo] = _push(base, reg, native_layers.images, form, repo)
        bad = _corrupt_first_file_block(native_layers.images[2], base / "bad.erofs")
        sizes["native-bad"] = _push(base, reg, [native_layers.images[0], bad], "zstd-index", "native-bad")
        deb = []
        for i, t in enumerate(debian_layers()):  # the debootstrap split as mkfs.erofs -zlz4hc layers
            extract_layer(t, base / f"deb-view{i}")
            img = base / f"deb{i}.erofs"
            subprocess.run(["mkfs.erofs", "--quiet", "-zlz4hc", str(img), str(base / f"deb-view{i}")], check=True)
            deb.append(img)
        sizes["native-deb"] = _push(base, reg, deb, "zstd-index", "native-deb", chunk_size=16 << 10)
        yield World(base, reg, reg.host, sizes)
    finally:
        reg.stop()


@pytest.fixture
def proxy(world: World) -> Iterator[FaultProxy]:
    p = FaultProxy(world.registry.url)
    try:
        yield p
    finally:
        p.stop()


@pytest.mark.parametrize("repo", ["native-zstd", "native-standalone"])
def test_native_image_mounts_lazily_equal_to_the_reference(world: World, native_layers: NativeLayers, daemon,
                                                           repo: str, tmp_path: Path) -> None:
    target = tmp_path / "root"
    r = daemon.json("mount", f"{world.host}/{repo}:v1", str(target), "--lower-only")
    assert r["kind"] == "native", r
    assert "merged metadata built on the node" in r["message"]
    assert_same_tree(target, native_layers.reference)
    assert len([d for d in daemon.json("ls") if d["mounts"]]) == 1  # ONE device
    daemon.cli("umount", str(target))


def test_containerd_media_type_is_fetched_whole(world: World, native_layers: NativeLayers, daemon,
                                                tmp_path: Path) -> None:
    target = tmp_path / "root"
    r = daemon.json("mount", f"{world.host}/native-ctd:v1", str(target), "--lower-only")
    assert r["kind"] == "converted-on-node" and "without chunk indexes" in r["message"], r
    assert_same_tree(target, native_layers.reference)
    daemon.cli("umount", str(target))


def test_small_read_fetches_a_small_fraction(world: World, daemon, proxy: FaultProxy, tmp_path: Path) -> None:
    total = world.blob_bytes["native-deb"]
    target = tmp_path / "deb"
    r = daemon.json("mount", f"{proxy.host}/native-deb:v1", str(target), "--lower-only")
    assert r["kind"] == "native"
    assert (target / "etc" / "hostname").read_text() == "bdserver-test\n"
    assert (target / "etc" / "debian_version").read_text().strip()
    assert not (target / "usr" / "share" / "doc").exists()  # whiteouts of the debootstrap split applied
    fetched = proxy.stats.bytes("/blobs/")
    print(f"\nnative small read: {fetched} of {total} blob bytes fetched ({100 * fetched / total:.2f} %)")
    # The merged metadata is built from every layer's inodes and directories, which mkfs.erofs 1.5
    # spreads between the data: their chunks are fetched (13-16 % here; 2-5 % for the lazy image
    # `bdserver convert` publishes, which ships the merged metadata); never the rest.
    assert 0 < fetched < 0.25 * total
    daemon.cli("umount", str(target))


def test_malformed_layer_reaches_neither_the_merge_nor_the_kernel(world: World, daemon, tmp_path: Path) -> None:
    target = tmp_path / "bad"
    target.mkdir()
    p = daemon.cli("mount", f"{world.host}/native-bad:v1", str(target), "--lower-only", check=False)
    assert p.returncode == 3, p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and "layer 1 (sha256:" in line and "not inside one region" in line, line
    assert daemon.json("ls") == []
    assert not os.path.ismount(target)


def test_convert_of_a_native_image_publishes_a_lazy_image(world: World, native_layers: NativeLayers, daemon,
                                                         tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BDSERVER_")}
    env.update(BDSERVER_STATE_DIR=str(tmp_path / "converter"), PYTHONPATH=str(REPO))
    ref = f"{world.host}/native-zstd:v1"
    p = subprocess.run(BDSERVER + ["convert", ref, "--json"], env=env, capture_output=True, text=True, timeout=600,
                       cwd=REPO)
    assert p.returncode == 0, p.stderr
    lazy = json.loads(p.stdout)["lazy"]
    daemon.write_config(f'[trust]\nallowed = ["{lazy}"]\n')
    target = tmp_path / "root"
    r = daemon.json("mount", ref, str(target), "--lower-only")
    assert r["kind"] == "lazy", r
    assert_same_tree(target, native_layers.reference)
    info = json.loads(daemon.cli("inspect", ref, "--json").stdout)
    assert [l["media_type"] for l in info["layers"]][-1] == "application/vnd.erofs"
    daemon.cli("umount", str(target))
