"""A lazy image from a registry, served over TCMU by the real daemon and CLI (lab only).

Everything runs inside the lab guest: Debian's docker-registry on 127.0.0.1, a fault proxy in front
of it, `bdserver convert` to publish the lazy image, then a private daemon that attaches it with
`--backend tcmu`; the kernel's EROFS driver mounts /dev/sdX."""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.fixtures.layers import small_tar_layer
from tests.lab.helpers import configfs_residue, drop_caches, kernel_log, settle

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.usefixtures("tcmu_lab")]


@dataclass
class World:
    base: Path
    registry: object
    layers: list[Path]
    reference: Path
    lazy_digest: str


@pytest.fixture(scope="module")
def world(tmp_path_factory, tcmu_lab) -> Iterator[World]:
    from tests.fixtures.layers import build_oci_layout
    from tests.fixtures.registry import start_registry
    from tests.fixtures.converter import convert_cli
    from tests.fixtures.reftree import reference_tree

    base = tmp_path_factory.mktemp("lazy")
    rng = random.Random(5)
    layers = [
        small_tar_layer(base / "l1.tar", {"app/big": rng.randbytes(3_000_000), "app/second": rng.randbytes(1_500_000),
                               "etc/name": b"lower\n", "etc/gone": b"bye\n"}),
        small_tar_layer(base / "l2.tar", {"etc/name": b"upper\n", "app/small": rng.randbytes(5000)},
             whiteouts=("etc/gone",)),
    ]
    build_oci_layout(layers, base / "layout")
    reg = start_registry(base / "registry")
    try:
        reg.push_layout(base / "layout", "latest", "app", "v1")
        converted = convert_cli(base, f"{reg.host}/app:v1", timeout=900)
        lazy = converted["lazy"]
        # the reference needs whiteout device nodes and trusted.* xattrs: build it on a tmpfs
        (base / "ref").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "bdserver-ref", str(base / "ref")], check=True)
        yield World(base, reg, layers, reference_tree(layers, base / "ref" / "tree", base / "ref" / "work"), lazy)
    finally:
        subprocess.run(["umount", "-l", str(base / "ref")], check=False, capture_output=True)
        reg.stop()


@pytest.fixture
def tcmu_daemon(tmp_path, world) -> Iterator[object]:
    from tests.node.conftest import REPO, Daemon, cleanup_mounts

    base = tmp_path / "d"
    base.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BDSERVER_")}
    env["BDSERVER_CONFIG"] = str(base / "config.toml")
    env["PYTHONPATH"] = str(REPO)
    d = Daemon(base, env)
    # no fetch-ahead: this test counts exactly what reads fetch
    d.write_config(f'prefetch_chunks = 0\n[trust]\nallowed = ["{world.lazy_digest}"]\n')
    try:
        yield d
    finally:
        cleanup_mounts(tmp_path)
        if d.pid() is not None:
            d.stop()


def test_lazy_image_over_tcmu(world, tcmu_daemon, tmp_path) -> None:
    from tests.fixtures.proxy import FaultProxy
    from tests.fixtures.trees import assert_same_tree

    with FaultProxy(world.registry.url) as proxy:
        info = tcmu_daemon.json("attach", f"{proxy.host}/app:v1", "--backend", "tcmu")
        path = info["path"]
        assert info["backend"] == "tcmu" and info["kind"] == "lazy" and path.startswith("/dev/sd")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "erofs", "-o", "ro", path, str(mnt)], check=True)
        try:
            # the same device blocks read twice (O_DIRECT): the second time nothing is fetched
            size = int(subprocess.run(["blockdev", "--getsize64", path], capture_output=True, text=True,
                                      check=True).stdout)
            skip = size // 2 // 4096
            dd = ["dd", f"if={path}", "of=/dev/null", "bs=4096", f"skip={skip}", "count=32", "iflag=direct",
                  "status=none"]
            before = proxy.stats.bytes("/blobs/")
            subprocess.run(dd, check=True)
            assert proxy.stats.bytes("/blobs/") > before
            fetched = proxy.stats.bytes("/blobs/")
            n_entries = len(proxy.stats.entries)
            subprocess.run(dd, check=True)
            assert proxy.stats.bytes("/blobs/") == fetched, (
                proxy.stats.entries[n_entries:], tcmu_daemon.json("stats", info["id"]))

            # a file through the kernel's EROFS: read, then (page cache dropped) the same again
            small = (mnt / "app" / "small").read_bytes()
            assert small == (world.reference / "app" / "small").read_bytes()
            drop_caches()
            assert (mnt / "app" / "small").read_bytes() == small
            settle(path)
            fetched = proxy.stats.bytes("/blobs/")
            drop_caches()  # same access pattern again: served from the node cache only
            assert (mnt / "app" / "small").read_bytes() == small
            settle(path)
            assert proxy.stats.bytes("/blobs/") == fetched

            # registry failure while a file is first read: EIO for the reader, MEDIUM ERROR logged
            proxy.inject("status", status=503, count=1000, match=r"/blobs/")
            with pytest.raises(OSError) as exc:
                (mnt / "app" / "second").read_bytes()
            assert exc.value.errno == 5
            assert "Medium Error" in kernel_log()
            proxy.clear_faults()
            drop_caches()
            assert (mnt / "app" / "second").read_bytes() == (world.reference / "app" / "second").read_bytes()
            assert Path(f"/sys/block/{os.path.basename(path)}/device/state").read_text().strip() == "running"

            # the whole tree equals the layers extracted with overlay semantics
            assert_same_tree(mnt, world.reference)
            stats = tcmu_daemon.json("stats", info["id"])[0]["stats"]
            assert stats["read_errors"] >= 1
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
        tcmu_daemon.cli("detach", info["id"])
    assert configfs_residue() == []
    assert not os.path.exists(path)
