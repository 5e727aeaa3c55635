"""Typed errors that cross package boundaries.

Each error knows the exit code the CLI returns for it and the one-line hint a user
needs; the kernel-facing backends map them once (EIO, SCSI sense) in backends/.
"""

from __future__ import annotations


class BdError(Exception):
    """Base of every error bdserver raises on purpose."""

    exit_code = 1
    hint = ""

    def user_message(self) -> str:
        msg = str(self) or self.__class__.__name__
        return f"{msg} ({self.hint})" if self.hint else msg


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


class KernelError(BdError):
    """The kernel lacks a feature or refused an operation (mount, module, device)."""

    exit_code = 8
    hint = "run `kernel-setup/check` to see what this kernel offers"


class NoSpaceError(BdError):
    exit_code = 9
    hint = "free space or lower the cache size cap; run `bdserver cache prune`"
