"""OCI bundles: config.json from runc's own default spec plus the image config (Env, WorkingDir,
Entrypoint/Cmd, User)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from bdserver.errors import BdError
from bdserver.runtime.inroot import read_in_root

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _image_file(rootfs: Path, rel: str) -> str:
    """A file of the image, resolved inside it (a symlink in the image never reads a host file)."""
    return read_in_root(str(rootfs), rel).decode(errors="replace")


def _lookup(rootfs: Path, file: str, name: str, field: int = 2) -> int | None:
    try:
        for line in _image_file(rootfs, f"etc/{file}").splitlines():
            parts = line.split(":")
            if parts and parts[0] == name and len(parts) > field:
                return int(parts[field])
    except (OSError, ValueError):
        return None
    return None


def resolve_user(rootfs: Path, user: str) -> tuple[int, int]:
    """OCI image `User` ("", "uid", "name", "uid:gid", "name:group") -> (uid, gid) using the image's files."""
    if not user:
        return 0, 0
    u, _, g = user.partition(":")
    uid = int(u) if u.isdigit() else _lookup(rootfs, "passwd", u)
    if uid is None:
        raise BdError(f"user {u!r} of the image is not in its /etc/passwd")
    if g:
        gid = int(g) if g.isdigit() else _lookup(rootfs, "group", g)
        if gid is None:
            raise BdError(f"group {g!r} of the image is not in its /etc/group")
    else:
        gid = 0
        try:
            for line in _image_file(rootfs, "etc/passwd").splitlines():
                p = line.split(":")
                if len(p) > 3 and p[2] == str(uid):
                    gid = int(p[3])
                    break
        except (OSError, ValueError):
            pass
    return uid, gid


def process_args(image_config: dict[str, Any], cmd: list[str]) -> list[str]:
    """Docker semantics: Entrypoint + (command line or Cmd)."""
    entry = list(image_config.get("Entrypoint") or [])
    rest = list(cmd) if cmd else list(image_config.get("Cmd") or [])
    args = entry + rest
    if not args:
        raise BdError("no command: the image has no Entrypoint/Cmd and none was given after --")
    return args


def write_bundle(bundle: Path, rootfs: Path, args: list[str], image_config: dict[str, Any] | None = None,
                 hostname: str = "bdserver", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """Create ``bundle/config.json`` (runc's default spec, edited). ``rootfs`` must exist."""
    cfg_img = image_config or {}
    bundle.mkdir(parents=True, exist_ok=True)
    spec = bundle / "config.json"
    if spec.exists():
        spec.unlink()
    p = subprocess.run(["runc", "spec", "--bundle", str(bundle)], capture_output=True, text=True)
    if p.returncode != 0:
        raise BdError(f"runc spec failed: {p.stderr.strip()}")
    config = json.loads(spec.read_text())
    env = list(cfg_img.get("Env") or [])
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    uid, gid = resolve_user(rootfs, cfg_img.get("User", ""))
    config["process"].update(
        terminal=False, args=args, env=env, cwd=cfg_img.get("WorkingDir") or "/", user={"uid": uid, "gid": gid}
    )
    config["root"] = {"path": os.path.relpath(rootfs, bundle) if rootfs.is_relative_to(bundle) else str(rootfs),
                      "readonly": False}
    config["hostname"] = hostname
    if annotations:
        config.setdefault("annotations", {}).update(annotations)
    spec.write_text(json.dumps(config, indent=1))
    return config
