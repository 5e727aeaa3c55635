"""Build a VirtualDevice from a lazy image manifest (docs/CONTRACTS.md "The lazy image").

    layers[0..N-1]  device-role EROFS layers (+zstd or raw) with an embedded chunk index,
                    placed at `org.bdserver.mapped-blkaddr` (optionally followed by a standalone
                    `application/vnd.erofs.chunk-index.v1` layer when not embedded)
    layers[N]       the merged metadata image (raw EROFS), placed at block 0

Chain of trust: the merged meta blob is fetched whole and checked against its descriptor digest;
each layer's chunk index is checked against `org.erofs.chunk-index.digest` (or, standalone,
against its own descriptor digest); every chunk against its checksum in that index. Verified
index payloads and the meta blob are cached whole (content-addressed) and pinned while the device
lives, so a re-attach needs no request before the first data read.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import zstandard

from bdserver.blob.chunked import ANN_INDEX_DIGEST, ANN_INDEX_RANGE, ANN_UNCOMPRESSED_DIGEST, MEDIA_TYPE_RAW, MEDIA_TYPE_ZSTD
from bdserver.blob.chunkindex import COMPRESSION_NONE, COMPRESSION_ZSTD, MEDIA_TYPE as CHUNK_INDEX_MEDIA_TYPE
from bdserver.blob.chunkindex import ChunkIndex
from bdserver.blob.reader import ChunkedBlob, index_from_payload, load_index, parse_range
from bdserver.digest import parse_digest, verify_bytes
from bdserver.cache import CacheKey, ChunkCache
from bdserver.erofs.check import DeviceGeometry, ExpectedSlot, check_image
from bdserver.errors import BdError, FetchError, FormatError
from bdserver.vdev.device import BLOCK_SIZE, Segment, VirtualDevice, blocks_for
from bdserver.vdev.lazyblob import DEFAULT_FETCH_DEADLINE, LazyBlobSource
from bdserver.vdev.pools import FetchPools
from bdserver.vdev.prefetch import Prefetcher
from bdserver.vdev.sources import BytesSource

log = logging.getLogger(__name__)

FetchBlobRange = Callable[[str, int, int], bytes]  # (digest, offset, length) -> bytes

ANN_ROLE = "org.erofs.role"
ANN_CHUNK_INDEX_TARGET = "org.erofs.chunk-index.target"
ANN_BD_ROLE = "org.bdserver.role"
ANN_BD_MAPPED_BLKADDR = "org.bdserver.mapped-blkaddr"
ANN_BD_BLOCKS = "org.bdserver.blocks"
ROLE_DEVICE = "device"
ROLE_MERGED_META = "merged-meta"
MAX_META_SIZE = 1 << 30  # the merged metadata is held in memory; refuse absurd sizes
_UINT = re.compile(r"^[0-9]+$")


@dataclass(frozen=True)
class LayerDesc:
    """The descriptor fields we use (duck-typed from oci.model.Descriptor or a JSON dict)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, d: Any) -> "LayerDesc":
        if isinstance(d, Mapping):
            return cls(d.get("mediaType", ""), d.get("digest", ""), int(d.get("size", -1)), dict(d.get("annotations") or {}))
        return cls(d.media_type, d.digest, int(d.size), dict(d.annotations or {}))


@dataclass(frozen=True)
class LayerPlan:
    desc: LayerDesc
    start_block: int
    blocks: int | None  # None: derived from the index's uncompressed size
    standalone_index: LayerDesc | None = None


def _uint(ann: Mapping[str, str], key: str, what: str) -> int | None:
    v = ann.get(key)
    if v is None:
        return None
    if not _UINT.match(v):
        raise FormatError(f"{what}: {key} {v!r} is not an unsigned integer")
    return int(v)


