"""Kernel mounts through mount(2)/umount2(2) directly.

Why not mount(8): util-linux quietly sets up a loop device when the source is a regular file, and
a FUSE-served device file must be mounted by EROFS itself (file-backed mount, 6.12+). A loop device
over the file is only the fallback for kernels without file-backed EROFS.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bdserver.errors import KernelError

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_FORCE = 1
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _b(s: str | os.PathLike[str] | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def sys_mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    """mount(2); raises OSError with the errno."""
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount -t {fstype} {source} {target}: {os.strerror(e)}")


def sys_umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(_b(target), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount {target}: {os.strerror(e)}")


@dataclass
class MountInfo:
    mount_id: int
    major_minor: str
    root: str
    target: str
    fstype: str
    source: str
    options: str


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) + 1 and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def list_mounts(pid: int | str = "self") -> list[MountInfo]:
    """Parse /proc/<pid>/mountinfo."""
    mounts = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        mounts.append(
            MountInfo(int(f[0]), f[2], _unescape(f[3]), _unescape(f[4]), r[0], _unescape(r[1]) if len(r) > 1 else "",
                      r[2] if len(r) > 2 else "")
        )
    return mounts


def find_mounts(target: str | None = None, source: str | None = None, fstype: str | None = None) -> list[MountInfo]:
    """Mounts matching every given criterion (paths compared after realpath)."""
    t = os.path.realpath(target) if target else None
    out = []
    for m in list_mounts():
        if t is not None and m.target != t:
            continue
        if source is not None and m.source != source:
            continue
        if fstype is not None and m.fstype != fstype:
            continue
        out.append(m)
    return out


def is_mountpoint(path: str) -> bool:
    return bool(find_mounts(target=path))


def mount_erofs(source: str, target: str, *, allow_loop: bool = True, offset: int = 0, size: int = 0) -> str:
    """Mount an EROFS image read-only at ``target``; ``source`` is a block device or a regular file.

    A regular file is mounted file-backed (no loop device). ``offset``/``size`` select an image inside
    ``source`` (EROFS ``fsoffset``, 6.16+; a loop device with that offset and size otherwise).
    Returns "blockdev", "file" or "loop:/dev/loopN".
    """
    os.makedirs(target, exist_ok=True)
    st = os.stat(source)
    try:
        sys_mount(source, target, "erofs", MS_RDONLY | MS_NODEV, f"fsoffset={offset}" if offset else None)
        return "blockdev" if stat.S_ISBLK(st.st_mode) else "file"
    except OSError as exc:
        no_file = stat.S_ISREG(st.st_mode) and exc.errno == errno.ENOTBLK
        no_offset = bool(offset) and exc.errno == errno.EINVAL
        if not ((no_file or no_offset) and allow_loop):
            raise KernelError(f"cannot mount EROFS from {source} on {target}: {exc.strerror}") from exc
    # Kernel without file-backed EROFS (< 6.12) or fsoffset (< 6.16): a read-only loop device.
    window = ["--offset", str(offset), "--sizelimit", str(size)] if offset else []
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", *window, source], capture_output=True,
                          text=True, check=False)
    if loop.returncode != 0:
        raise KernelError(f"EROFS cannot mount {source} here and losetup failed: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    try:
        sys_mount(dev, target, "erofs", MS_RDONLY | MS_NODEV, None)
    except OSError as exc:
        raise KernelError(f"cannot mount EROFS from {dev} on {target}: {exc.strerror}") from exc
    finally:
        # While mounted, detaching only sets autoclear: the loop device goes with the unmount.
        subprocess.run(["losetup", "--detach", dev], check=False)
    return f"loop:{dev}"


def mount_overlay(lower: str | list[str], upper: str, work: str, target: str) -> None:
    """overlayfs with a writable upper layer over read-only lower dir(s) (leftmost = top)."""
    lowers = [lower] if isinstance(lower, str) else lower
    for d in (upper, work, target):
        os.makedirs(d, exist_ok=True)
    opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
    try:
        sys_mount("overlay", target, "overlay", 0, opts)
    except OSError as exc:
        raise KernelError(f"cannot mount overlay on {target}: {exc.strerror}") from exc


def unmount(target: str, *, retries: int = 20, delay: float = 0.1, lazy_last: bool = True) -> bool:
    """Unmount ``target`` (all stacked mounts on it), retrying while busy; lazily as the last resort.

    Returns True if something was unmounted. Missing or not-mounted targets are fine.
    """
    did = False
    for attempt in range(retries):
        if not is_mountpoint(target):
            return did
        try:
            sys_umount(target)
            did = True
            continue
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return did
            if exc.errno != errno.EBUSY:
                raise KernelError(f"cannot unmount {target}: {exc.strerror}") from exc
        time.sleep(delay)
    if lazy_last and is_mountpoint(target):
        log.warning("unmount %s: still busy, detaching lazily", target)
        while is_mountpoint(target):
            try:
                sys_umount(target, MNT_DETACH)
                did = True
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT):
                    break
                raise KernelError(f"cannot unmount {target}: {exc.strerror}") from exc
        return did
    if is_mountpoint(target):
        raise KernelError(f"cannot unmount {target}: busy")
    return did
