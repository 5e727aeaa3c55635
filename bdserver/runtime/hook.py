"""`bdserver hook STAGE`: the OCI runtime hook entry point.

A container carrying the annotation ``org.bdserver.image=REF`` gets its rootfs from a lazily served
device: ``createRuntime`` (or deprecated ``prestart``) attaches REF through the daemon and mounts EROFS +
overlay inside the container's mount namespace onto its rootfs (runtime/nsmount.py); ``poststop``
detaches the device and drops the upper dir. ``precreate`` (podman) instead mounts on the host and
rewrites ``root.path`` in the config it echoes. Containers without the annotation pass untouched.

The annotation is written by a pod author, not the node admin: it is sent to the daemon with
origin "pod", so it may only name a registry image (never ``file:`` or ``oci:`` paths on the
node) and a pinned digest does not make a lazy image trusted (images/refs.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from bdserver.daemon.client import request
from bdserver.config import Config
from bdserver.errors import BadReference, BdError, DaemonError, KernelError
from bdserver.images.refs import Origin, check_reference

ANNOTATION = "org.bdserver.image"
BACKEND_ANNOTATION = "org.bdserver.backend"
MARK = ".bdserver-hook.json"


def _rootfs(bundle: Path) -> Path:
    cfg = json.loads((bundle / "config.json").read_text())
    root = Path(cfg.get("root", {}).get("path", "rootfs"))
    return root if root.is_absolute() else bundle / root


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:128]


def create_runtime(cfg: Config, state: dict[str, Any]) -> None:
    ann = state.get("annotations") or {}
    ref = ann.get(ANNOTATION)
    if not ref:
        return
    bundle = Path(state["bundle"])
    pid = int(state["pid"])
    check_reference(ref, Origin.POD)  # refuse early, before the daemon starts; it checks again
    r = request(cfg, "attach", {"ref": ref, "backend": _backend(ann), "origin": Origin.POD.value}, autostart=True)
    cdir = Path(cfg.state_dir) / "containers" / f"hook-{_safe(state['id'])}"
    (cdir / "upper").mkdir(parents=True, exist_ok=True)
    (cdir / "work").mkdir(parents=True, exist_ok=True)
    (bundle / MARK).write_text(json.dumps({"device": r["id"], "dir": str(cdir)}))
    stage = bundle / ".bdserver-stage"
    p = subprocess.run(
        [sys.executable, "-m", "bdserver.runtime.nsmount", "--pid", str(pid), "--device", r["path"],
         "--rootfs", str(_rootfs(bundle)), "--stage", str(stage), "--upper", str(cdir / "upper"),
         "--work", str(cdir / "work")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pkg_root()},
    )
    if p.returncode != 0:
        poststop(cfg, state)
        raise KernelError(f"cannot mount {ref} as the rootfs of {state['id']}: {p.stderr.strip()}")


def poststop(cfg: Config, state: dict[str, Any]) -> None:
    bundle = Path(state.get("bundle", ""))
    mark = bundle / MARK
    if not mark.exists():
        return
    info = json.loads(mark.read_text())
    try:
        request(cfg, "detach", {"key": info["device"], "force": True})
    except BdError as exc:
        if "no device" not in str(exc):
            raise
    shutil.rmtree(info["dir"], ignore_errors=True)
    shutil.rmtree(bundle / ".bdserver-stage", ignore_errors=True)
    mark.unlink(missing_ok=True)


def precreate(cfg: Config, config: dict[str, Any]) -> dict[str, Any]:
    """podman: mount on the host before `create` and point root.path at it."""
    ref = (config.get("annotations") or {}).get(ANNOTATION)
    if not ref:
        return config
    check_reference(ref, Origin.POD)
    base = Path(cfg.run_dir) / "precreate"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="r", dir=base)) / "rootfs"  # atomic: never shared by two starts
    request(cfg, "mount", {"ref": ref, "target": str(target), "backend": _backend(config.get("annotations") or {}),
                           "origin": Origin.POD.value}, autostart=True)
    config.setdefault("root", {})["path"] = str(target)
    return config


def _backend(annotations: dict[str, Any]) -> str:
    name = annotations.get(BACKEND_ANNOTATION, "")
    if name not in ("", "auto", "ublk", "tcmu", "fuse"):
        raise BadReference(f"{BACKEND_ANNOTATION}={name!r}: choose auto, ublk, tcmu or fuse")
    return name


def _pkg_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def hook_main(cfg: Config, stage: str, stdin: TextIO, stdout: TextIO) -> int:
    data = json.loads(stdin.read() or "{}")
    if stage == "auto":
        stage = {"creating": "createRuntime", "stopped": "poststop"}.get(data.get("status", ""), "")
        if not stage:
            return 0  # other stages: nothing to do
    if stage in ("createRuntime", "prestart"):
        create_runtime(cfg, data)
    elif stage == "poststop":
        poststop(cfg, data)
        # a precreate mount is recorded by the daemon under root.path
        try:
            root = _rootfs(Path(data["bundle"])) if data.get("bundle") else None
        except (OSError, ValueError):
            root = None
        base = Path(cfg.run_dir) / "precreate"
        if root is not None and root.parent.parent == base:
            try:
                request(cfg, "umount", {"target": str(root)})
            except BdError:
                pass
            for d in (root, root.parent):
                try:
                    d.rmdir()
                except OSError:
                    pass
    elif stage == "precreate":
        json.dump(precreate(cfg, data), stdout)
    else:
        raise DaemonError(f"unknown hook stage {stage}")
    return 0