def plan(layers_in: Sequence[Any]) -> tuple[LayerDesc, list[LayerPlan]]:
    """Validate the manifest's layer list; return (merged meta, device layers in order)."""
    layers = [LayerDesc.of(d) for d in layers_in]
    if not layers:
        raise FormatError("lazy image: no layers")
    for d in layers:
        parse_digest(d.digest)
        if d.size < 0:
            raise FormatError(f"layer {d.digest}: negative size")
    meta = layers[-1]
    if meta.media_type not in (MEDIA_TYPE_RAW, MEDIA_TYPE_ZSTD) or meta.annotations.get(ANN_ROLE):
        raise FormatError("lazy image: the last layer must be the merged metadata EROFS image")
    role = meta.annotations.get(ANN_BD_ROLE)
    if role not in (None, ROLE_MERGED_META):
        raise FormatError(f"lazy image: last layer has {ANN_BD_ROLE} {role!r}, expected {ROLE_MERGED_META!r}")
    if meta.size > MAX_META_SIZE:
        raise FormatError(f"lazy image: merged metadata of {meta.size} bytes is implausibly large")
    plans: list[LayerPlan] = []
    k = 0
    body = layers[:-1]
    while k < len(body):
        d = body[k]
        what = f"layer {k} ({d.digest})"
        if d.media_type == CHUNK_INDEX_MEDIA_TYPE:
            raise FormatError(f"{what}: a standalone chunk index must follow the layer it indexes")
        if d.media_type not in (MEDIA_TYPE_RAW, MEDIA_TYPE_ZSTD):
            raise FormatError(f"{what}: media type {d.media_type!r} is not an EROFS layer")
        if d.annotations.get(ANN_ROLE) != ROLE_DEVICE:
            raise FormatError(f"{what}: expected {ANN_ROLE}={ROLE_DEVICE!r} (a block source of the merged metadata)")
        start = _uint(d.annotations, ANN_BD_MAPPED_BLKADDR, what)
        if start is None:
            raise FormatError(f"{what}: no {ANN_BD_MAPPED_BLKADDR}: cannot place it in the device")
        blocks = _uint(d.annotations, ANN_BD_BLOCKS, what)
        standalone = None
        if k + 1 < len(body) and body[k + 1].media_type == CHUNK_INDEX_MEDIA_TYPE:
            standalone = body[k + 1]
            target = standalone.annotations.get(ANN_CHUNK_INDEX_TARGET)
            if target is not None and target != d.digest:
                raise FormatError(f"{what}: the following chunk-index layer targets {target}")
            k += 1
        if standalone is None and ANN_INDEX_RANGE not in d.annotations:
            raise FormatError(f"{what}: no chunk index (embedded or standalone): cannot read it lazily")
        plans.append(LayerPlan(d, start, blocks, standalone))
        k += 1
    return meta, plans


def _fetch_whole(fetch_range: FetchBlobRange, d: LayerDesc) -> bytes:
    try:
        data = fetch_range(d.digest, 0, d.size) if d.size else b""
    except BdError:
        raise
    except Exception as e:
        raise FetchError(f"{d.digest}: fetch failed: {e}") from e
    if len(data) != d.size:
        raise FetchError(f"{d.digest}: got {len(data)} of {d.size} bytes")
    verify_bytes(bytes(data), d.digest, what=f"blob {d.digest}")
    return bytes(data)


def load_meta(meta: LayerDesc, fetch_range: FetchBlobRange, cache: ChunkCache | None) -> bytes:
    """The merged metadata image bytes, verified (from the cache when there)."""
    blob = cache.get_whole(meta.digest) if cache is not None else None
    if blob is None:
        blob = _fetch_whole(fetch_range, meta)
        if cache is not None:
            try:
                cache.put_whole(meta.digest, blob)
            except (BdError, OSError) as e:
                log.warning("could not cache merged metadata %s: %s", meta.digest, e)
    if meta.media_type == MEDIA_TYPE_RAW:
        return blob
    reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
    try:
        data = reader.read(MAX_META_SIZE + 1)
    except zstandard.ZstdError as e:
        raise FormatError(f"merged metadata {meta.digest}: does not decompress: {e}") from e
    if len(data) > MAX_META_SIZE:
        raise FormatError(f"merged metadata {meta.digest}: decompresses to more than {MAX_META_SIZE} bytes")
    ud = meta.annotations.get(ANN_UNCOMPRESSED_DIGEST)
    if ud is not None:
        verify_bytes(data, ud, what=f"merged metadata {meta.digest} (uncompressed)")
    return data


