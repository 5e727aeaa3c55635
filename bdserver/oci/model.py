"""Descriptors, manifests, indexes and platforms (OCI image-spec v1.1 and Docker schema 2).

Parsing keeps unknown fields (``extra``) so that a manifest we rewrite does not silently lose
what another tool put there; serialisation is canonical (sorted keys, no whitespace, UTF-8) so
the same object always gives the same bytes and therefore the same digest.
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any, Iterable

from bdserver.errors import FormatError, NotFoundError
from bdserver.oci import mediatypes as mt
from bdserver.digest import parse_digest, sha256_digest


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, compact separators, UTF-8 (no ASCII escaping)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _obj(data: Any, what: str) -> dict:
    if not isinstance(data, dict):
        raise FormatError(f"{what}: expected a JSON object")
    return data


def _str_list(v: Any) -> bool:
    return v is None or isinstance(v, list) and all(isinstance(x, str) for x in v)


def _str_map(v: Any, what: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise FormatError(f"{what}: annotations must map strings to strings")
    return dict(v)


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None
    os_features: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> "Platform":
        d = _obj(d, "platform")
        if not isinstance(d.get("os"), str) or not isinstance(d.get("architecture"), str):
            raise FormatError("platform: os and architecture are required strings")
        if not _str_list(d.get("os.features")):
            raise FormatError("platform: os.features must be a list of strings")
        return cls(
            os=d["os"],
            architecture=d["architecture"],
            variant=d.get("variant"),
            os_version=d.get("os.version"),
            os_features=tuple(d.get("os.features") or ()),
        )

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        if self.os_version:
            d["os.version"] = self.os_version
        if self.os_features:
            d["os.features"] = list(self.os_features)
        return d

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return f"{s}/{self.variant}" if self.variant else s


_ARCH = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


def host_platform() -> Platform:
    """linux/<GOARCH>[/variant] of this machine, in OCI spelling."""
    arch, variant = _ARCH.get(_platform.machine().lower(), (_platform.machine().lower(), None))
    return Platform(os="linux", architecture=arch, variant=variant)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    platform: Platform | None = field(default=None, compare=False)
    artifact_type: str | None = field(default=None, compare=False)
    urls: tuple[str, ...] = field(default=(), compare=False)
    data: str | None = field(default=None, compare=False)  # base64, as in the JSON
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    _KNOWN = ("mediaType", "digest", "size", "annotations", "platform", "artifactType", "urls", "data")

    @classmethod
    def from_dict(cls, d: Any) -> "Descriptor":
        d = _obj(d, "descriptor")
        mtype, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
        if not isinstance(mtype, str) or not isinstance(digest, str):
            raise FormatError("descriptor: mediaType and digest are required strings")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"descriptor {digest}: size must be a non-negative integer")
        parse_digest(digest)
        if not _str_list(d.get("urls")):
            raise FormatError(f"descriptor {digest}: urls must be a list of strings")
        return cls(
            media_type=mtype,
            digest=digest,
            size=size,
            annotations=_str_map(d.get("annotations"), f"descriptor {digest}"),
            platform=Platform.from_dict(d["platform"]) if d.get("platform") is not None else None,
            artifact_type=d.get("artifactType"),
            urls=tuple(d.get("urls") or ()),
            data=d.get("data"),
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
        )

    def to_dict(self) -> dict:
        d: dict[str, Any] = dict(self.extra)
        d.update({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform is not None:
            d["platform"] = self.platform.to_dict()
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        if self.urls:
            d["urls"] = list(self.urls)
        if self.data is not None:
            d["data"] = self.data
        return d

    def with_annotations(self, annotations: dict[str, str]) -> "Descriptor":
        from dataclasses import replace

        return replace(self, annotations=dict(annotations))

    @classmethod
    def for_bytes(cls, data: bytes, media_type: str, **kw: Any) -> "Descriptor":
        return cls(media_type=media_type, digest=sha256_digest(data), size=len(data), **kw)


class _Document:
    """What manifests and indexes share: schemaVersion 2, a media type, an optional subject,
    artifactType and annotations, and unknown fields kept verbatim so a rewrite loses nothing."""

    media_type: str
    subject: Descriptor | None
    artifact_type: str | None
    annotations: dict[str, str]
    extra: dict[str, Any]

    _COMMON = ("schemaVersion", "mediaType", "subject", "artifactType", "annotations")

    @staticmethod
    def _common(d: dict, what: str, media_type: str | None, default: str, allowed: Any,
                known: tuple[str, ...]) -> dict[str, Any]:
        if d.get("schemaVersion") != 2:
            raise FormatError(f"{what}: unsupported schemaVersion {d.get('schemaVersion')!r}")
        mtype = d.get("mediaType") or media_type or default
        if mtype not in allowed:
            raise FormatError(f"not an image {what}: {mtype}")
        return {
            "media_type": mtype,
            "subject": Descriptor.from_dict(d["subject"]) if d.get("subject") is not None else None,
            "artifact_type": d.get("artifactType"),
            "annotations": _str_map(d.get("annotations"), what),
            "extra": {k: v for k, v in d.items() if k not in _Document._COMMON + known},
        }

    def _with_common(self, body: dict[str, Any]) -> dict:
        d: dict[str, Any] = dict(self.extra)
        d.update({"schemaVersion": 2, "mediaType": self.media_type})
        d.update(body)
        if self.subject is not None:
            d["subject"] = self.subject.to_dict()
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    def to_dict(self) -> dict:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())


def _list_field(d: dict, key: str, what: str) -> list:
    v = d.get(key)
    if not isinstance(v, list):
        raise FormatError(f"{what}: {key} must be a list")
    return v


@dataclass
class Manifest(_Document):
    """An image manifest (OCI or Docker schema 2)."""

    config: Descriptor
    layers: list[Descriptor]
    media_type: str = mt.OCI_MANIFEST
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, media_type: str | None = None) -> "Manifest":
        d = _obj(d, "manifest")
        common = cls._common(d, "manifest", media_type, mt.OCI_MANIFEST, mt.MANIFEST_TYPES, ("config", "layers"))
        layers = _list_field(d, "layers", "manifest")
        return cls(config=Descriptor.from_dict(d.get("config")),
                   layers=[Descriptor.from_dict(x) for x in layers], **common)

    def to_dict(self) -> dict:
        return self._with_common({"config": self.config.to_dict(), "layers": [x.to_dict() for x in self.layers]})

    def descriptor(self, **kw: Any) -> Descriptor:
        """The descriptor of this manifest's canonical bytes (artifactType filled in, as referrers need)."""
        at = kw.pop("artifact_type", None) or self.artifact_type or (
            self.config.media_type if self.subject is not None else None
        )
        return Descriptor.for_bytes(self.to_bytes(), self.media_type, artifact_type=at, **kw)


