"""The image config (Entrypoint/Cmd, Env, User, WorkingDir) applied to an OCI process, Docker's way:
for the bundles `bdserver run` writes from runc's default spec, and for the spec podman hands the
precreate hook (podman's `--rootfs` reads no image config)."""

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


def merge_env(image_env: list[str], runtime_env: list[str]) -> list[str]:
    """The image's Env with the runtime's variables on top, except a PATH that is only the
    runtime's default (podman puts DEFAULT_PATH in every spec); PATH is never left unset."""
    merged: dict[str, str] = {}
    for entry in image_env:
        k, _, v = entry.partition("=")
        merged[k] = v
    for entry in runtime_env:
        k, _, v = entry.partition("=")
        if not (entry == DEFAULT_PATH and "PATH" in merged):
            merged[k] = v
    merged.setdefault("PATH", DEFAULT_PATH.partition("=")[2])
    return [f"{k}={v}" for k, v in merged.items()]


def apply_image_config(process: dict[str, Any], image_config: dict[str, Any], rootfs: Path) -> None:
    """Env, User (names looked up in the image's own /etc/passwd) and WorkingDir of the image on an
    OCI ``process``; a user or directory the runtime chose (not root, not ``/``) stays."""
    process["env"] = merge_env(list(image_config.get("Env") or []), list(process.get("env") or []))
    user = process.setdefault("user", {"uid": 0, "gid": 0})
    if user.get("uid", 0) == 0 and user.get("gid", 0) == 0:
        user["uid"], user["gid"] = resolve_user(rootfs, image_config.get("User", ""))
    if process.get("cwd", "/") == "/":
        process["cwd"] = image_config.get("WorkingDir") or "/"


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
    config["process"].update(terminal=False, args=args, env=[], cwd="/", user={"uid": 0, "gid": 0})
    apply_image_config(config["process"], cfg_img, rootfs)
    config["root"] = {"path": os.path.relpath(rootfs, bundle) if rootfs.is_relative_to(bundle) else str(rootfs),
                      "readonly": False}
    config["hostname"] = hostname
    if annotations:
        config.setdefault("annotations", {}).update(annotations)
    spec.write_text(json.dumps(config, indent=1))
    return config
