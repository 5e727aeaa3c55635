"""An independent reference for image trees: GNU tar extracts each layer with OCI whiteout semantics
(``.wh.NAME`` deletes NAME from lower layers, ``.wh..wh..opq`` empties a directory), and a tree
comparison that covers types, modes, owners, sizes, contents, symlink targets, device numbers."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path


def _members(layer: Path) -> list[str]:
    p = subprocess.run(["tar", "-tf", str(layer)], capture_output=True, text=True, check=True)
    return [m[2:] if m.startswith("./") else m for m in p.stdout.splitlines()]


def extract_layers(layers: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        for m in _members(layer):
            m = m.rstrip("/")
            d, name = os.path.split(m)
            if name == ".wh..wh..opq":
                target = dest / d
                if target.is_dir():
                    for child in target.iterdir():
                        if child.is_dir() and not child.is_symlink():
                            shutil.rmtree(child)
                        else:
                            child.unlink()
            elif name.startswith(".wh."):
                target = dest / d / name[4:]
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        subprocess.run(["tar", "--numeric-owner", "-xpf", str(layer), "-C", str(dest), "--exclude=.wh.*",
                        "--xattrs", "--xattrs-include=*"], check=True)
    return dest


def snapshot(root: Path, *, contents: bool = True) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            base = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = base + (os.readlink(p),)
            elif stat.S_ISREG(st.st_mode):
                if contents:
                    with open(p, "rb") as f:
                        body = __import__("hashlib").sha256(f.read()).hexdigest()
                else:
                    body = ""
                out[rel] = base + (st.st_size, body, int(st.st_mtime))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                out[rel] = base + (st.st_rdev,)
            else:
                out[rel] = base
    return out


def assert_same_tree(expected: Path, actual: Path) -> int:
    """Compare; returns the number of entries. Fails listing the first differences."""
    a, b = snapshot(expected), snapshot(actual)
    missing = sorted(set(a) - set(b))[:10]
    extra = sorted(set(b) - set(a))[:10]
    diff = [k for k in sorted(set(a) & set(b)) if a[k] != b[k]][:10]
    assert not missing and not extra and not diff, (
        f"missing {missing}, extra {extra}, different " + "; ".join(f"{k}: {a[k]} != {b[k]}" for k in diff)
    )
    return len(a)