@dataclass
class Index(_Document):
    """An image index (OCI) or manifest list (Docker)."""

    manifests: list[Descriptor]
    media_type: str = mt.OCI_INDEX
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, media_type: str | None = None) -> "Index":
        d = _obj(d, "index")
        common = cls._common(d, "index", media_type, mt.OCI_INDEX, mt.INDEX_TYPES, ("manifests",))
        ms = _list_field(d, "manifests", "index")
        return cls(manifests=[Descriptor.from_dict(x) for x in ms], **common)

    def to_dict(self) -> dict:
        return self._with_common({"manifests": [x.to_dict() for x in self.manifests]})

    def descriptor(self, **kw: Any) -> Descriptor:
        return Descriptor.for_bytes(self.to_bytes(), self.media_type, **kw)

    def select_platform(self, want: Platform | None = None) -> Descriptor:
        return select_platform(self.manifests, want)


def _load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise FormatError(f"{what}: not valid JSON ({e})") from None


def detect_media_type(data: bytes, hint: str | None = None) -> str:
    """The media type of manifest bytes: their own ``mediaType``, else the hint, else by shape."""
    d = _obj(_load_json(data, "manifest"), "manifest")
    mtype = d.get("mediaType")
    if isinstance(mtype, str) and mtype:
        return mtype
    if hint in mt.MANIFEST_TYPES + mt.INDEX_TYPES:
        return hint  # type: ignore[return-value]
    return mt.OCI_INDEX if "manifests" in d else mt.OCI_MANIFEST


def parse_manifest(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse manifest or index bytes; raises FormatError for schema 1 and anything else unknown."""
    d = _obj(_load_json(data, "manifest"), "manifest")
    mtype = d.get("mediaType") or media_type
    if mtype in (mt.DOCKER_SCHEMA1, mt.DOCKER_SCHEMA1_SIGNED) or d.get("schemaVersion") == 1:
        raise FormatError("Docker schema 1 manifests are not supported (re-push the image with a current tool)")
    if mtype in mt.INDEX_TYPES or (mtype not in mt.MANIFEST_TYPES and "manifests" in d):
        return Index.from_dict(d, mtype if mtype in mt.INDEX_TYPES else None)
    return Manifest.from_dict(d, mtype if mtype in mt.MANIFEST_TYPES else None)


def _is_attestation(desc: Descriptor) -> bool:
    return desc.annotations.get("vnd.docker.reference.type") == "attestation-manifest" or (
        desc.platform is not None and desc.platform.os == "unknown"
    )


def platform_matches(have: Platform, want: Platform) -> bool:
    if have.os != want.os or have.architecture != want.architecture:
        return False
    if want.variant and have.variant and have.variant != want.variant:
        # arm64 images are often published without a variant; v8 is implied.
        return False
    return True


def select_platform(manifests: Iterable[Descriptor], want: Platform | None = None) -> Descriptor:
    """Pick the manifest for ``want`` (default linux/<this arch>) from an index.

    An exact variant beats a missing one; attestation manifests are never picked. Raises
    NotFoundError naming the platforms that exist.
    """
    want = want or host_platform()
    cands = [m for m in manifests if not _is_attestation(m)]
    best: Descriptor | None = None
    for m in cands:
        if m.platform is None or not platform_matches(m.platform, want):
            continue
        if m.platform.variant == want.variant:
            return m
        best = best or m
    if best is not None:
        return best
    have = sorted({str(m.platform) for m in cands if m.platform is not None})
    raise NotFoundError(f"no manifest for platform {want} (index has: {', '.join(have) or 'none'})")