def load_layer_index(p: LayerPlan, fetch_range: FetchBlobRange, cache: ChunkCache | None) -> tuple[ChunkIndex, str]:
    """The layer's verified chunk index, and the digest its payload is cached under."""
    d = p.desc
    name = f"layer {d.digest}"
    want = COMPRESSION_ZSTD if d.media_type == MEDIA_TYPE_ZSTD else COMPRESSION_NONE
    if p.standalone_index is not None:
        s = p.standalone_index
        payload = cache.get_whole(s.digest) if cache is not None else None
        if payload is None:
            payload = _fetch_whole(fetch_range, s)
            _cache_whole(cache, s.digest, payload)
        return index_from_payload(payload, data_end=d.size, compression=want, digest=None, name=name), s.digest
    idigest = d.annotations.get(ANN_INDEX_DIGEST)
    if idigest is not None and cache is not None:
        payload = cache.get_whole(idigest)
        if payload is not None:
            start, _ = parse_range(d.annotations[ANN_INDEX_RANGE], d.size)
            return index_from_payload(payload, data_end=start, compression=want, digest=None, name=name), idigest
    index = load_index(
        lambda off, n: fetch_range(d.digest, off, n), d.size, d.annotations, media_type=d.media_type, name=name
    )
    assert idigest is not None  # load_index requires it
    _cache_whole(cache, idigest, index.pack())
    return index, idigest


def _cache_whole(cache: ChunkCache | None, digest: str, data: bytes) -> None:
    if cache is None:
        return
    try:
        cache.put_whole(digest, data)
    except (BdError, OSError, ValueError) as e:
        log.warning("could not cache %s: %s", digest, e)


def layer_sources(
    plans: Sequence[LayerPlan],
    fetch_range: FetchBlobRange,
    cache: ChunkCache | None,
    pins: list[Any],
    *,
    pools: FetchPools,
    write_behind: bool = False,
    prefetch: Prefetcher | None = None,
    fetch_deadline: float = DEFAULT_FETCH_DEADLINE,
) -> list[LazyBlobSource]:
    """A lazy source per layer (its chunk index fetched and verified first, all layers at once);
    the pins of the cached index payloads are appended to `pins` (released by the caller)."""
    indexes = list(pools.demand.map(lambda p: load_layer_index(p, fetch_range, cache), plans))
    out: list[LazyBlobSource] = []
    try:
        for p, (index, idigest) in zip(plans, indexes):
            if cache is not None:
                pins.append(cache.pin(idigest))
            d = p.desc
            blob = ChunkedBlob(index, lambda off, n, dg=d.digest: fetch_range(dg, off, n), name=f"layer {d.digest}")
            out.append(LazyBlobSource(blob, CacheKey(d.digest, idigest), cache, pools, name=d.digest,
                                      write_behind=write_behind, prefetcher=prefetch, fetch_deadline=fetch_deadline))
    except BaseException:
        for src in out:
            src.close()
        raise
    return out


