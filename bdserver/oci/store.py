"""The ImageStore protocol: one interface for OCI layout directories and registry repositories.

The converter reads sources and writes destinations through it, so `convert` works the same
from ``oci:DIR`` to a registry, registry to registry, or registry to a layout. A store is bound
to one repository (a layout directory is one repository). Tags are plain tag names; the
referrers tag schema (``sha256-<hex>``) is just another tag.
"""

from __future__ import annotations

from typing import BinaryIO, Protocol, runtime_checkable

from bdserver.oci.model import Descriptor
from bdserver.oci.reference import Reference, parse_reference


@runtime_checkable
class ImageStore(Protocol):
    def resolve(self, ref: str) -> Descriptor:
        """Tag or digest -> the manifest/index descriptor (media type, digest, size). NotFoundError if absent."""

    def get_manifest(self, ref: str) -> tuple[bytes, Descriptor]:
        """Tag or digest -> (the exact bytes, their descriptor); bytes are verified against the digest."""

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        """A streaming reader, verified as it is read (IntegrityError at EOF on a mismatch)."""

    def has_blob(self, digest: str) -> bool: ...

    def put_blob(self, fileobj: BinaryIO, digest: str, size: int) -> None:
        """Store ``size`` bytes read from ``fileobj``; IntegrityError (nothing stored) if they do not match."""

    def put_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> Descriptor:
        """Store manifest/index bytes as given (never re-serialised), optionally under ``tag``."""

    def list_tags(self) -> list[str]: ...


def open_store(ref: str | Reference, *, create: bool = False, shared: bool = True, **registry_kw) -> ImageStore:
    """The store a reference names: an OCILayout for ``oci:`` paths, else a registry repository.

    ``registry_kw`` go to RegistryClient (e.g. ``docker_config=``, ``hosts_dirs=``). Reading never
    creates: a missing layout is NotFoundError ("no OCI layout at PATH"), so ``oci:/any/path`` in a
    source cannot make root create directories; only a destination passes ``create=True``.
    ``shared`` reuses one RegistryClient per (host, options) in the process (connection pool, tokens).
    """
    r = parse_reference(ref) if isinstance(ref, str) else ref
    if r.is_layout:
        from bdserver.oci.layout import OCILayout

        return OCILayout(r.layout_path, create=create)  # type: ignore[arg-type]
    from bdserver.oci.registry import RegistryClient

    if shared:  # one pool and token cache per registry (and options) in this process
        return RegistryClient.shared(r.host, **registry_kw).repository(r.repository)
    return RegistryClient.for_reference(r, **registry_kw).repository(r.repository)
