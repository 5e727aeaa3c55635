"""OCI bundle config from an image config: Docker's Entrypoint/Cmd rules and User resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bdserver.errors import BdError
from bdserver.runtime.bundle import process_args, resolve_user, write_bundle


def test_process_args_follow_docker_rules() -> None:
    assert process_args({"Cmd": ["sh"]}, []) == ["sh"]
    assert process_args({"Cmd": ["sh"]}, ["ls", "-l"]) == ["ls", "-l"]
    assert process_args({"Entrypoint": ["/init"], "Cmd": ["--x"]}, []) == ["/init", "--x"]
    assert process_args({"Entrypoint": ["/init"], "Cmd": ["--x"]}, ["--y"]) == ["/init", "--y"]
    with pytest.raises(BdError):
        process_args({}, [])


def test_resolve_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    assert resolve_user(tmp_path, "") == (0, 0)
    assert resolve_user(tmp_path, "app") == (1000, 1001)
    assert resolve_user(tmp_path, "1000") == (1000, 1001)
    assert resolve_user(tmp_path, "app:staff") == (1000, 50)
    assert resolve_user(tmp_path, "5:6") == (5, 6)
    with pytest.raises(BdError):
        resolve_user(tmp_path, "ghost")


def test_write_bundle_uses_image_config(tmp_path: Path) -> None:
    rootfs = tmp_path / "b" / "rootfs"
    rootfs.mkdir(parents=True)
    cfg = write_bundle(tmp_path / "b", rootfs, ["/bin/app"], {"Env": ["A=1"], "WorkingDir": "/srv", "User": "7:8"})
    on_disk = json.loads((tmp_path / "b" / "config.json").read_text())
    assert on_disk == cfg
    p = cfg["process"]
    assert p["args"] == ["/bin/app"] and p["cwd"] == "/srv" and p["user"] == {"uid": 7, "gid": 8}
    assert "A=1" in p["env"] and any(e.startswith("PATH=") for e in p["env"]) and p["terminal"] is False
    assert cfg["root"] == {"path": "rootfs", "readonly": False}
