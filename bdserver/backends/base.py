"""The backend interface: turn one `VirtualDevice` into something the kernel can mount.

A backend knows nothing but ``device.size`` and ``device.read(offset, length)``. Errors from the
read path are mapped to kernel errors in ONE place (`read_errno`, `checked_read`) so that every
backend answers the same way: a fetch that failed after retries or bytes that failed verification
become EIO (TCMU turns EIO into SCSI MEDIUM ERROR); writes are refused (read-only device).

Backends are found by name: module ``bdserver.backends.<name>`` defines one subclass of `Backend`
whose ``name`` is ``<name>``. `pick_backend("auto")` tries ublk, then tcmu, then fuse.
"""

from __future__ import annotations

import errno
import importlib
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from bdserver.errors import BdError, FetchError, IntegrityError, KernelError

log = logging.getLogger(__name__)

AUTO_ORDER = ("ublk", "tcmu", "fuse")
BACKEND_NAMES = AUTO_ORDER


@runtime_checkable
class Device(Protocol):
    """What a backend needs from a device (vdev.VirtualDevice satisfies it)."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


@dataclass
class Attached:
    """A device the kernel can see: ``path`` is a block device node or (fuse) a regular file."""

    path: str
    backend: str
    dev_id: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Backend(ABC):
    """One kernel interface. Instances may serve many devices at once."""

    name: str = ""

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """(usable on this kernel/host?, a reason a user can act on when not)."""

    @abstractmethod
    def attach(self, device: Device, dev_id: str) -> Attached:
        """Expose ``device`` to the kernel; return where it is. Raises KernelError."""

    @abstractmethod
    def detach(self, attached: Attached) -> None:
        """Remove the device; idempotent; nothing of it is left in the kernel afterwards."""

    def discard(self, dev_id: str) -> None:
        """Remove what the kernel still holds of ``dev_id`` that this process does not serve (a
        restarted daemon that cannot reopen the device's source): its queued and future I/O fails
        with EIO instead of waiting for a server that will never come, and the device goes.
        Idempotent; nothing of ``dev_id`` is left afterwards."""

    def configure(self, **options: Any) -> None:
        """Daemon-wide settings (``run_dir`` for scratch mounts, ``fd_keeper`` for fds that must outlive
        the daemon); unknown keys are ignored."""

    def adoptable(self, dev_id: str) -> bool:
        """Whether `attach` of ``dev_id`` will take over a device the previous daemon left in the kernel
        (so the mounts on it stay valid and must not be redone)."""
        return False

    def end_recovery(self, dev_ids: set[str]) -> None:
        """After a restart's recovery: remove what a previous daemon left that no device in
        ``dev_ids`` claimed."""

    def close(self) -> None:
        """Release backend-wide resources; devices stop being served (the daemon is exiting)."""


def read_errno(exc: BaseException) -> int:
    """The errno a kernel request gets for a failed device read (the single mapping)."""
    if isinstance(exc, (FetchError, IntegrityError)):
        return errno.EIO
    if isinstance(exc, BdError):
        return errno.EIO
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def checked_read(device: Device, offset: int, length: int) -> bytes:
    """Read with end-of-device clamping; failures become ``OSError(EIO)`` (logged, never raised raw).

    Reads past the end are short (file semantics); a read starting at or beyond the end returns b"".
    """
    size = device.size
    if offset < 0 or length < 0:
        raise OSError(errno.EINVAL, "negative offset or length")
    if offset >= size or length == 0:
        return b""
    length = min(length, size - offset)
    try:
        data = device.read(offset, length)
    except Exception as exc:  # noqa: BLE001 - every failure must become an errno, once
        code = read_errno(exc)
        log.warning("device read failed offset=%d length=%d errno=%d: %s", offset, length, code, exc)
        raise OSError(code, f"device read failed: {exc}") from exc
    if len(data) != length:
        log.warning("device returned %d bytes for a %d-byte read at %d", len(data), length, offset)
        raise OSError(errno.EIO, "short device read")
    return data


class UnavailableBackend(Backend):
    """Placeholder for a backend that is not implemented (yet) in this build."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self._reason = reason

    def available(self) -> tuple[bool, str]:
        return False, self._reason

    def attach(self, device: Device, dev_id: str) -> Attached:
        raise KernelError(f"backend {self.name} is not available: {self._reason}")

    def detach(self, attached: Attached) -> None:
        return None


_instances: dict[str, Backend] = {}
_instances_lock = threading.Lock()


def get_backend(name: str) -> Backend:
    """The (process-wide, cached) instance of backend ``name``; an UnavailableBackend if absent."""
    if name not in BACKEND_NAMES:
        raise BdError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKEND_NAMES)}")
    with _instances_lock:  # one instance per process: backends hold process-wide kernel sessions
        return _instances.get(name) or _load(name)


def _load(name: str) -> Backend:
    try:
        mod = importlib.import_module(f"bdserver.backends.{name}")
    except ImportError as exc:
        backend: Backend = UnavailableBackend(name, f"not implemented in this build ({exc})")
    else:
        cls = next(
            (
                obj
                for obj in vars(mod).values()
                if isinstance(obj, type) and issubclass(obj, Backend) and obj is not Backend
                and getattr(obj, "name", "") == name
            ),
            None,
        )
        backend = cls() if cls is not None else UnavailableBackend(name, "module defines no backend")
    _instances[name] = backend
    return backend


def pick_backend(name: str = "auto") -> Backend:
    """Resolve ``auto|ublk|tcmu|fuse`` to a usable backend or raise KernelError saying why not."""
    if name != "auto":
        backend = get_backend(name)
        ok, reason = backend.available()
        if not ok:
            raise KernelError(f"backend {name} is not available here: {reason}")
        return backend
    reasons = []
    for candidate in AUTO_ORDER:
        backend = get_backend(candidate)
        ok, reason = backend.available()
        if ok:
            return backend
        reasons.append(f"{candidate}: {reason}")
    raise KernelError("no backend is available (" + "; ".join(reasons) + ")")


def describe_backends() -> dict[str, dict[str, Any]]:
    """{name: {available, reason}} for `kernel-setup/check` and `bdserver ls`."""
    out = {}
    for name in BACKEND_NAMES:
        ok, reason = get_backend(name).available()
        out[name] = {"available": ok, "reason": reason}
    return out
