"""Paths inside a container's rootfs, resolved as the container would see them, never outside it.

The rootfs is image content: any directory in it may be a symlink to ``/tmp/victim`` or
``../../etc``. Root code that creates, opens or mounts on a path inside it while its own root is
the host's must resolve every component inside the rootfs: openat2(2) with RESOLVE_IN_ROOT (the
rootfs fd acts as ``/`` for absolute symlinks and ``..``), mkdirat/openat relative to an O_PATH
parent fd (a dangling symlink is never followed to create its target), and move_mount(2) onto
the resolved fd instead of a path. Linux 5.6+ (openat2), 5.2+ (move_mount).
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat
import struct
from contextlib import contextmanager
from typing import Iterator

SYS_OPENAT2 = 437  # the same number on every architecture (added after the syscall table unification)
SYS_MOVE_MOUNT = 429
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
MOVE_MOUNT_T_EMPTY_PATH = 0x00000040
AT_FDCWD = -100
_OPEN_HOW = struct.Struct("=QQQ")  # struct open_how {u64 flags; u64 mode; u64 resolve}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = ctypes.create_string_buffer(_OPEN_HOW.pack(flags | os.O_CLOEXEC, mode, resolve), _OPEN_HOW.size)
    return _check(_libc.syscall(SYS_OPENAT2, ctypes.c_int(dirfd), os.fsencode(path), how,
                                ctypes.c_size_t(_OPEN_HOW.size)), f"openat2 {path}")


def open_in_root(root_fd: int, rel: str, flags: int = os.O_PATH) -> int:
    """``rel`` resolved inside the root fd (symlinks and ``..`` cannot leave it)."""
    return openat2(root_fd, rel.lstrip("/") or ".", flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)


MAX_LINKS = 40  # like the kernel: a chain of symlinks longer than this is a loop


def make_in_root(root_fd: int, rel: str, *, directory: bool, _links: int = 0) -> int:
    """Create ``rel`` (and missing parents) inside the root unless it exists; return an O_PATH fd.

    Each missing component is made with mkdirat/openat(O_EXCL|O_NOFOLLOW) in its parent as
    resolved inside the root, so no symlink in the image can make root create a host path. A
    dangling symlink is followed the way the container would see it: its target is created
    inside the root (``/tmp/victim`` becomes ``<root>/tmp/victim``).
    """
    parts = [p for p in posixpath.normpath("/" + rel).split("/") if p]
    for i in range(len(parts)):
        path = "/".join(parts[: i + 1])
        last = i == len(parts) - 1
        try:
            fd = open_in_root(root_fd, path)
        except FileNotFoundError:
            parent_path = "/".join(parts[:i]) or "."
            parent = open_in_root(root_fd, parent_path)
            try:
                if last and not directory:
                    os.close(os.open(parts[i], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                                     dir_fd=parent))
                else:
                    os.mkdir(parts[i], 0o755, dir_fd=parent)
                link = None
            except FileExistsError:  # a dangling symlink (or a racing creator)
                try:
                    link = os.readlink(parts[i], dir_fd=parent)
                except OSError:
                    link = None
            finally:
                os.close(parent)
            if link is not None:
                if _links >= MAX_LINKS:
                    raise OSError(errno.ELOOP, f"{rel}: too many symbolic links in the rootfs")
                base = "" if link.startswith("/") else "/".join(parts[:i])
                rest = "/".join([base, link, *parts[i + 1:]])
                return make_in_root(root_fd, rest, directory=directory, _links=_links + 1)
            fd = open_in_root(root_fd, path)
        if not last:
            mode = os.fstat(fd).st_mode
            os.close(fd)
            if not stat.S_ISDIR(mode):
                raise NotADirectoryError(errno.ENOTDIR, f"{path} is not a directory in the rootfs")
            continue
        return fd
    return open_in_root(root_fd, ".")


def move_mount_to_fd(source: str, target_fd: int) -> None:
    """Move the mount at host path ``source`` onto the object ``target_fd`` refers to."""
    _check(_libc.syscall(SYS_MOVE_MOUNT, ctypes.c_int(AT_FDCWD), os.fsencode(source), ctypes.c_int(target_fd),
                         b"", ctypes.c_uint(MOVE_MOUNT_T_EMPTY_PATH)), f"move_mount {source}")


@contextmanager
def root_fd(path: str) -> Iterator[int]:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def read_in_root(root: str, rel: str, limit: int = 1 << 20) -> bytes:
    """Read a small regular file of the image (e.g. ``etc/passwd``) resolved inside ``root``."""
    with root_fd(root) as rfd:
        fd = open_in_root(rfd, rel, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, f"{rel} is not a regular file in the rootfs")
            return os.read(fd, limit)
        finally:
            os.close(fd)