def device_of(meta_bytes: bytes, meta_blocks: int, layers: Sequence[tuple[int, int, LazyBlobSource]], *,
              meta_name: str, pins: Sequence[Any] = (), cache: ChunkCache | None = None) -> VirtualDevice:
    """The device ``[merged meta | layer at (start block, blocks) ...]``, once the merged metadata is
    checked against that very layout (erofs/check.py): what the kernel mounts is what was checked."""
    segs = [Segment(0, meta_blocks, BytesSource(meta_bytes, "merged-meta"), "merged-meta")]
    segs += [Segment(start, blocks, src, src.digest) for start, blocks, src in layers]
    geometry = DeviceGeometry(meta_blocks, tuple(ExpectedSlot(start, blocks) for start, blocks, _ in layers))
    check_image(meta_bytes, geometry, name=f"merged metadata {meta_name}")
    info = {"merged_meta": meta_name, "meta_blocks": meta_blocks, "layers": [
        {"digest": src.digest, "mapped_blkaddr": start, "blocks": blocks, "chunks": len(src.blob.index)}
        for start, blocks, src in layers]}
    return VirtualDevice(segs, on_close=[pin.release for pin in pins], info=info, cache=cache)


def open_lazy_image(
    manifest: Any,
    fetch_range: FetchBlobRange,
    cache: ChunkCache | None,
    *,
    pools: FetchPools,
    write_behind: bool = False,
    prefetch: Prefetcher | None = None,
    fetch_deadline: float = DEFAULT_FETCH_DEADLINE,
) -> VirtualDevice:
    """A VirtualDevice for a lazy image manifest (oci.model.Manifest, or its JSON as a dict).

    `fetch_range(digest, offset, length)` is the registry client's ranged blob read; `pools` the
    threads to fetch and store with (the caller's: see pools.FetchPools). Raises FormatError for a
    manifest that is not a bdserver lazy image, FetchError / IntegrityError when the metadata
    cannot be fetched or verified. `write_behind`: see layercache (off: every chunk handed out is
    already durable in the node cache). `prefetch`: fetch-ahead on misses, shared by the device's
    layers (off by default). `fetch_deadline`: the longest a read waits for a fetch it joined.
    """
    layers = manifest["layers"] if isinstance(manifest, Mapping) else manifest.layers
    meta, plans = plan(layers)
    pins: list[Any] = []
    sources: list[LazyBlobSource] = []
    try:
        # the merged metadata and every chunk index at once: one round trip, not two
        meta_fut = pools.demand.submit(load_meta, meta, fetch_range, cache)
        sources = layer_sources(plans, fetch_range, cache, pins, pools=pools, write_behind=write_behind,
                                prefetch=prefetch, fetch_deadline=fetch_deadline)
        meta_bytes = meta_fut.result()
        if cache is not None:
            pins.append(cache.pin(meta.digest))
        meta_blocks = _uint(meta.annotations, ANN_BD_BLOCKS, "merged metadata")
        if meta_blocks is None:
            meta_blocks = blocks_for(len(meta_bytes))
        placed = [(p.start_block, p.blocks if p.blocks is not None else blocks_for(src.size), src)
                  for p, src in zip(plans, sources)]
        # merged metadata from elsewhere reaches the kernel only checked (issue 8.4)
        return device_of(meta_bytes, meta_blocks, placed, meta_name=meta.digest, pins=pins, cache=cache)
    except BaseException:
        for src in sources:
            src.close()
        for pin in pins:
            pin.release()
        raise


def layout_fetcher(blobs_root: str) -> FetchBlobRange:
    """fetch_range over local `blobs/<algo>/<hex>` files (an OCI image layout's blob store)."""

    def fetch(digest: str, offset: int, length: int) -> bytes:
        algo, hexd = parse_digest(digest)
        path = os.path.join(blobs_root, algo, hexd)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise FetchError(f"{digest}: not in {blobs_root}") from e
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise FetchError(f"{digest}: short read at {offset}")
        return data

    return fetch


__all__ = ["FetchBlobRange", "LayerDesc", "LayerPlan", "device_of", "layer_sources", "layout_fetcher", "load_meta",
           "open_lazy_image", "plan", "BLOCK_SIZE"]
