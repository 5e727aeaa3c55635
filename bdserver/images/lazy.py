"""Open the trusted lazy image of a reference: ranged registry reads behind the node chunk cache.

tag -> source manifest -> (trust policy) lazy manifest -> `vdev.lazyimage.open_lazy_image`. The
lazy manifest and the image config are saved by digest (saved.py), so that a restarted daemon
re-attaches without a registry request when the cache holds the chunks it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from bdserver.errors import FormatError
from bdserver.images.saved import read_small_blob
from bdserver.images.services import NodeServices
from bdserver.images.starttrace import FoundTrace, find_trace, start_replay
from bdserver.oci.model import Manifest, parse_manifest
from bdserver.oci.store import ImageStore
from bdserver.vdev.device import VirtualDevice
from bdserver.vdev.lazyimage import open_lazy_image

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TRACE_WAIT_S = 5.0  # an attach waits this long for its start trace after the device is ready, then goes on


class ManifestMemo:
    """An ImageStore that remembers manifests fetched by digest (immutable content): the lazy
    manifest fetched while discovering it is not fetched again to open it."""

    def __init__(self, store: ImageStore) -> None:
        self._store = store
        self._memo: dict[str, tuple[bytes, Any]] = {}

    def get_manifest(self, ref: str) -> tuple[bytes, Any]:
        hit = self._memo.get(ref)
        if hit is not None:
            return hit
        data, desc = self._store.get_manifest(ref)  # the store verifies bytes against a digest ref
        digest = getattr(desc, "digest", "")
        if ref == digest:
            self._memo[digest] = (data, desc)
        return data, desc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@dataclass
class LazyDevice:
    device: VirtualDevice
    manifest: Manifest
    image_config: dict[str, Any]
    trace_note: str = ""  # the start trace replayed (or why none is)
    cleanup: list[Callable[[], None]] = field(default_factory=list)  # after the device is closed


def open_lazy(services: NodeServices, store: ImageStore | None, lazy_digest: str,
              open_store: Any, *, cold: bool = False, replay: bool = True) -> LazyDevice:
    """The device of lazy manifest ``lazy_digest``; ``store`` (or ``open_store()``, called only if
    something must be fetched) is where its blobs live.

    Only a fresh attach (``store`` given) looks for a start trace, and with ``replay`` replays
    the trusted one: its lookup, the image config, the merged metadata and the chunk indexes
    are fetched concurrently, and the replay starts before the device is handed to the kernel.
    ``cold``: a private, empty chunk cache, removed when the device closes (what a recording
    by `bdserver optimize` needs: every read is a miss, as on a fresh node)."""
    holder: dict[str, ImageStore] = {}

    def s() -> ImageStore:
        if "s" not in holder:
            holder["s"] = store if store is not None else open_store()
        return holder["s"]

    data = services.saved.get(lazy_digest, lambda: s().get_manifest(lazy_digest)[0])
    man = parse_manifest(data, OCI_MANIFEST)
    if not isinstance(man, Manifest):
        raise FormatError(f"lazy image {lazy_digest} is not an image manifest")
    pool = services.pools.demand
    config_fut = pool.submit(services.saved.image_config, man.config.digest,
                             lambda: read_small_blob(s(), man.config.digest, man.config.size))
    trace_fut = pool.submit(find_trace, services, store, lazy_digest) \
        if store is not None and replay and services.cfg.trace_replay else None
    noted: list[bool] = []

    def fetch_range(digest: str, offset: int, length: int) -> bytes:
        st = s()
        if not noted:  # sizes from the descriptors: no HEAD per blob before its ranged reads
            noted.append(True)
            note = getattr(st, "note_size", None)
            for d in man.layers if note is not None else ():
                if d.size >= 0:
                    note(d.digest, d.size)
        return st.read_range(digest, offset, length)

    cleanup: list[Callable[[], None]] = []
    cache = services.cache
    if cold:
        cache, drop = services.scratch_cache()
        cleanup.append(drop)
    try:
        dev = open_lazy_image(man, fetch_range, cache, pools=services.pools, prefetch=services.prefetcher(),
                              fetch_deadline=services.cfg.fetch_deadline_s)
    except BaseException:
        for fn in cleanup:
            fn()
        raise
    try:
        image_config = config_fut.result()
        found = FoundTrace(None)
        if trace_fut is not None:
            try:  # by now the lookup has had the config's, the metadata's and the indexes' round trips
                found = trace_fut.result(timeout=TRACE_WAIT_S)
            except TimeoutError:
                found = FoundTrace(None, note=f"no start trace (its lookup took longer than {TRACE_WAIT_S:g} s)")
        start_replay(services, dev, found)
    except BaseException:
        dev.close()
        for fn in cleanup:
            fn()
        raise
    return LazyDevice(dev, man, image_config, found.note, cleanup)
