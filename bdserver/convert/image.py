"""An image -> its lazy EROFS image (docs/CONTRACTS.md "The lazy image"), and the node-side
fallback that builds the same ONE device from whole layers on local disk.

Both start from one EROFS image per layer on local disk (`LayerImage`): a tar layer converted
here, or an EROFS-native layer (oci/nativeimage.py) fetched whole and verified, then checked
before its metadata is merged (convert/native.py). From there on the two kinds of source share
everything: the merge, the chunked blobs, the manifest.

Every step is deterministic (sorted trees, fixed times, UUIDs from digests, canonical JSON, no
timestamps), so converting the same source twice gives the same manifest digest, and the same
source layer gives the same EROFS blob in every image that contains it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

from bdserver.blob import chunked
from bdserver.convert.layer import convert_layer
from bdserver.convert.limits import DEFAULT_LIMITS, ConvertLimits
from bdserver.convert.merge import MergedMeta, MergeLayer, build_merged_meta, device_tag
from bdserver.convert.native import fetch_layer_image, file_reader, merge_layer
from bdserver.erofs.reader import ErofsImage
from bdserver.errors import FormatError, IntegrityError
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Descriptor, Index, Manifest, canonical_json, parse_manifest
from bdserver.oci.nativeimage import native_layers
from bdserver.oci.store import ImageStore

ROLE_MERGED_META = "merged-meta"
COMPRESSIONS = ("none", "lz4")  # how tar layers' file data is stored in EROFS: plain, or lz4
DEFAULT_COMPRESSION = "none"  # chosen by measurement: docs/bench.md "lz4 inside EROFS vs zstd blobs"


@dataclass
class ConvertResult:
    """What `convert_image` published in ``dest``."""

    manifest: bytes  # the lazy manifest, exactly as stored
    descriptor: Descriptor  # its descriptor (artifactType set: what a referrers index lists)
    subject: Descriptor  # the source manifest
    layers: list[Descriptor]  # device layers then the merged meta
    source_diff_ids: list[str]  # of the source's layers (tars or EROFS images)
    meta_blocks: int
    device_blocks: int  # size of the virtual device in 4 KiB blocks
    tag: str | None

    @property
    def digest(self) -> str:
        return self.descriptor.digest


@dataclass
class LocalDevice:
    """The ONE device built on the node: ``[meta | layer 1 | ... | layer N]`` as local files."""

    meta_path: Path
    layer_paths: list[Path]
    meta: MergedMeta
    diff_ids: list[str]  # of the source layers (tars or EROFS images)
    layer_digests: list[str] = field(default_factory=list)  # sha256 of each EROFS layer image

    @property
    def paths(self) -> list[Path]:
        return [self.meta_path, *self.layer_paths]

    @property
    def size(self) -> int:
        return self.meta.device_blocks * 4096

    def extents(self) -> list[tuple[int, int, Path]]:
        """(device byte offset, length, file) for each piece, in order."""
        out = [(0, self.meta.size, self.meta_path)]
        for slot, p in zip(self.meta.devices, self.layer_paths):
            out.append((slot.mapped_blkaddr * 4096, slot.blocks * 4096, p))
        return out

    def assemble(self, out_path: str | os.PathLike[str]) -> Path:
        """Concatenate the pieces into one flat image file (what a file-backed mount takes)."""
        with open(out_path, "wb") as out:
            for off, length, p in self.extents():
                out.seek(off)
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
            out.truncate(self.size)
        return Path(out_path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while c := f.read(1 << 20):
            h.update(c)
    return "sha256:" + h.hexdigest()


def resolve_image_manifest(src: ImageStore, ref: str) -> tuple[Manifest, Descriptor]:
    """Tag/digest -> the image manifest for this host's platform (an index is followed once)."""
    data, desc = src.get_manifest(ref)
    m = parse_manifest(data, desc.media_type)
    if isinstance(m, Index):
        pick = m.select_platform()
        data, desc = src.get_manifest(pick.digest)
        m = parse_manifest(data, desc.media_type)
        if isinstance(m, Index):
            raise FormatError(f"{ref}: an index inside an index is not supported")
    return m, Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size)


