"""`bdserver hook [STAGE]`: the OCI runtime hook entry point.

A container carrying the annotation ``org.bdserver.image=REF`` gets its rootfs from a lazily served
device. Two ways, by runtime (hooks.d/ has one hook file for each):

* podman: ``precreate`` mounts REF (EROFS + overlay) on the host onto the ``--rootfs`` directory
  (``root.path``, which podman itself also reads: it checks the working directory there) and applies
  the image's Entrypoint/Cmd, Env, User and WorkingDir to the config it echoes (``--rootfs`` reads no
  image config). ``createRuntime`` then hands the device to the container's init; ``poststop``
  unmounts it.
* runc, CRI-O: ``createRuntime`` attaches REF and mounts it inside the container's mount namespace
  onto its rootfs (runtime/nsmount.py); ``poststop`` detaches the device and drops the upper dir.

Runtimes skip poststop when a create fails (podman runs it only for a container it created; runc
not when it rejects the spec), so every device a hook makes is owned by a process: the daemon
detaches it when that process is gone (daemon/owner.py): podman itself until the container's init
takes it over, then that init. A failed start leaves no device, mount or directory behind.

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
from pathlib import Path
from typing import Any, TextIO

from bdserver.config import Config
from bdserver.daemon.client import request
from bdserver.errors import BadReference, BadTarget, DaemonError, DaemonNotRunning, KernelError, NoSuchDevice
from bdserver.images.refs import Origin, check_reference
from bdserver.runtime.bundle import apply_image_config, process_args

ANNOTATION = "org.bdserver.image"
BACKEND_ANNOTATION = "org.bdserver.backend"
MARK = ".bdserver-hook.json"
HANDOVER_S = 600.0  # a precreate mount that no container's init took over by then is collected


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
    rootfs = _rootfs(bundle)
    try:  # podman: precreate mounted the rootfs; the container's init owns it from now on
        r = request(cfg, "own", {"key": str(rootfs), "pid": pid}, autostart=True)
        (bundle / MARK).write_text(json.dumps({"target": str(rootfs), "owner": r["owner"]}))
        return
    except NoSuchDevice:
        pass
    check_reference(ref, Origin.POD)  # refuse early; the daemon checks again
    r = request(cfg, "attach", {"ref": ref, "backend": _backend(ann), "origin": Origin.POD.value,
                                "owner_pid": pid}, autostart=True)
    cdir = Path(cfg.state_dir) / "containers" / f"hook-{_safe(state['id'])}"
    (cdir / "upper").mkdir(parents=True, exist_ok=True)
    (cdir / "work").mkdir(parents=True, exist_ok=True)
    (bundle / MARK).write_text(json.dumps({"device": r["id"], "owner": r["owner"], "dir": str(cdir)}))
    stage = bundle / ".bdserver-stage"
    p = subprocess.run(
        [sys.executable, "-m", "bdserver.runtime.nsmount", "--pid", str(pid), "--device", r["path"],
         "--rootfs", str(rootfs), "--stage", str(stage), "--upper", str(cdir / "upper"),
         "--work", str(cdir / "work")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pkg_root()},
    )
    if p.returncode != 0:
        poststop(cfg, state)
        raise KernelError(f"cannot mount {ref} as the rootfs of {state['id']}: {p.stderr.strip()}")


def poststop(cfg: Config, state: dict[str, Any]) -> None:
    """Undo what createRuntime recorded in the bundle, if the device is still this container's
    (the daemon may have collected it when the container's init died, and reused its id since)."""
    bundle = Path(state.get("bundle", ""))
    mark = bundle / MARK
    if not mark.exists():
        return
    info = json.loads(mark.read_text())
    try:
        if "target" in info:  # podman's precreate mount
            request(cfg, "umount", {"target": info["target"], "owner": info["owner"]})
        else:
            request(cfg, "detach", {"key": info["device"], "force": True, "owner": info["owner"]})
    except (NoSuchDevice, DaemonNotRunning):
        pass  # collected already, or left to the next daemon (its owner is gone by then)
    if "dir" in info:
        shutil.rmtree(info["dir"], ignore_errors=True)
    shutil.rmtree(bundle / ".bdserver-stage", ignore_errors=True)
    mark.unlink(missing_ok=True)


def precreate(cfg: Config, config: dict[str, Any], owner_pid: int) -> dict[str, Any]:
    """podman: mount onto root.path (the ``--rootfs`` directory) before `create` and apply the image config.

    ``owner_pid`` (podman) owns the mount until the container's init takes it over in
    createRuntime: if podman fails or dies before that, the daemon collects the mount.
    The command podman passes is Docker's CMD: the image's Entrypoint goes in front of it, and
    a single empty argument (``podman run ... --rootfs DIR ""``) stands for the image's own Cmd.
    root.path is podman's (whoever runs podman chose it), never the pod author's; a directory
    that is already a mount point (another running container's) is refused.
    """
    ann = config.get("annotations") or {}
    ref = ann.get(ANNOTATION)
    if not ref:
        return config
    check_reference(ref, Origin.POD)
    target = Path(config.get("root", {}).get("path", ""))
    if not target.is_absolute():
        raise BadTarget(f"root.path {str(target)!r} is not absolute: give podman --rootfs an absolute directory")
    r = request(cfg, "mount", {"ref": ref, "target": str(target), "backend": _backend(ann),
                               "origin": Origin.POD.value, "owner_pid": owner_pid, "owner_lease_s": HANDOVER_S},
                autostart=True)
    try:
        image_config = r.get("image_config") or {}
        process = config.setdefault("process", {})
        cmd = list(process.get("args") or [])
        process["args"] = process_args(image_config, [] if cmd == [""] else cmd)
        apply_image_config(process, image_config, target)
    except BaseException:
        request(cfg, "umount", {"target": str(target)})
        raise
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
        # A container state has a status; podman's precreate hands over the config instead (no status).
        status = data.get("status")
        stage = "precreate" if status is None else {"creating": "createRuntime", "stopped": "poststop"}.get(status, "")
        if not stage:
            return 0  # other stages: nothing to do
    if stage in ("createRuntime", "prestart"):
        create_runtime(cfg, data)
    elif stage == "poststop":
        poststop(cfg, data)
    elif stage == "precreate":
        json.dump(precreate(cfg, data, os.getppid()), stdout)
    else:
        raise DaemonError(f"unknown hook stage {stage}")
    return 0
