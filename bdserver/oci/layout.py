"""OCI image layout directories (image-spec ``image-layout.md``) as an ImageStore.

Used by the converter as scratch destination and source (``oci:DIR[:TAG]``) and readable by
skopeo/oras/containerd. Writes are atomic (temp file + rename + fsync) and index.json updates
are serialised with flock on the directory, so a crash or a concurrent writer never leaves a
half-written blob or index behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from bdserver.errors import FormatError, IntegrityError, NotFoundError
from bdserver.fsutil import atomic_write, fsync_dir
from bdserver.oci import mediatypes as mt
from bdserver.digest import VerifyingReader, digest_of, hasher, is_digest, parse_digest, sha256_digest, verify_bytes
from bdserver.oci.model import Descriptor, Index, canonical_json, detect_media_type, parse_manifest

log = logging.getLogger(__name__)

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}


class OCILayout:
    """An OCI layout directory; ``create=True`` initialises an empty one if missing."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if not (self.path / LAYOUT_FILE).exists():
            if not create:
                raise NotFoundError(f"no OCI layout at {self.path} (no {LAYOUT_FILE} file)")
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            with self._locked():
                if not (self.path / "index.json").exists():
                    atomic_write(self.path / "index.json", canonical_json(Index(manifests=[]).to_dict()))
                if not (self.path / LAYOUT_FILE).exists():
                    atomic_write(self.path / LAYOUT_FILE, canonical_json(LAYOUT_VERSION))
        else:
            try:
                v = json.loads((self.path / LAYOUT_FILE).read_bytes())
            except ValueError:
                raise FormatError(f"{self.path}/{LAYOUT_FILE} is not JSON") from None
            if not isinstance(v, dict) or "imageLayoutVersion" not in v:
                raise FormatError(f"{self.path}/{LAYOUT_FILE}: missing imageLayoutVersion")

    def __repr__(self) -> str:
        return f"OCILayout({str(self.path)!r})"

    # -- helpers -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def blob_path(self, digest: str) -> Path:
        alg, hexd = parse_digest(digest)
        return self.path / "blobs" / alg / hexd

    def read_index(self) -> Index:
        try:
            data = (self.path / "index.json").read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{self.path}: no index.json") from None
        try:
            return Index.from_dict(json.loads(data), mt.OCI_INDEX)
        except ValueError as e:
            raise FormatError(f"{self.path}/index.json: {e}") from None

    def _write_index(self, index: Index) -> None:
        atomic_write(self.path / "index.json", canonical_json(index.to_dict()))

    @staticmethod
    def _plain(desc: Descriptor) -> Descriptor:
        """A descriptor without the layout-only ref.name annotation (usable as a subject)."""
        ann = {k: v for k, v in desc.annotations.items() if k != mt.ANN_REF_NAME}
        return desc.with_annotations(ann)

    # -- ImageStore ----------------------------------------------------------------------------

    def resolve(self, ref: str) -> Descriptor:
        index = self.read_index()
        if is_digest(ref):
            for d in index.manifests:
                if d.digest == ref:
                    return self._plain(d)
            p = self.blob_path(ref)
            if not p.exists():
                raise NotFoundError(f"{self.path}: no manifest {ref}")
            data = verify_bytes(p.read_bytes(), ref)
            return Descriptor(media_type=detect_media_type(data), digest=ref, size=len(data))
        matches = [d for d in index.manifests if d.annotations.get(mt.ANN_REF_NAME) == ref]
        if not matches:
            raise NotFoundError(f"{self.path}: no tag {ref!r} (tags: {', '.join(self.list_tags()) or 'none'})")
        return self._plain(matches[-1])

    def get_manifest(self, ref: str) -> tuple[bytes, Descriptor]:
        desc = self.resolve(ref)
        try:
            data = self.blob_path(desc.digest).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{self.path}: manifest blob {desc.digest} missing") from None
        verify_bytes(data, desc.digest, desc.size)
        return data, desc

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        try:
            f = open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"{self.path}: no blob {digest}") from None
        return VerifyingReader(f, digest, size)  # type: ignore[return-value]

    def read_range(self, digest: str, offset: int, length: int, size: int | None = None) -> bytes:
        """Bytes ``[offset, offset+length)`` clamped to the blob (unverified: chunk checks verify).

        Same signature as RegistryRepository.read_range (``size`` is accepted and not needed)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        try:
            with open(self.blob_path(digest), "rb") as f:
                f.seek(offset)
                return f.read(max(0, length))
        except FileNotFoundError:
            raise NotFoundError(f"{self.path}: no blob {digest}") from None

    def blob_size(self, digest: str) -> int:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"{self.path}: no blob {digest}") from None

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def put_blob(self, fileobj: BinaryIO, digest: str, size: int) -> None:
        dest = self.blob_path(digest)
        if dest.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = hasher(digest)
        n = 0
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                while True:
                    c = fileobj.read(1 << 20)
                    if not c:
                        break
                    n += len(c)
                    if n > size:
                        raise IntegrityError(f"{digest}: more than the declared {size} bytes")
                    h.update(c)
                    out.write(c)
                out.flush()
                os.fsync(out.fileno())
            got = digest_of(h)
            if n != size or got != digest:
                raise IntegrityError(f"blob {digest} ({size} bytes): got {got} ({n} bytes)")
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(dest.parent)

    def put_blob_bytes(self, data: bytes, digest: str | None = None) -> str:
        digest = digest or sha256_digest(data)
        self.put_blob(io.BytesIO(data), digest, len(data))
        return digest

    def put_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> Descriptor:
        """Store the bytes; list them in index.json (replacing an older holder of ``tag``)."""
        parsed = parse_manifest(data, media_type)  # refuse garbage before it is listed
        digest = sha256_digest(data)
        self.put_blob(io.BytesIO(data), digest, len(data))
        artifact_type = parsed.artifact_type or (
            parsed.config.media_type if getattr(parsed, "subject", None) is not None and hasattr(parsed, "config") else None
        )
        desc = Descriptor(media_type=media_type, digest=digest, size=len(data), artifact_type=artifact_type)
        with self._locked():
            index = self.read_index()
            if tag is not None:
                kept = [d for d in index.manifests if d.annotations.get(mt.ANN_REF_NAME) != tag]
                # an untagged entry for the same digest becomes the tagged one
                kept = [d for d in kept if not (d.digest == digest and mt.ANN_REF_NAME not in d.annotations)]
                kept.append(desc.with_annotations({mt.ANN_REF_NAME: tag}))
                index.manifests = kept
            elif not any(d.digest == digest for d in index.manifests):
                index.manifests.append(desc)
            self._write_index(index)
        log.debug("layout %s: manifest %s tag=%s", self.path, digest, tag)
        return desc

    def delete_tag(self, tag: str) -> None:
        with self._locked():
            index = self.read_index()
            index.manifests = [d for d in index.manifests if d.annotations.get(mt.ANN_REF_NAME) != tag]
            self._write_index(index)

    def list_tags(self) -> list[str]:
        tags = [d.annotations[mt.ANN_REF_NAME] for d in self.read_index().manifests if mt.ANN_REF_NAME in d.annotations]
        return sorted(set(tags))

    def list_manifests(self) -> list[Descriptor]:
        """Every descriptor in index.json (tagged or not), as stored."""
        return list(self.read_index().manifests)
