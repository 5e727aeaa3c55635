"""`bdserver run REF -- CMD...`: lazily mount REF, make an OCI bundle on it, run it with runc, clean up.

runc needs cgroups; if it fails for want of them, run falls back to a plain chroot and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from bdserver.daemon.client import request
from bdserver.daemon.config import Config
from bdserver.errors import BdError
from bdserver.runtime.bundle import process_args, write_bundle


def run_container(cfg: Config, ref: str, cmd: list[str], backend: str = "auto") -> int:
    cid = f"bdserver-{uuid.uuid4().hex[:12]}"
    bundle = Path(cfg.run_dir) / "bundles" / cid
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    mounted = False
    try:
        r = request(cfg, "mount", {"ref": ref, "target": str(rootfs), "backend": backend}, autostart=True)
        mounted = True
        image_config = r.get("image_config") or {}
        args = process_args(image_config, cmd)
        write_bundle(bundle, rootfs, args, image_config, hostname=cid[:20])
        runc = shutil.which("runc")
        if runc is None or os.environ.get("BDSERVER_RUNTIME") == "chroot":
            return _chroot(rootfs, args, image_config, "runc is not installed" if runc is None else "requested")
        root = Path(cfg.run_dir) / "runc"
        p = subprocess.run([runc, "--root", str(root), "run", "--bundle", str(bundle), cid],
                           stdin=sys.stdin if sys.stdin and sys.stdin.isatty() else subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        if p.returncode != 0 and "cgroup" in (p.stderr or "") and "container_linux.go" in p.stderr:
            sys.stderr.write(p.stderr)
            return _chroot(rootfs, args, image_config, "runc could not set up cgroups on this host")
        if p.stderr:
            sys.stderr.write(p.stderr)
        subprocess.run([runc, "--root", str(root), "delete", "--force", cid], capture_output=True)
        return p.returncode
    finally:
        if mounted:
            try:
                request(cfg, "umount", {"target": str(rootfs)})
            except BdError as exc:
                print(f"bdserver run: cleanup: {exc.user_message()}", file=sys.stderr)
        shutil.rmtree(bundle, ignore_errors=True)


def _chroot(rootfs: Path, args: list[str], image_config: dict, why: str) -> int:
    print(f"bdserver run: {why}; running in a plain chroot (no namespaces, no cgroups)", file=sys.stderr)
    env = {}
    for e in image_config.get("Env") or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]:
        k, _, v = e.partition("=")
        env[k] = v
    cwd = image_config.get("WorkingDir") or "/"

    def enter() -> None:
        os.chroot(rootfs)
        os.chdir(cwd)

    return subprocess.run(args, env=env, preexec_fn=enter).returncode
