"""On-node conversion of untrusted layers in a child process under OS limits (issue 8.6).

`ConvertLimits` refuse what a layer's headers announce; what they cannot foresee (a layer that is
simply too big for this node, a decompressor or parser path that is slower or hungrier than
expected) is stopped by the kernel: the child runs with RLIMIT_AS (memory), RLIMIT_FSIZE (the
largest file it may write) and RLIMIT_CPU, so a conversion that blows up fails that one attach
with a `ResourceLimitError` saying which limit stopped it, and the daemon lives on. The child is
a fresh interpreter (``python -m bdserver.convert.isolated``, never a fork of the threaded
daemon) that downloads and converts the layers itself: the parent never holds tar data. Request
and result cross stdin/stdout as JSON.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdserver.convert.image import LocalDevice
from bdserver.convert.limits import DEFAULT_LIMITS, ConvertLimits
from bdserver.convert.merge import MergedMeta
from bdserver.erofs.layout import LayoutLimits
from bdserver.erofs.structs import DeviceSlot
from bdserver.errors import BdError, ResourceLimitError, from_wire


@dataclass(frozen=True)
class ChildLimits:
    """OS limits of the converting child. `memory_bytes` is address space (RLIMIT_AS), not RSS."""

    memory_bytes: int = 4 << 30
    file_bytes: int = 64 << 30  # the largest file the child may write (spool, layer image)
    cpu_seconds: int = 3600
    wall_seconds: float = 7200.0  # the parent kills the child after this long


def _describe(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def convert_isolated(store_ref: str, ref: str, workdir: str | os.PathLike[str], *,
                     registry_kw: dict[str, Any] | None = None, limits: ChildLimits = ChildLimits(),
                     convert_limits: ConvertLimits = DEFAULT_LIMITS) -> LocalDevice:
    """`convert_layers_to_device(open_store(store_ref), ref, workdir)` in a child under `limits`.

    `store_ref` names the repository or OCI layout (``str(Reference.store_ref())``), `ref` the
    image in it (tag or digest), `registry_kw` the RegistryClient options (JSON-serialisable:
    ``hosts_dirs``, ``docker_config``). Raises the child's own BdError (FormatError, ...) as is,
    ResourceLimitError when a limit stopped it, BdError if it died otherwise."""
    request = {
        "store_ref": store_ref, "ref": ref, "workdir": os.fspath(workdir), "registry_kw": registry_kw or {},
        "limits": dataclasses.asdict(limits), "convert_limits": dataclasses.asdict(convert_limits),
    }
    what = f"on-node conversion of {store_ref} {ref}"
    proc = subprocess.Popen([sys.executable, "-m", "bdserver.convert.isolated"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True)
    try:
        out, err = proc.communicate(json.dumps(request).encode(), timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise ResourceLimitError(f"{what} ran longer than {limits.wall_seconds:g} s (wall-clock limit)") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == -signal.SIGXCPU:
        raise ResourceLimitError(f"{what} exceeded its CPU limit (RLIMIT_CPU {limits.cpu_seconds} s)")
    if proc.returncode == -signal.SIGKILL:
        raise ResourceLimitError(f"{what} was killed (SIGKILL: the CPU hard limit or the kernel's OOM killer)")
    try:
        reply = json.loads(out)
    except ValueError:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise BdError(f"{what} failed: {tail[0]}") from None
    if "limit" in reply:
        which = {"memory": f"memory limit (RLIMIT_AS {_describe(limits.memory_bytes)})",
                 "file size": f"file-size limit (RLIMIT_FSIZE {_describe(limits.file_bytes)})"}[reply["limit"]]
        raise ResourceLimitError(f"{what} exceeded its {which}")
    if "error" in reply:
        raise from_wire(reply["error"])
    return _device_from_json(reply["device"])


def _device_to_json(dev: LocalDevice) -> dict[str, Any]:
    m = dev.meta
    return {
        "meta_path": str(dev.meta_path), "layer_paths": [str(p) for p in dev.layer_paths],
        "meta": {"blocks": m.blocks, "size": m.size, "inodes": m.inodes, "device_blocks": m.device_blocks,
                 "devices": [[d.tag.hex(), d.blocks, d.mapped_blkaddr] for d in m.devices]},
        "diff_ids": dev.diff_ids, "layer_digests": dev.layer_digests,
    }


def _device_from_json(d: dict[str, Any]) -> LocalDevice:
    m = d["meta"]
    meta = MergedMeta(blocks=m["blocks"], size=m["size"], inodes=m["inodes"], device_blocks=m["device_blocks"],
                      devices=[DeviceSlot(bytes.fromhex(t), b, a) for t, b, a in m["devices"]])
    return LocalDevice(meta_path=Path(d["meta_path"]), layer_paths=[Path(p) for p in d["layer_paths"]], meta=meta,
                       diff_ids=list(d["diff_ids"]), layer_digests=list(d["layer_digests"]))


def _child(request: dict[str, Any]) -> dict[str, Any]:
    """The child's side: limits first, then the conversion; the outcome as a JSON-able dict."""
    lim = ChildLimits(**request["limits"])
    resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim.file_bytes, lim.file_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_seconds, lim.cpu_seconds + 5))  # SIGXCPU, then SIGKILL
    try:
        from bdserver.convert.image import convert_layers_to_device
        from bdserver.oci.store import open_store

        cl = dict(request["convert_limits"])
        cl["layout"] = LayoutLimits(**cl["layout"])
        store = open_store(request["store_ref"], create=False, shared=False, **request["registry_kw"])
        dev = convert_layers_to_device(store, request["ref"], request["workdir"], limits=ConvertLimits(**cl))
        return {"device": _device_to_json(dev)}
    except BdError as e:
        return {"error": e.to_wire()}
    except MemoryError:
        return {"limit": "memory"}
    except OSError as e:
        if e.errno == errno.EFBIG:  # Python ignores SIGXFSZ: the write fails instead
            return {"limit": "file size"}
        raise


def main() -> None:
    reply = _child(json.loads(sys.stdin.buffer.read()))
    sys.stdout.write(json.dumps(reply))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
