"""Our layer images as overlayfs lower layers (what containerd's EROFS snapshotter does):
whiteouts (char 0:0) and opaque directories written by us must be honoured by overlayfs."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Iterator

from bdserver.erofs.tree import OVERLAY_OPAQUE, OVERLAY_ORIGIN, Inode, whiteout
from bdserver.erofs.writer import write_image
from tests.erofs.helpers import Spool, mounted, reg

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@contextlib.contextmanager
def overlay(lowers: list[Path], target: Path) -> Iterator[Path]:
    target.mkdir()
    opts = "lowerdir=" + ":".join(str(p) for p in lowers)
    if _libc.mount(b"overlay", os.fsencode(str(target)), b"overlay", 1, opts.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"overlay mount: {os.strerror(e)}")
    try:
        yield target
    finally:
        if _libc.umount2(os.fsencode(str(target)), 0) != 0:
            _libc.umount2(os.fsencode(str(target)), 2)


def test_whiteouts_and_opaque_dirs_in_overlay(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    lower = Inode.directory()
    lower.children.update({  # type: ignore[union-attr]
        b"a": Inode.directory(), b"b": Inode.directory(), b"keep": reg(spool.dense(b"keep\n")),
    })  # fmt: skip
    lower.children[b"a"].children.update({b"x": reg(spool.dense(b"x")), b"y": reg(spool.dense(b"y"))})  # type: ignore
    lower.children[b"b"].children.update({b"old": reg(spool.dense(b"old"))})  # type: ignore
    upper = Inode.directory()
    a2 = Inode.directory(xattrs={OVERLAY_ORIGIN: b""})
    a2.children[b"x"] = whiteout()  # type: ignore[index]
    b2 = Inode.directory(xattrs={OVERLAY_OPAQUE: b"y"})
    b2.children[b"new"] = reg(spool.dense(b"new"))  # type: ignore[index]
    upper.children.update({b"a": a2, b"b": b2, b"gone": whiteout()})  # type: ignore[union-attr]
    lower.children[b"gone"] = reg(spool.dense(b"gone"))  # type: ignore[index]
    imgs = []
    for name, tree in (("lower", lower), ("upper", upper)):
        p = tmp_path / f"{name}.erofs"
        with open(p, "wb") as out:
            write_image(tree, out)
        imgs.append(p)
    with mounted(imgs[0], tmp_path / "m-lower") as ml, mounted(imgs[1], tmp_path / "m-upper") as mu:
        with overlay([mu, ml], tmp_path / "ovl") as o:
            assert sorted(os.listdir(o)) == ["a", "b", "keep"]
            assert sorted(os.listdir(o / "a")) == ["y"]
            assert sorted(os.listdir(o / "b")) == ["new"]
            assert (o / "b" / "new").read_bytes() == b"new"
            assert (o / "keep").read_bytes() == b"keep\n"
    spool.close()