def _read_config(src: ImageStore, m: Manifest) -> dict[str, Any]:
    with src.open_blob(m.config.digest, m.config.size) as f:
        raw = f.read()
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"image config {m.config.digest} is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"image config {m.config.digest} is not a JSON object")
    return cfg


def _check_tar_layers(m: Manifest) -> None:
    for l in m.layers:
        if l.media_type not in mt.TAR_LAYER_TYPES:
            raise FormatError(f"layer {l.digest} has media type {l.media_type}; a tar or EROFS layer was expected")


@dataclass
class LayerImage:
    """One layer as an EROFS image on local disk. `foreign`: it came from elsewhere (an EROFS-native
    layer) and is checked before the merge; a tar layer converted here is not."""

    path: Path
    size: int
    source_diff_id: str
    implicit: frozenset[bytes] = frozenset()  # directories the tar never named
    foreign: bool = False


def _convert_one(open_layer: Callable[[], BinaryIO], image_path: Path, expected_diff_id: str | None,
                 tmpdir: str, limits: ConvertLimits, compress: str = "none") -> LayerImage:
    with open_layer() as stream, open(image_path, "wb") as out:
        r = convert_layer(stream, out, tmpdir=tmpdir, limits=limits, compress=compress)
    if expected_diff_id is not None and r.diff_id != expected_diff_id:
        raise IntegrityError(f"layer diff_id is {r.diff_id}, the image config says {expected_diff_id}")
    return LayerImage(image_path, r.size, r.diff_id, r.implicit)


def layer_images(src: ImageStore, m: Manifest, cfg: dict[str, Any], wd: Path, *, limits: ConvertLimits,
                 require_diff_ids: bool, compress: str = "none") -> list[LayerImage]:
    """Every layer of the image ``m`` (config ``cfg``) as an EROFS image file in ``wd``: tar layers
    converted (their diff_ids checked against the config; required with `require_diff_ids`),
    EROFS-native layers fetched whole and verified."""
    if m.artifact_type == mt.LAZY_ARTIFACT_TYPE:
        raise FormatError("the image is a bdserver lazy image already: it needs no conversion")
    native = native_layers(m, cfg)
    if native is not None:
        out = []
        for i, nl in enumerate(native):
            path = wd / f"layer{i}.erofs"
            size = fetch_layer_image(lambda nl=nl: src.open_blob(nl.digest, nl.desc.size), nl, path,  # type: ignore[misc]
                                     limits=limits)
            out.append(LayerImage(path, size, nl.diff_id or nl.digest, foreign=True))
        return out
    _check_tar_layers(m)
    rootfs = cfg.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(m.layers):
        if require_diff_ids:
            raise FormatError(f"image config rootfs.diff_ids does not list the {len(m.layers)} layers")
        diff_ids = [None] * len(m.layers)
    return [_convert_one(lambda l=l: src.open_blob(l.digest, l.size), wd / f"layer{i}.erofs", diff_ids[i],  # type: ignore[misc]
                         str(wd), limits, compress)
            for i, l in enumerate(m.layers)]


