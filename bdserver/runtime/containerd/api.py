"""containerd's gRPC API for Python, generated from the protos Debian ships (never copied by hand).

`make setup` runs ``python -m bdserver.runtime.containerd.api`` once; the first import also
generates the code if it is missing. Sources: ``golang-github-containerd-containerd-dev``
(``/usr/share/gocode/src/github.com/containerd/containerd/api``) and gogoproto from its
dependencies. Output: ``_gen/`` beside this file (git-ignored), put on sys.path when first used:
protoc names the modules after the proto paths (``github.com.containerd...``, laid out as
``github/com/...``), which import as namespace packages.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

from bdserver.errors import ConfigError

GOCODE = Path(os.environ.get("BDSERVER_GOCODE", "/usr/share/gocode/src"))
API = "github.com/containerd/containerd/api"
GOGO_ROOT = "github.com/gogo/protobuf"  # holds gogoproto/gogo.proto
PROTOS = (
    f"{API}/types/mount.proto",
    f"{API}/types/descriptor.proto",
    f"{API}/services/snapshots/v1/snapshots.proto",
    f"{API}/services/content/v1/content.proto",
    f"{API}/services/images/v1/images.proto",
    f"{API}/services/leases/v1/leases.proto",
    f"{API}/services/diff/v1/diff.proto",
    "gogoproto/gogo.proto",
)
GEN = Path(__file__).with_name("_gen")
_STAMP = GEN / ".complete"


def _stamp_text() -> str:
    """Generated code is tied to the grpcio-tools that wrote it (it checks the runtime's version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"grpcio-tools {version('grpcio-tools')}; {' '.join(PROTOS)}\n"
    except PackageNotFoundError:
        return "grpcio-tools missing\n"


def _current(out: Path) -> bool:
    try:
        return (out / _STAMP.name).read_text() == _stamp_text()
    except OSError:
        return False


def generate(out: Path = GEN) -> Path:
    """Run grpc_tools.protoc over PROTOS into ``out`` (atomically: a half-written tree never wins)."""
    try:
        from grpc_tools import protoc
        import grpc_tools
    except ImportError as exc:
        raise ConfigError("grpcio-tools is not installed: run `make setup` (it installs bdserver's extras)") from exc
    if not (GOCODE / API).is_dir():
        raise ConfigError(f"containerd's protos are missing under {GOCODE / API}: "
                          "apt-get install golang-github-containerd-containerd-dev (kernel-setup/install-packages)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "._gen.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _current(out):
            return out
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = ["protoc", f"-I{GOCODE}", f"-I{GOCODE / GOGO_ROOT}", f"-I{well_known}",
                f"--python_out={tmp}", f"--grpc_python_out={tmp}", *PROTOS]
        if protoc.main(args) != 0:
            raise ConfigError(f"protoc failed on containerd's protos ({' '.join(args[1:4])})")
        (tmp / _STAMP.name).write_text(_stamp_text())
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def _load(name: str) -> ModuleType:
    if not _current(GEN):
        generate()
    if str(GEN) not in sys.path:
        sys.path.append(str(GEN))
    return importlib.import_module(name)


_SVC = "github.com.containerd.containerd.api.services"
mount_pb2 = _load("github.com.containerd.containerd.api.types.mount_pb2")
descriptor_pb2 = _load("github.com.containerd.containerd.api.types.descriptor_pb2")
snapshots_pb2 = _load(f"{_SVC}.snapshots.v1.snapshots_pb2")
snapshots_grpc = _load(f"{_SVC}.snapshots.v1.snapshots_pb2_grpc")
content_pb2 = _load(f"{_SVC}.content.v1.content_pb2")
content_grpc = _load(f"{_SVC}.content.v1.content_pb2_grpc")
images_pb2 = _load(f"{_SVC}.images.v1.images_pb2")
images_grpc = _load(f"{_SVC}.images.v1.images_pb2_grpc")
leases_pb2 = _load(f"{_SVC}.leases.v1.leases_pb2")
leases_grpc = _load(f"{_SVC}.leases.v1.leases_pb2_grpc")
diff_pb2 = _load(f"{_SVC}.diff.v1.diff_pb2")
diff_grpc = _load(f"{_SVC}.diff.v1.diff_pb2_grpc")

if __name__ == "__main__":
    print(generate())
