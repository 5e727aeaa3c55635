"""`bdserver run` with the real runc, and the OCI hook driven by runc itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bdserver import mounts
from tests.node.conftest import REPO, mkfs_erofs

if shutil.which("runc") is None:  # installed by `make setup`: a missing one is a setup bug, not a skip
    pytest.fail("runc is missing: run kernel-setup/install-packages", pytrace=False)


@pytest.fixture
def busybox_image(tmp_path: Path) -> Path:
    bb = shutil.which("busybox")
    assert bb is not None, "busybox is missing: run kernel-setup/install-packages (busybox-static)"
    src = tmp_path / "bbsrc"
    (src / "bin").mkdir(parents=True)
    (src / "etc").mkdir()
    shutil.copy(bb, src / "bin" / "busybox")
    for c in ("sh", "cat", "echo", "ls", "id"):
        os.symlink("busybox", src / "bin" / c)
    (src / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    (src / "marker").write_text("from the lazy image\n")
    return mkfs_erofs(tmp_path / "bb.erofs", src)


def test_run_executes_in_the_image(daemon, busybox_image: Path) -> None:
    p = daemon.cli("run", f"file:{busybox_image}", "--", "/bin/sh", "-c",
                   "cat /marker; echo written > /new; cat /new; id -u; ls /proc/self >/dev/null && echo proc")
    assert p.stdout.split("\n")[:4] == ["from the lazy image", "written", "0", "proc"]
    assert daemon.json("ls") == []  # everything cleaned up
    assert not [m for m in mounts.list_mounts() if m.target.startswith(str(daemon.base))]
    p = daemon.cli("run", f"file:{busybox_image}", "--", "/bin/sh", "-c", "exit 3", check=False)
    assert p.returncode == 3


def test_hook_mounts_lazy_rootfs_for_runc(daemon, busybox_image: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)  # empty: the hook supplies the image
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"].update(terminal=False, args=["/bin/sh", "-c", "cat /marker; echo w > /w; cat /w; ls /dev/null"])
    cfg["root"]["readonly"] = False
    cfg["annotations"] = {"org.bdserver.image": f"file:{busybox_image}"}
    env = [f"BDSERVER_CONFIG={daemon.env['BDSERVER_CONFIG']}", f"PYTHONPATH={REPO}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    hook = {"path": sys.executable, "args": [sys.executable, "-m", "bdserver.cli", "hook"], "env": env, "timeout": 120}
    cfg["hooks"] = {"createRuntime": [hook], "poststop": [hook]}
    (bundle / "config.json").write_text(json.dumps(cfg))
    root = tmp_path / "runc-root"
    p = subprocess.run(["runc", "--root", str(root), "run", "--bundle", str(bundle), f"hk-{os.getpid()}"],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:3] == ["from the lazy image", "w", "/dev/null"]
    assert daemon.json("ls") == []  # poststop detached the device
    assert not (bundle / ".bdserver-hook.json").exists()
    assert list((bundle / "rootfs").iterdir()) == [] or all(c.is_dir() for c in (bundle / "rootfs").iterdir())


def test_podman_precreate_rewrites_root_and_poststop_cleans(daemon, busybox_image: Path, tmp_path: Path) -> None:
    config = {"ociVersion": "1.0.2", "root": {"path": str(tmp_path / "orig")}, "process": {"args": ["/bin/sh"]},
              "annotations": {"org.bdserver.image": f"file:{busybox_image}"}}
    p = daemon.cli("hook", "precreate", input=json.dumps(config))
    out = json.loads(p.stdout)
    root = Path(out["root"]["path"])
    assert root != tmp_path / "orig" and (root / "marker").read_text() == "from the lazy image\n"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(out))
    state = {"ociVersion": "1.0.2", "id": "c1", "status": "stopped", "bundle": str(bundle),
             "annotations": config["annotations"]}
    daemon.cli("hook", input=json.dumps(state))  # stage inferred: poststop
    assert not mounts.find_mounts(target=str(root)) and daemon.json("ls") == []
    # a container without the annotation passes through untouched
    plain = {"root": {"path": "rootfs"}}
    assert json.loads(daemon.cli("hook", "precreate", input=json.dumps(plain)).stdout) == plain
