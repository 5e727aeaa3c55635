"""The node's chunk cache: persistent, shared by every device and process, bounded, crash-safe.

    <root>/lock                           global lock: entry creation, eviction, prune
    <root>/chunks/<algo>/<hex>/{data,state,users}   per layer blob (see blobentry.py)
    <root>/whole/<algo>/<hex>             whole small blobs (the merged metadata layer)
    <root>/pins/*.json                    pins (see pins.py)

Keys are the layer blob's descriptor digest; what is stored is the VERIFIED uncompressed data, so
a hit costs one pread. Size accounting uses allocated blocks (sparse files count what they hold).
When a put pushes usage over the cap, least-recently-used unpinned chunks (and whole blobs) are
evicted down to a low watermark.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Sequence

from bdserver.cache.blobentry import BlobEntry, StaleEntry, create_entry, remove_entry, validate_offsets
from bdserver.cache.fsutil import allocated_bytes, fsync_dir, no_space_as_error
from bdserver.cache.pins import Pin, PinSet, load_pins, make_record
from bdserver.errors import FormatError, IntegrityError, NoSpaceError

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/var/lib/bdserver/cache"
DEFAULT_CAP = 10 << 30
LOW_WATERMARK = 0.9  # evict down to this fraction of the cap
_DIGEST_RE = re.compile(r"^(sha256):([0-9a-f]{64})$|^(sha512):([0-9a-f]{128})$")


def split_digest(digest: str) -> tuple[str, str]:
    """`algo:hex` -> (algo, hex); refuses anything that could escape the cache directory."""
    m = _DIGEST_RE.match(digest or "")
    if not m:
        raise ValueError(f"malformed digest {digest!r}")
    return (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    hit_bytes: int = 0
    put_chunks: int = 0
    put_bytes: int = 0
    whole_hits: int = 0
    whole_misses: int = 0
    evicted_chunks: int = 0
    evicted_bytes: int = 0
    evictions: int = 0
    nospace: int = 0


@dataclass(frozen=True)
class PruneResult:
    dropped_blobs: int
    freed_bytes: int
    used_bytes: int


class ChunkCache:
    """A chunk cache rooted at `root`. Thread-safe; several instances/processes may share a root.

    `clock` returns the last-use stamp (µs); tests inject a counter to order LRU deterministically.
    """

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        *,
        cap_bytes: int = DEFAULT_CAP,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.root = os.path.abspath(root)
        self.cap = cap_bytes
        self.clock = clock or (lambda: time.time_ns() // 1000)
        os.makedirs(self.root, mode=0o700, exist_ok=True)  # cached bytes are trusted: keep others out
        for sub in ("chunks", "whole", "pins"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._lockfd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self._glock = threading.RLock()
        self._gdepth = 0
        self._elock = threading.Lock()
        self._entries: dict[str, BlobEntry] = {}
        self._refs: dict[str, int] = {}
        self._stats = CacheStats()
        self._slock = threading.Lock()
        self._used = self._scan_usage()

    # ---- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _global(self) -> Iterator[None]:
        """Re-entrant: the flock is taken by the outermost holder only (an inner unlock would
        otherwise drop the outer holder's lock, flock being per open file)."""
        with self._glock:
            self._gdepth += 1
            try:
                if self._gdepth == 1:
                    fcntl.flock(self._lockfd, fcntl.LOCK_EX)
                yield
            finally:
                self._gdepth -= 1
                if self._gdepth == 0:
                    fcntl.flock(self._lockfd, fcntl.LOCK_UN)

    def _entry_dir(self, digest: str) -> str:
        algo, hexd = split_digest(digest)
        return os.path.join(self.root, "chunks", algo, hexd)

    def _whole_path(self, digest: str) -> str:
        algo, hexd = split_digest(digest)
        return os.path.join(self.root, "whole", algo, hexd)

    def _count(self, **kw: int) -> None:
        with self._slock:
            for k, v in kw.items():
                setattr(self._stats, k, getattr(self._stats, k) + v)

    def _open_existing(self, digest: str) -> BlobEntry | None:
        """The cached handle for `digest`, opening (and caching) it from disk if needed."""
        with self._elock:
            e = self._entries.get(digest)
            if e is not None:
                return e
        path = self._entry_dir(digest)
        if not os.path.exists(os.path.join(path, "state")):
            return None
        try:
            e = BlobEntry(path)
        except FileNotFoundError:
            return None
        except FormatError as err:
            log.warning("cache entry %s is damaged (%s); dropping it", digest, err)
            self.drop(digest)
            return None
        with self._elock:
            cur = self._entries.setdefault(digest, e)
        if cur is not e:
            e.close()
        return cur

    @contextmanager
    def _use(self, digest: str) -> Iterator[BlobEntry | None]:
        """A handle that stays open for the duration of the block (None: no such entry)."""
        e: BlobEntry | None = None
        for _ in range(5):
            cand = self._open_existing(digest)
            if cand is None or cand.begin():
                e = cand
                break
            with self._elock:  # closing under us: forget it and reopen
                if self._entries.get(digest) is cand:
                    del self._entries[digest]
        try:
            yield e
        finally:
            if e is not None:
                e.end()

    @contextmanager
    def _scan_entry(self, digest: str) -> Iterator[BlobEntry | None]:
        """For scans: the cached handle if there is one, else a temporary one closed afterwards
        (so scanning a big cache does not leave a handle open per blob)."""
        with self._elock:
            e = self._entries.get(digest)
        if e is not None and e.begin():
            try:
                yield e
            finally:
                e.end()
            return
        try:
            t: BlobEntry | None = BlobEntry(self._entry_dir(digest))
        except (FileNotFoundError, FormatError):
            t = None
        try:
            yield t
        finally:
            if t is not None:
                t.close()

    def _forget(self, digest: str, entry: BlobEntry | None = None) -> None:
        """Drop our handle (closed once its running operations finish)."""
        with self._elock:
            cur = self._entries.get(digest)
            if cur is not None and (entry is None or cur is entry):
                del self._entries[digest]
            else:
                cur = entry
        if cur is not None:
            cur.close()

    # ---- registration -------------------------------------------------------------------

    def register(self, digest: str, offsets: Sequence[int]) -> None:
        """Declare a blob's chunk geometry (n+1 fences: chunk starts and the total size) and
        hold it: its handle stays open until `release`. Creates the entry on first use; an
        existing entry with other geometry is replaced."""
        self._ensure(digest, offsets)
        with self._elock:
            self._refs[digest] = self._refs.get(digest, 0) + 1

    def release(self, digest: str) -> None:
        """Undo one `register`; the last release closes our handle (the cached data stays)."""
        with self._elock:
            n = self._refs.get(digest, 0) - 1
            if n > 0:
                self._refs[digest] = n
                return
            self._refs.pop(digest, None)
        self._forget(digest)

    def _ensure(self, digest: str, offsets: Sequence[int]) -> None:
        validate_offsets(offsets)
        e = self._open_existing(digest)
        if e is not None and e.matches(offsets):
            return
        with self._global():
            if e is not None:
                self._forget(digest, e)
                self._drop_locked(digest)
            path = self._entry_dir(digest)
            if os.path.exists(os.path.join(path, "state")):
                existing = self._open_existing(digest)
                if existing is not None and existing.matches(offsets):
                    return
                if existing is not None:
                    self._forget(digest, existing)
                self._drop_locked(digest)
            create_entry(path, offsets)
        self._open_existing(digest)

    def chunk_count(self, digest: str) -> int | None:
        with self._use(digest) as e:
            return None if e is None else e.n

    # ---- chunk reads and writes --------------------------------------------------------

    def has(self, digest: str, i: int) -> bool:
        with self._use(digest) as e:
            return e is not None and e.present(i)

    def read(self, digest: str, i: int, start: int = 0, length: int | None = None) -> bytes | None:
        """Bytes [start, start+length) of chunk i (whole chunk by default), or None on a miss.

        The hot path of every device read: no context managers, one uncontended lock each for
        the handle and the counters."""
        e = self._entries.get(digest)
        if e is None or not e.begin():
            with self._use(digest) as e2:
                return self._read_in(e2, i, start, length)
        try:
            return self._read_in(e, i, start, length)
        finally:
            e.end()

    def _read_in(self, e: BlobEntry | None, i: int, start: int, length: int | None) -> bytes | None:
        data = None
        if e is not None:
            if length is None:
                length = e.span(i)[1] - start
            data = e.read(i, start, length, self.clock())
        st = self._stats
        with self._slock:
            if data is None:
                st.misses += 1
            else:
                st.hits += 1
                st.hit_bytes += len(data)
        return data

    def get(self, digest: str, i: int) -> bytes | None:
        return self.read(digest, i)

    def put(self, digest: str, i: int, data: bytes) -> None:
        self.put_many(digest, [(i, data)])

    def put_many(
        self, digest: str, items: Sequence[tuple[int, bytes]], *, offsets: Sequence[int] | None = None
    ) -> None:
        """Store verified chunks. The blob must be registered, or `offsets` given to (re)create
        it (another process may have dropped it). NoSpaceError if the disk is full even after
        evicting; the cache state stays consistent either way (the chunks are just absent)."""
        for attempt in range(3):
            if offsets is not None and self._open_existing(digest) is None:
                self._ensure(digest, offsets)
            stale: BlobEntry | None = None
            nospace: NoSpaceError | None = None
            with self._use(digest) as e:
                if e is None:
                    raise KeyError(f"{digest} is not registered in the cache")
                try:
                    written = e.put_many(items, self.clock())
                except StaleEntry:
                    stale = e
                except NoSpaceError as err:
                    nospace = err
            if stale is not None:
                self._forget(digest, stale)
                if attempt == 2:
                    raise KeyError(f"{digest} was dropped from the cache while writing")
                continue
            if nospace is not None:
                self._count(nospace=1)
                if attempt == 2 or self.evict(int(self._used * 0.5)) == 0:
                    raise nospace
                continue
            self._count(put_chunks=len(items), put_bytes=written)
            with self._slock:
                self._used += written
                over = self._used > self.cap
            if over:
                self.evict()
            return

    # ---- whole blobs -------------------------------------------------------------------

    def get_whole(self, digest: str) -> bytes | None:
        """A whole small blob, re-verified against its digest (a damaged file is a miss)."""
        path = self._whole_path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self._count(whole_misses=1)
            return None
        algo, hexd = split_digest(digest)
        if hashlib.new(algo, data).hexdigest() != hexd:
            log.warning("cached blob %s is damaged; dropping it", digest)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            self._count(whole_misses=1)
            return None
        try:
            st = os.stat(path)
            now = time.time()
            if now - st.st_mtime > 1:
                os.utime(path, (now, now))
        except OSError:
            pass
        self._count(whole_hits=1)
        return data

    def put_whole(self, digest: str, data: bytes) -> None:
        """Store a whole blob after checking its digest (IntegrityError on mismatch)."""
        algo, hexd = split_digest(digest)
        if hashlib.new(algo, data).hexdigest() != hexd:
            raise IntegrityError(f"blob does not match {digest}; not cached")
        path = self._whole_path(digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            return
        tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
        try:
            with no_space_as_error(f"caching blob {digest}"):
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, path)
                fsync_dir(os.path.dirname(path))
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        with self._slock:
            self._used += len(data)
            over = self._used > self.cap
        if over:
            self.evict()

    # ---- pins ----------------------------------------------------------------------------

    def pin(self, digest: str, chunks: Iterable[int] | None = None) -> Pin:
        """Keep a whole blob (chunks=None) or some of its chunks from eviction until released."""
        split_digest(digest)
        return Pin(os.path.join(self.root, "pins"), make_record(digest, chunks))

    def pins(self) -> PinSet:
        return load_pins(os.path.join(self.root, "pins"))

    # ---- eviction, prune, usage ------------------------------------------------------------

    def _digests(self, kind: str) -> Iterator[tuple[str, str]]:
        base = os.path.join(self.root, kind)
        for algo in sorted(os.listdir(base)):
            d = os.path.join(base, algo)
            if not os.path.isdir(d):
                continue
            for name in sorted(os.listdir(d)):
                if ".tmp." in name:
                    continue
                digest = f"{algo}:{name}"
                try:
                    split_digest(digest)
                except ValueError:
                    continue
                yield digest, os.path.join(d, name)

    def _scan_usage(self) -> int:
        used = 0
        for _, path in self._digests("chunks"):
            used += allocated_bytes(os.path.join(path, "data")) + allocated_bytes(os.path.join(path, "state"))
        for _, path in self._digests("whole"):
            used += allocated_bytes(path)
        return used

    def usage(self) -> int:
        """Bytes the cache occupies on disk now (all processes' writes included)."""
        with self._global():
            used = self._scan_usage()
        with self._slock:
            self._used = used
        return used

    def evict(self, target: int | None = None) -> int:
        """Evict LRU unpinned chunks/blobs until usage <= target (default: the low watermark)."""
        if target is None:
            target = int(self.cap * LOW_WATERMARK)
        freed = 0
        with self._global():
            used = self._scan_usage()
            if used > target:
                pins = self.pins()
                cands: list[tuple[int, str, int, int]] = []  # (lastuse, digest, chunk|-1, bytes)
                for digest, _ in self._digests("chunks"):
                    with self._scan_entry(digest) as e:
                        if e is None:
                            continue
                        for i in e.present_indices():
                            if not pins.chunk(digest, i):
                                cands.append((e.lastuse(i), digest, i, e.span(i)[1]))
                for digest, path in self._digests("whole"):
                    if pins.whole(digest):
                        continue
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        continue
                    cands.append((int(st.st_mtime * 1e6), digest, -1, st.st_blocks * 512))
                cands.sort()
                victims: dict[str, list[int]] = {}
                need = used - target
                for lastuse, digest, i, nbytes in cands:
                    if need <= 0:
                        break
                    if i < 0:
                        try:
                            os.unlink(self._whole_path(digest))
                            freed += nbytes
                            self._count(evicted_bytes=nbytes)
                        except FileNotFoundError:
                            pass
                    else:
                        victims.setdefault(digest, []).append(i)
                    need -= nbytes
                for digest, idx in victims.items():
                    with self._scan_entry(digest) as e:
                        if e is None:
                            continue
                        try:
                            n = e.evict(idx)
                        except StaleEntry:
                            continue
                    freed += n
                    self._count(evicted_chunks=len(idx), evicted_bytes=n)
                self._count(evictions=1)
                used = self._scan_usage()
            with self._slock:
                self._used = used
        return freed

    def drop(self, digest: str) -> None:
        """Remove a blob's entries (chunks and whole) regardless of pins."""
        with self._global():
            self._forget(digest)
            self._drop_locked(digest)
            try:
                os.unlink(self._whole_path(digest))
            except FileNotFoundError:
                pass

    def _drop_locked(self, digest: str, *, only_unused: bool = False) -> bool:
        """Delete an entry's files (caller holds the global lock and has forgotten its own handle)."""
        return remove_entry(self._entry_dir(digest), only_unused=only_unused)

    def prune(self, keep: Callable[[str], bool] | None = None) -> PruneResult:
        """Housekeeping: drop blobs `keep` rejects and empty entries, unless pinned or open in
        another process/instance (a device still uses it); free the bytes of absent chunks
        (crash leftovers); remove old tmp files and dead pins; evict down to the low watermark."""
        before = self.usage()
        pins = self.pins()
        dropped = 0
        with self._global():
            for digest, path in list(self._digests("chunks")):
                with self._elock:
                    held = digest in self._refs
                if digest in pins.by_digest:
                    continue
                with self._scan_entry(digest) as e:
                    gone = e is None or (keep is not None and not keep(digest)) or not e.present_indices()
                    if not gone and e is not None:
                        try:
                            e.punch_absent()
                        except StaleEntry:
                            pass
                if gone and not held:
                    self._forget(digest)  # an idle handle of ours must not count as a user
                    if self._drop_locked(digest, only_unused=True):  # devices elsewhere keep theirs
                        dropped += 1
            for digest, path in list(self._digests("whole")):
                if keep is not None and not keep(digest) and not pins.whole(digest):
                    os.unlink(path)
                    dropped += 1
            for base, _, files in os.walk(self.root):
                for name in files:
                    if ".tmp." in name:
                        _unlink_if_old(os.path.join(base, name))
        self.evict()
        after = self.usage()
        return PruneResult(dropped, max(0, before - after), after)

    # ---- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._slock:
            d = asdict(self._stats)
            d["used_bytes"] = self._used
        d["cap_bytes"] = self.cap
        return d

    def close(self) -> None:
        with self._elock:
            entries = list(self._entries.values())
            self._entries.clear()
        for e in entries:
            e.close()
        if self._lockfd >= 0:
            os.close(self._lockfd)
            self._lockfd = -1

    def __enter__(self) -> "ChunkCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlink_if_old(path: str, age: float = 3600.0) -> None:
    """Temp files of live writers are young; only old ones are crash leftovers."""
    try:
        if time.time() - os.stat(path).st_mtime > age:
            os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
