"""Mount a lazy rootfs INSIDE a container's mount namespace, under runc's rootfs, before pivot_root.

Run as its own (single-threaded) process by the OCI hook: setns(2) into ``/proc/PID/ns/mnt``, mount the
EROFS device file (opened before setns, so the host path need not be visible in that namespace) and an
overlay on a staging dir, move every mount runc placed under the rootfs (proc, dev, sys, binds) into it,
then move the staging overlay onto the rootfs. The mounts die with the container's namespace.
(See shared/reference/registry-runtime.md §5.4: a host-namespace mount is not seen by the container.)

The staging overlay is image content, so every path inside it is resolved inside it (inroot.py):
an image whose ``/etc`` is a symlink to ``/tmp/victim`` gets runc's ``/etc/hosts`` bind inside
the image, never a new file on the host.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

from bdserver import mounts
from bdserver.runtime import inroot

CLONE_NEWNS = 0x00020000
MS_MOVE = 8192


def setns_mnt(pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNS) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns into the mount namespace of pid {pid}: {os.strerror(e)}")
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--rootfs", required=True)
    ap.add_argument("--stage", required=True)
    ap.add_argument("--upper", required=True)
    ap.add_argument("--work", required=True)
    a = ap.parse_args(argv)
    dev_fd = os.open(a.device, os.O_RDONLY)
    setns_mnt(a.pid)
    os.chdir("/")
    rootfs = os.path.realpath(a.rootfs)
    lower, merged = os.path.join(a.stage, "lower"), os.path.join(a.stage, "merged")
    os.makedirs(lower, exist_ok=True)
    os.makedirs(merged, exist_ok=True)
    mounts.sys_mount(f"/proc/self/fd/{dev_fd}", lower, "erofs", mounts.MS_RDONLY | mounts.MS_NODEV)
    os.close(dev_fd)
    mounts.mount_overlay(lower, a.upper, a.work, merged)
    # Mounts directly under the rootfs (moving one moves its children too), shallowest first.
    subs = sorted({m.target for m in mounts.list_mounts() if m.target.startswith(rootfs + "/")}, key=len)
    top: list[str] = []
    for t in subs:
        if not any(t.startswith(p + "/") for p in top):
            top.append(t)
    with inroot.root_fd(merged) as mfd:
        for t in top:
            dest = inroot.make_in_root(mfd, os.path.relpath(t, rootfs), directory=os.path.isdir(t))
            try:
                inroot.move_mount_to_fd(t, dest)
            finally:
                os.close(dest)
    mounts.sys_mount(merged, rootfs, "", MS_MOVE)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as exc:
        print(f"bdserver nsmount: {exc}", file=sys.stderr)
        sys.exit(8)
