"""`bdserver run REF -- CMD...`: lazily mount REF, make an OCI bundle on it, run it with runc, clean up.

runc's exit status is passed through whatever the container printed: nothing the container
writes can change what bdserver does next (its stderr is its own, and is never parsed). The only
way to run without runc's namespaces is `--unsafe-chroot`, which says what it gives up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

from bdserver.daemon.client import request
from bdserver.config import Config
from bdserver.errors import BdError, KernelError
from bdserver.runtime.bundle import process_args, write_bundle


TIMED_OUT = 124  # the exit status of a container killed at the timeout (as timeout(1) has it)
UNSAFE_CHROOT_WARNING = ("bdserver run: --unsafe-chroot: running the image's command as host root in a plain "
                         "chroot: no namespaces, no cgroups, no seccomp, no capability limits")


def run_container(cfg: Config, ref: str, cmd: list[str], backend: str = "auto", *, unsafe_chroot: bool = False,
                  timeout: float | None = None, mount_options: dict[str, Any] | None = None,
                  before_umount: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run ``cmd`` (or the image's entrypoint) in a container on a lazy mount of ``ref``; its exit
    status, or 124 when ``timeout`` seconds passed and it was killed. ``mount_options`` go to the
    daemon's mount; ``before_umount(mount result)`` runs after the container, before cleanup."""
    cid = f"bdserver-{uuid.uuid4().hex[:12]}"
    bundle = Path(cfg.run_dir) / "bundles" / cid
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    mounted = False
    try:
        r = request(cfg, "mount", {"ref": ref, "target": str(rootfs), "backend": backend, **(mount_options or {})},
                    autostart=True)
        mounted = True
        image_config = r.get("image_config") or {}
        args = process_args(image_config, cmd)
        write_bundle(bundle, rootfs, args, image_config, hostname=cid[:20])
        if unsafe_chroot:
            status = _chroot(rootfs, args, image_config)
        else:
            status = _runc(cfg, bundle, cid, timeout)
        if before_umount is not None:
            before_umount(r)
        return status
    finally:
        if mounted:
            try:
                request(cfg, "umount", {"target": str(rootfs)})
            except BdError as exc:
                print(f"bdserver run: cleanup: {exc.user_message()}", file=sys.stderr)
        shutil.rmtree(bundle, ignore_errors=True)


def _runc(cfg: Config, bundle: Path, cid: str, timeout: float | None) -> int:
    runc = shutil.which("runc")
    if runc is None:
        raise KernelError("runc is not installed (apt-get install runc); bdserver run needs it")
    root = Path(cfg.run_dir) / "runc"
    base = [runc, "--root", str(root)]
    try:
        p = subprocess.Popen(base + ["run", "--bundle", str(bundle), cid],
                             stdin=sys.stdin if sys.stdin and sys.stdin.isatty() else subprocess.DEVNULL)
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            subprocess.run(base + ["kill", cid, "KILL"], capture_output=True)
            p.wait()
            return TIMED_OUT
    finally:
        subprocess.run(base + ["delete", "--force", cid], capture_output=True)


def _chroot(rootfs: Path, args: list[str], image_config: dict) -> int:
    print(UNSAFE_CHROOT_WARNING, file=sys.stderr)
    env = {}
    for e in image_config.get("Env") or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]:
        k, _, v = e.partition("=")
        env[k] = v
    cwd = image_config.get("WorkingDir") or "/"

    def enter() -> None:
        os.chroot(rootfs)
        os.chdir(cwd)

    return subprocess.run(args, env=env, preexec_fn=enter).returncode