def merge_layers_of(images: Sequence[LayerImage], tags: Sequence[bytes], limits: ConvertLimits) -> list[MergeLayer]:
    """The merge's view of each layer image: a foreign one checked first (convert/native.py)."""
    out = []
    for k, (li, tag) in enumerate(zip(images, tags)):
        if li.foreign:
            read_at, close = file_reader(li.path)
            try:
                out.append(merge_layer(read_at, li.size, tag, name=f"layer {k} ({li.source_diff_id})", limits=limits))
            finally:
                close()
        else:
            with ErofsImage.open(li.path) as img:
                out.append(MergeLayer(root=img.to_tree(), blocks=-(-li.size // 4096), tag=tag, implicit=li.implicit))
    return out


def _wrap(image: LayerImage, out: Path, *, chunk_size: int, level: int) -> chunked.ChunkedBlobInfo:
    """The layer's blob: zstd frames with a chunk index. With ``--compress lz4`` the frames hold
    lz4-compressed EROFS: the blob stays about as small (zstd over lz4 output, measured in
    docs/bench.md; raw blobs were 1.4-1.5x larger) and the node cache holds the lz4 bytes."""
    with open(image.path, "rb") as fi, open(out, "wb") as fo:
        info = chunked.write_chunked_zstd(fi, fo, chunk_size=chunk_size, level=level)
    if info.uncompressed_size != image.size:
        raise AssertionError("chunked blob size does not match the EROFS image")
    return info


def convert_image(src: ImageStore, src_ref: str, dest: ImageStore, dest_tag: str | None = None, *,
                  tmpdir: str | None = None, chunk_size: int = chunked.DEFAULT_CHUNK_SIZE,
                  level: int = chunked.DEFAULT_LEVEL, limits: ConvertLimits = DEFAULT_LIMITS,
                  compress: str = "none") -> ConvertResult:
    """Convert the image ``src_ref`` (tag or digest; an index picks this host's platform) of
    ``src`` into its lazy image and store blobs + manifest in ``dest`` (under ``dest_tag`` if
    given); nothing is stored in ``dest`` unless every layer converted. Tar layers become EROFS
    layers (``compress="lz4"``: file data lz4-compressed by EROFS, which the kernel decompresses);
    EROFS-native layers are used as they are. Publishing as a referrer (Referrers API / ``sha256-<hex>`` tag) is
    convert/publish.py's job: it takes ``result.descriptor`` and ``result.subject``."""
    if compress not in COMPRESSIONS:
        raise ValueError(f"compress must be one of {COMPRESSIONS}")
    m, subject = resolve_image_manifest(src, src_ref)
    cfg = _read_config(src, m)
    work = tempfile.mkdtemp(prefix="bdserver-convert-", dir=tmpdir)
    try:
        wd = Path(work)
        images = layer_images(src, m, cfg, wd, limits=limits, require_diff_ids=True, compress=compress)
        infos: list[chunked.ChunkedBlobInfo] = []
        blobs: list[Path] = []  # stored in dest only once every layer converted
        for i, li in enumerate(images):
            blobs.append(wd / f"layer{i}.blob")
            infos.append(_wrap(li, blobs[-1], chunk_size=chunk_size, level=level))

        mlayers = merge_layers_of(images, [device_tag(info.digest) for info in infos], limits)
        meta_path = wd / "meta.erofs"
        with open(meta_path, "wb") as out:
            meta = build_merged_meta(mlayers, out)
        meta_digest = _sha256_file(meta_path)
        for info, blob in zip(infos, blobs):
            if not dest.has_blob(info.digest):
                with open(blob, "rb") as fb:
                    dest.put_blob(fb, info.digest, info.size)
            blob.unlink()
        if not dest.has_blob(meta_digest):
            with open(meta_path, "rb") as fb:
                dest.put_blob(fb, meta_digest, meta.size)

        layers: list[Descriptor] = []
        for info, slot in zip(infos, meta.devices):
            ann = chunked.annotations(info)
            ann[mt.ANN_EROFS_ROLE] = "device"
            ann[mt.ANN_UNCOMPRESSED_DIGEST] = info.uncompressed_digest
            ann[mt.ANN_BD_MAPPED_BLKADDR] = str(slot.mapped_blkaddr)
            ann[mt.ANN_BD_BLOCKS] = str(slot.blocks)
            layers.append(Descriptor(media_type=info.media_type, digest=info.digest, size=info.size,
                                     annotations=ann))
        layers.append(Descriptor(media_type=mt.EROFS_LAYER, digest=meta_digest, size=meta.size,
                                 annotations={mt.ANN_BD_ROLE: ROLE_MERGED_META,
                                              mt.ANN_BD_BLOCKS: str(meta.blocks)}))

        cfg_bytes = lazy_config(cfg, [i.uncompressed_digest for i in infos] + [meta_digest])
        cfg_desc = Descriptor.for_bytes(cfg_bytes, mt.OCI_CONFIG)
        if not dest.has_blob(cfg_desc.digest):
            dest.put_blob(io.BytesIO(cfg_bytes), cfg_desc.digest, cfg_desc.size)

        man = Manifest(config=cfg_desc, layers=layers, media_type=mt.OCI_MANIFEST, subject=subject,
                       artifact_type=mt.LAZY_ARTIFACT_TYPE, annotations={mt.ANN_BD_SOURCE: subject.digest})
        data = man.to_bytes()
        dest.put_manifest(data, mt.OCI_MANIFEST, tag=dest_tag)
        return ConvertResult(manifest=data, descriptor=man.descriptor(), subject=subject, layers=layers,
                             source_diff_ids=[li.source_diff_id for li in images], meta_blocks=meta.blocks,
                             device_blocks=meta.device_blocks, tag=dest_tag)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def lazy_config(cfg: dict[str, Any], diff_ids: list[str]) -> bytes:
    """The source config with rootfs.diff_ids of the EROFS layers and ``erofs`` in os.features
    (erofs-image-spec §5); a history entry is added for the merged layer; canonical JSON."""
    out = json.loads(json.dumps(cfg))  # deep copy
    out["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    feats = out.get("os.features")
    feats = list(feats) if isinstance(feats, list) else []
    if "erofs" not in feats:
        feats.append("erofs")
    out["os.features"] = feats
    hist = out.get("history")
    if isinstance(hist, list):
        hist.append({"created_by": "bdserver convert: merged EROFS metadata", "comment": "bdserver"})
    return canonical_json(out)


def local_device(images: Sequence[LayerImage], workdir: Path, limits: ConvertLimits = DEFAULT_LIMITS) -> LocalDevice:
    """The merged metadata of layer images in ``workdir`` (``meta.erofs``), as ONE local device.
    Tags are the hex of each EROFS image's sha256 (there is no registry blob to name)."""
    digests = [_sha256_file(li.path) for li in images]
    mlayers = merge_layers_of(images, [device_tag(d) for d in digests], limits)
    meta_path = workdir / "meta.erofs"
    with open(meta_path, "wb") as out:
        meta = build_merged_meta(mlayers, out)
    return LocalDevice(meta_path=meta_path, layer_paths=[li.path for li in images], meta=meta,
                       diff_ids=[li.source_diff_id for li in images], layer_digests=digests)


def convert_tar_layers(openers: Sequence[Callable[[], BinaryIO]], workdir: str | os.PathLike[str], *,
                       expected_diff_ids: Sequence[str] | None = None, limits: ConvertLimits = DEFAULT_LIMITS,
                       compress: str = "none") -> LocalDevice:
    """Convert tar layers (each opener returns a fresh stream) into EROFS layer images and the
    merged metadata in ``workdir``: ``layer<i>.erofs`` and ``meta.erofs``."""
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    images = [_convert_one(op, wd / f"layer{i}.erofs", expected_diff_ids[i] if expected_diff_ids else None,
                           str(wd), limits, compress)
              for i, op in enumerate(openers)]
    return local_device(images, wd, limits)


def convert_layers_to_device(src: ImageStore, ref: str, workdir: str | os.PathLike[str], *,
                             limits: ConvertLimits = DEFAULT_LIMITS) -> LocalDevice:
    """Node fallback when an image has no lazy image: download its layers whole (tar layers
    converted, EROFS-native ones verified and checked) and build the same ONE device (as local
    files) that a lazy image would give."""
    m, _ = resolve_image_manifest(src, ref)
    cfg = _read_config(src, m)
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    return local_device(layer_images(src, m, cfg, wd, limits=limits, require_diff_ids=False), wd, limits)
