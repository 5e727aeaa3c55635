"""Every error bdserver raises on purpose, in one catalogue.

Each class knows the exit code the CLI returns for it and the one-line hint a user needs; the
kernel-facing backends map them once (EIO, SCSI sense) in backends/base.py. Classes register by
name when defined, so an error raised in the daemon crosses the control socket as its name and is
rebuilt as the same class in the client (`from_wire`): ``except NoSuchDevice`` works on both sides.

Exit codes (the README's table is generated from `EXIT_CODES`; keep them distinct):
"""

from __future__ import annotations

from typing import Any, ClassVar

_REGISTRY: dict[str, type["BdError"]] = {}


class BdError(Exception):
    """Base of every error bdserver raises on purpose."""

    exit_code: ClassVar[int] = 1
    hint: str = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__name__ in _REGISTRY:
            raise TypeError(f"error class {cls.__name__} is defined twice")
        _REGISTRY[cls.__name__] = cls

    def user_message(self) -> str:
        msg = str(self) or self.__class__.__name__
        return f"{msg} ({self.hint})" if self.hint else msg

    def to_wire(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "message": str(self), "hint": self.hint, "exit_code": self.exit_code}


_REGISTRY["BdError"] = BdError


def from_wire(err: dict[str, Any]) -> BdError:
    """Rebuild an error sent by `BdError.to_wire` (unknown names become a DaemonError)."""
    cls = _REGISTRY.get(str(err.get("type", "")), None) or DaemonError
    exc = cls.__new__(cls)
    BdError.__init__(exc, str(err.get("message") or cls.__name__))
    hint = err.get("hint")
    if isinstance(hint, str) and hint != cls.hint:
        exc.hint = hint
    return exc


def error_class(name: str) -> type[BdError] | None:
    return _REGISTRY.get(name)


class UsageError(BdError):
    """The command line or a reference in it is malformed (argparse uses the same code)."""

    exit_code = 2
    hint = "write HOST[:PORT]/REPO[:TAG|@DIGEST], oci:PATH[:TAG] or file:PATH; see `bdserver --help`"


class BadReference(UsageError):
    pass


class FormatError(BdError):
    """Input bytes do not follow their format (tar, EROFS, manifest, chunk index)."""

    exit_code = 3
    hint = "the input is corrupt or hostile; nothing was written"


class IntegrityError(BdError):
    """Bytes did not match the digest that the chain of trust says they must have."""

    exit_code = 4
    hint = "the data was altered in transit or in the registry; it was not used"


class RegistryError(BdError):
    """A registry answered with an error, or not at all, after retries."""

    exit_code = 5
    hint = "is the registry up and reachable? mirrors and TLS settings come from hosts.toml"


class AuthError(RegistryError):
    hint = "check the credentials in ~/.docker/config.json or the credential helper"


class NotFoundError(RegistryError):
    hint = "check the reference: repository, tag or digest"


class FetchError(RegistryError):
    """A range of a blob could not be fetched after retries (maps to EIO / MEDIUM ERROR)."""


class NoLazyImageError(BdError):
    """No trusted lazy image exists for a reference (non-fatal: callers may convert on the node)."""

    exit_code = 6


class DaemonError(BdError):
    """The daemon refused a request or could not be reached."""

    exit_code = 7
    hint = "see `bdserver serve` logs (journalctl -u bdserver, or the log file in the state dir)"


class DaemonNotRunning(DaemonError):
    hint = "start it with `bdserver serve` or `systemctl start bdserver`"


class KernelError(BdError):
    """The kernel lacks a feature or refused an operation (mount, module, device)."""

    exit_code = 8
    hint = "run `kernel-setup/check` to see what this kernel offers"


class NoSpaceError(BdError):
    exit_code = 9
    hint = "free space or lower the cache size cap; run `bdserver cache prune`"


class DeviceBusy(BdError):
    exit_code = 10
    hint = "unmount it first with `bdserver umount TARGET`"


class NoSuchDevice(BdError):
    exit_code = 11
    hint = "see `bdserver ls` for attached devices and mounts"


class BadTarget(BdError):
    exit_code = 12
    hint = "choose a TARGET directory (it is created if missing) on a local, writable filesystem"


class ConfigError(BdError):
    exit_code = 13
    hint = "fix the config file (TOML or JSON; see the keys in the README's Configuration section)"


class PolicyError(BdError):
    """The node's policy forbids what was asked (an untrusted source, a host path from a pod)."""

    exit_code = 14
    hint = "only the node admin can allow this (config [trust], `bdserver trust allow`)"


class SnapshotError(BdError):
    """A containerd snapshotter request names snapshots in a way the snapshot graph forbids.

    The subclasses are the gRPC statuses containerd expects (NotFound, AlreadyExists,
    FailedPrecondition, InvalidArgument); the snapshotter service maps them once."""

    exit_code = 15
    hint = "see `ctr snapshots --snapshotter bdserver ls`"


class SnapshotNotFound(SnapshotError):
    pass


class SnapshotExists(SnapshotError):
    pass


class SnapshotBusy(SnapshotError):
    """The snapshot is in the wrong state for the request (committed, has children, is in use)."""


class SnapshotInvalid(SnapshotError):
    """The request itself is malformed (empty key, bad labels, an unusable image reference)."""


class ContainerdError(BdError):
    """containerd refused a request of `bdserver pull`, or could not be reached."""

    exit_code = 16
    hint = "is containerd running on that --address, with the bdserver proxy plugin in its config.toml?"


class ResourceLimitError(BdError):
    """A child process doing untrusted work (on-node conversion) was stopped by an OS limit."""

    exit_code = 17
    hint = "the image is too big for this node's conversion limits, or hostile; use a lazy image converted elsewhere"


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error (a bug: please report it with the daemon log)",
    2: "usage: bad command line or reference (UsageError, BadReference)",
    3: "malformed or hostile input: tar, EROFS, manifest, chunk index (FormatError)",
    4: "bytes failed verification against the digest chain (IntegrityError)",
    5: "registry unreachable, refusing, or missing the content (RegistryError, AuthError, NotFoundError, "
       "FetchError)",
    6: "no trusted lazy image for the reference (NoLazyImageError)",
    7: "the daemon refused the request or could not be reached (DaemonError)",
    8: "the kernel lacks a feature or refused an operation (KernelError)",
    9: "disk full: cache or state (NoSpaceError)",
    10: "the device or target is in use (DeviceBusy)",
    11: "no such device or mount (NoSuchDevice)",
    12: "the mount target is unusable (BadTarget)",
    13: "the configuration is invalid (ConfigError)",
    14: "forbidden by the node's policy (PolicyError)",
    15: "a snapshot request conflicts with the snapshot graph (SnapshotError: NotFound, Exists, Busy, Invalid)",
    16: "containerd refused `bdserver pull` or is unreachable (ContainerdError)",
    17: "on-node conversion stopped by its memory, file-size, CPU or time limit (ResourceLimitError)",
}

__doc__ += "\n" + "\n".join(f"    {k:>3}  {v}" for k, v in EXIT_CODES.items()) + "\n"
