"""A tar-based image -> its lazy EROFS image (docs/CONTRACTS.md "The lazy image"), and the
node-side fallback that builds the same ONE device from whole layers on local disk.

Every step is deterministic (sorted trees, fixed times, UUIDs from digests, canonical JSON, no
timestamps), so converting the same source twice gives the same manifest digest, and the same
source layer gives the same EROFS blob in every image that contains it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

from bdserver.blob import chunked
from bdserver.convert.layer import LayerResult, convert_layer
from bdserver.convert.merge import MergedMeta, MergeLayer, build_merged_meta, device_tag
from bdserver.erofs.reader import ErofsImage
from bdserver.errors import FormatError, IntegrityError
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import Descriptor, Index, Manifest, canonical_json, parse_manifest
from bdserver.oci.store import ImageStore

ROLE_MERGED_META = "merged-meta"


@dataclass
class ConvertResult:
    """What `convert_image` published in ``dest``."""

    manifest: bytes  # the lazy manifest, exactly as stored
    descriptor: Descriptor  # its descriptor (artifactType set: what a referrers index lists)
    subject: Descriptor  # the source manifest
    layers: list[Descriptor]  # device layers then the merged meta
    source_diff_ids: list[str]
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
    diff_ids: list[str]  # of the source tars
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
            raise FormatError(
                f"layer {l.digest} has media type {l.media_type}; convert takes tar layers only "
                "(an EROFS image needs no conversion)")


def _convert_one(open_layer: Callable[[], BinaryIO], image_path: Path, expected_diff_id: str | None,
                 tmpdir: str) -> LayerResult:
    with open_layer() as stream, open(image_path, "wb") as out:
        r = convert_layer(stream, out, tmpdir=tmpdir)
    if expected_diff_id is not None and r.diff_id != expected_diff_id:
        raise IntegrityError(f"layer diff_id is {r.diff_id}, the image config says {expected_diff_id}")
    return r


def _merge_layers_from_images(paths: Sequence[Path], results: Sequence[LayerResult],
                              tags: Sequence[bytes]) -> list[MergeLayer]:
    out = []
    for p, r, tag in zip(paths, results, tags):
        with ErofsImage.open(p) as img:
            out.append(MergeLayer(root=img.to_tree(), blocks=r.blocks, tag=tag, implicit=r.implicit))
    return out


def convert_image(src: ImageStore, src_ref: str, dest: ImageStore, dest_tag: str | None = None, *,
                  tmpdir: str | None = None, chunk_size: int = chunked.DEFAULT_CHUNK_SIZE,
                  level: int = chunked.DEFAULT_LEVEL) -> ConvertResult:
    """Convert the image ``src_ref`` (tag or digest; an index picks this host's platform) of
    ``src`` into its lazy image and store blobs + manifest in ``dest`` (under ``dest_tag`` if
    given); nothing is stored in ``dest`` unless every layer converted. Publishing as a referrer (Referrers API / ``sha256-<hex>`` tag) is convert/publish.py's
    job: it takes ``result.descriptor`` and ``result.subject``."""
    m, subject = resolve_image_manifest(src, src_ref)
    _check_tar_layers(m)
    cfg = _read_config(src, m)
    rootfs = cfg.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(m.layers):
        raise FormatError(f"image config rootfs.diff_ids does not list the {len(m.layers)} layers")

    work = tempfile.mkdtemp(prefix="bdserver-convert-", dir=tmpdir)
    try:
        wd = Path(work)
        results: list[LayerResult] = []
        infos: list[chunked.ChunkedBlobInfo] = []
        paths: list[Path] = []
        blobs: list[Path] = []  # stored in dest only once every layer converted
        for i, l in enumerate(m.layers):
            img = wd / f"layer{i}.erofs"
            r = _convert_one(lambda l=l: src.open_blob(l.digest, l.size), img, diff_ids[i], work)  # type: ignore[misc]
            blob = wd / f"layer{i}.erofs.zst"
            with open(img, "rb") as fi, open(blob, "wb") as fo:
                info = chunked.write_chunked_zstd(fi, fo, chunk_size=chunk_size, level=level)
            if info.uncompressed_size != r.size:
                raise AssertionError("chunked blob size does not match the EROFS image")
            blobs.append(blob)
            results.append(r)
            infos.append(info)
            paths.append(img)

        tags = [device_tag(info.digest) for info in infos]
        mlayers = _merge_layers_from_images(paths, results, tags)
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
            layers.append(Descriptor(media_type=mt.EROFS_LAYER_ZSTD, digest=info.digest, size=info.size,
                                     annotations=ann))
        layers.append(Descriptor(media_type=mt.EROFS_LAYER, digest=meta_digest, size=meta.size,
                                 annotations={mt.ANN_BD_ROLE: ROLE_MERGED_META,
                                              mt.ANN_BD_BLOCKS: str(meta.blocks)}))

        cfg_bytes = lazy_config(cfg, [i.uncompressed_digest for i in infos] + [meta_digest])
        cfg_desc = Descriptor.for_bytes(cfg_bytes, mt.OCI_CONFIG)
        if not dest.has_blob(cfg_desc.digest):
            import io

            dest.put_blob(io.BytesIO(cfg_bytes), cfg_desc.digest, cfg_desc.size)

        man = Manifest(config=cfg_desc, layers=layers, media_type=mt.OCI_MANIFEST, subject=subject,
                       artifact_type=mt.LAZY_ARTIFACT_TYPE, annotations={mt.ANN_BD_SOURCE: subject.digest})
        data = man.to_bytes()
        dest.put_manifest(data, mt.OCI_MANIFEST, tag=dest_tag)
        return ConvertResult(manifest=data, descriptor=man.descriptor(), subject=subject, layers=layers,
                             source_diff_ids=[r.diff_id for r in results], meta_blocks=meta.blocks,
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


def convert_tar_layers(openers: Sequence[Callable[[], BinaryIO]], workdir: str | os.PathLike[str], *,
                       expected_diff_ids: Sequence[str] | None = None) -> LocalDevice:
    """Convert tar layers (each opener returns a fresh stream) into EROFS layer images and the
    merged metadata in ``workdir``: ``layer<i>.erofs`` and ``meta.erofs``. Tags are the hex of
    each EROFS image's sha256 (there is no registry blob to name)."""
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    results: list[LayerResult] = []
    paths: list[Path] = []
    for i, op in enumerate(openers):
        p = wd / f"layer{i}.erofs"
        exp = expected_diff_ids[i] if expected_diff_ids is not None else None
        results.append(_convert_one(op, p, exp, str(wd)))
        paths.append(p)
    digests = [_sha256_file(p) for p in paths]
    mlayers = _merge_layers_from_images(paths, results, [device_tag(d) for d in digests])
    meta_path = wd / "meta.erofs"
    with open(meta_path, "wb") as out:
        meta = build_merged_meta(mlayers, out)
    return LocalDevice(meta_path=meta_path, layer_paths=paths, meta=meta,
                       diff_ids=[r.diff_id for r in results], layer_digests=digests)


def convert_layers_to_device(src: ImageStore, ref: str, workdir: str | os.PathLike[str]) -> LocalDevice:
    """Node fallback when an image has no lazy image: download its tar layers whole, convert
    them, and build the same ONE device (as local files) that a lazy image would give."""
    m, _ = resolve_image_manifest(src, ref)
    _check_tar_layers(m)
    cfg = _read_config(src, m)
    rootfs = cfg.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(m.layers):
        diff_ids = None
    openers = [lambda l=l: src.open_blob(l.digest, l.size) for l in m.layers]
    return convert_tar_layers(openers, workdir, expected_diff_ids=diff_ids)
