"""The node's chunk cache: persistent, shared by every device and process, bounded, crash-safe.

    <root>/lock                           global lock: entry creation, eviction, prune
    <root>/entries/<algo>/<hex>/<index algo>-<index hex>/{data,state,users}
                                          one layer blob as verified by one chunk index (keys.py,
                                          blobentry.py)
    <root>/whole/<algo>/<hex>             whole small blobs (merged metadata, chunk-index payloads),
                                          content-addressed and re-verified on every read
    <root>/pins/*.json                    pins (see pins.py)
    <root>/chunks/                        the old format, keyed by blob digest alone: nothing says
                                          what verified those bytes, so they are never read; each
                                          entry is deleted once no process has it open

What is stored is the VERIFIED uncompressed data, so a hit costs one pread. Size accounting uses
allocated blocks (sparse files count what they hold). When a put pushes usage over the cap,
least-recently-used unpinned chunks are evicted down to a low watermark; whole blobs go only when
no unpinned chunk is left (they are small, and a device cannot even be opened without them).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Sequence

from bdserver.cache.blobentry import BlobEntry, StaleEntry, create_entry, remove_entry, validate_offsets
from bdserver.fsutil import allocated_bytes, fsync_dir, no_space_as_error
from bdserver.cache.keys import CacheKey, split_digest
from bdserver.cache.pins import Pin, PinSet, load_pins, make_record
from bdserver.errors import FormatError, IntegrityError, NoSpaceError

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/var/lib/bdserver/cache"
DEFAULT_CAP = 10 << 30
LOW_WATERMARK = 0.9  # evict down to this fraction of the cap
ENTRIES = "entries"
LEGACY = "chunks"


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

    Chunk entries are named by a `CacheKey` (layer blob + the chunk index that verified it);
    whole blobs by their own digest. `clock` returns the last-use stamp (µs); tests inject a
    counter to order LRU deterministically.
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
        for sub in (ENTRIES, "whole", "pins"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._lockfd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self._glock = threading.RLock()
        self._gdepth = 0
        self._elock = threading.Lock()
        self._entries: dict[CacheKey, BlobEntry] = {}
        self._refs: dict[CacheKey, int] = {}
        self._stats = CacheStats()
        self._slock = threading.Lock()
        with self._global():
            self._discard_legacy()
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

    def _entry_dir(self, key: CacheKey) -> str:
        return os.path.join(self.root, ENTRIES, key.relpath())

    def _whole_path(self, digest: str) -> str:
        algo, hexd = split_digest(digest)
        return os.path.join(self.root, "whole", algo, hexd)

    def _count(self, **kw: int) -> None:
        with self._slock:
            for k, v in kw.items():
                setattr(self._stats, k, getattr(self._stats, k) + v)

    def _open_existing(self, key: CacheKey) -> BlobEntry | None:
        """The cached handle for `key`, opening (and caching) it from disk if needed."""
        with self._elock:
            e = self._entries.get(key)
            if e is not None:
                return e
        path = self._entry_dir(key)
        if not os.path.exists(os.path.join(path, "state")):
            return None
        try:
            e = BlobEntry(path)
        except FileNotFoundError:
            return None
        except FormatError as err:
            log.warning("cache entry %s is damaged (%s); dropping it", key, err)
            self.drop(key)
            return None
        with self._elock:
            cur = self._entries.setdefault(key, e)
        if cur is not e:
            e.close()
        return cur

    @contextmanager
    def _use(self, key: CacheKey) -> Iterator[BlobEntry | None]:
        """A handle that stays open for the duration of the block (None: no such entry)."""
        e: BlobEntry | None = None
        for _ in range(5):
            cand = self._open_existing(key)
            if cand is None or cand.begin():
                e = cand
                break
            with self._elock:  # closing under us: forget it and reopen
                if self._entries.get(key) is cand:
                    del self._entries[key]
        try:
            yield e
        finally:
            if e is not None:
                e.end()

    @contextmanager
    def _scan_entry(self, key: CacheKey) -> Iterator[BlobEntry | None]:
        """For scans: the cached handle if there is one, else a temporary one closed afterwards
        (so scanning a big cache does not leave a handle open per blob)."""
        with self._elock:
            e = self._entries.get(key)
        if e is not None and e.begin():
            try:
                yield e
            finally:
                e.end()
            return
        try:
            t: BlobEntry | None = BlobEntry(self._entry_dir(key))
        except (FileNotFoundError, FormatError):
            t = None
        try:
            yield t
        finally:
            if t is not None:
                t.close()

    def _forget(self, key: CacheKey, entry: BlobEntry | None = None) -> None:
        """Drop our handle (closed once its running operations finish)."""
        with self._elock:
            cur = self._entries.get(key)
            if cur is not None and (entry is None or cur is entry):
                del self._entries[key]
            else:
                cur = entry
        if cur is not None:
            cur.close()

    # ---- registration -------------------------------------------------------------------

    def register(self, key: CacheKey, offsets: Sequence[int]) -> None:
        """Declare an entry's chunk geometry (n+1 fences: chunk starts and the total size) and
        hold it: its handle stays open until `release`. Creates the entry on first use.

        The key's index fixes the geometry, so other offsets under the same key mean a damaged
        entry: it is replaced if no one uses it, else FormatError (never pulled from under a
        live device)."""
        self._ensure(key, offsets)
        with self._elock:
            self._refs[key] = self._refs.get(key, 0) + 1

    def release(self, key: CacheKey) -> None:
        """Undo one `register`; the last release closes our handle (the cached data stays)."""
        with self._elock:
            n = self._refs.get(key, 0) - 1
            if n > 0:
                self._refs[key] = n
                return
            self._refs.pop(key, None)
        self._forget(key)

    def _ensure(self, key: CacheKey, offsets: Sequence[int]) -> None:
        validate_offsets(offsets)
        e = self._open_existing(key)
        if e is not None and e.matches(offsets):
            return
        with self._global():
            existing = e if e is not None else self._open_existing(key)  # another process may have made it
            if existing is not None:
                if existing.matches(offsets):
                    return
                with self._elock:
                    held = key in self._refs
                if not held:
                    self._forget(key, existing)
                if held or not self._drop_locked(key, only_unused=True):
                    raise FormatError(f"cache entry {key} has another chunk layout and is in use; not replaced")
            create_entry(self._entry_dir(key), offsets)
        self._open_existing(key)

    def chunk_count(self, key: CacheKey) -> int | None:
        with self._use(key) as e:
            return None if e is None else e.n

    # ---- chunk reads and writes --------------------------------------------------------

    def has(self, key: CacheKey, i: int) -> bool:
        with self._use(key) as e:
            return e is not None and e.present(i)

    def read(self, key: CacheKey, i: int, start: int = 0, length: int | None = None) -> bytes | None:
        """Bytes [start, start+length) of chunk i (whole chunk by default), or None on a miss.

        The hot path of every device read: no context managers, one uncontended lock each for
        the handle and the counters."""
        e = self._entries.get(key)
        if e is None or not e.begin():
            with self._use(key) as e2:
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

    def get(self, key: CacheKey, i: int) -> bytes | None:
        return self.read(key, i)

    def put(self, key: CacheKey, i: int, data: bytes) -> None:
        self.put_many(key, [(i, data)])

    def put_many(
        self, key: CacheKey, items: Sequence[tuple[int, bytes]], *, offsets: Sequence[int] | None = None
    ) -> None:
        """Store verified chunks. The entry must be registered, or `offsets` given to (re)create
        it (another process may have dropped it). NoSpaceError if the disk is full even after
        evicting; the cache state stays consistent either way (the chunks are just absent)."""
        for attempt in range(3):
            if offsets is not None and self._open_existing(key) is None:
                self._ensure(key, offsets)
            stale: BlobEntry | None = None
            nospace: NoSpaceError | None = None
            with self._use(key) as e:
                if e is None:
                    raise KeyError(f"{key} is not registered in the cache")
                try:
                    written = e.put_many(items, self.clock())
                except StaleEntry:
                    stale = e
                except NoSpaceError as err:
                    nospace = err
            if stale is not None:
                self._forget(key, stale)
                if attempt == 2:
                    raise KeyError(f"{key} was dropped from the cache while writing")
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

    def pin(self, what: CacheKey | str, chunks: Iterable[int] | None = None) -> Pin:
        """Keep an entry's chunks (all, or those listed) or a whole blob (by its digest) from
        eviction until released."""
        if isinstance(what, CacheKey):
            name = what.name
        else:
            split_digest(what)
            name = what
        return Pin(os.path.join(self.root, "pins"), make_record(name, chunks))

    def pins(self) -> PinSet:
        return load_pins(os.path.join(self.root, "pins"))

    # ---- eviction, prune, usage ------------------------------------------------------------

    def _keys(self) -> Iterator[CacheKey]:
        base = os.path.join(self.root, ENTRIES)
        for algo, hexd, bdir in _digest_dirs(base):
            for leaf in _listdir(bdir):
                key = CacheKey.from_parts(algo, hexd, leaf) if ".tmp." not in leaf else None
                if key is not None:
                    yield key

    def _wholes(self) -> Iterator[tuple[str, str]]:
        for algo, hexd, path in _digest_dirs(os.path.join(self.root, "whole"), files=True):
            yield f"{algo}:{hexd}", path

    def _discard_legacy(self) -> None:
        """Delete old-format entries (keyed by blob digest alone) that no process has open; an
        older daemon still running keeps its own until it closes them (caller holds the lock)."""
        base = os.path.join(self.root, LEGACY)
        if not os.path.isdir(base):
            return
        for _, _, path in list(_digest_dirs(base)):
            if remove_entry(path, only_unused=True):
                log.info("cache: discarded old-format entry %s (not bound to a chunk index)", path)
        for d in [os.path.join(base, a) for a in os.listdir(base)] + [base]:
            try:
                os.rmdir(d)
            except OSError:
                pass

    def _scan_usage(self) -> int:
        used = 0
        for key in self._keys():
            path = self._entry_dir(key)
            used += allocated_bytes(os.path.join(path, "data")) + allocated_bytes(os.path.join(path, "state"))
        legacy = os.path.join(self.root, LEGACY)
        if os.path.isdir(legacy):
            for _, _, path in _digest_dirs(legacy):
                used += allocated_bytes(os.path.join(path, "data")) + allocated_bytes(os.path.join(path, "state"))
        for _, path in self._wholes():
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
        """Evict unpinned chunks, least recently used first, then unpinned whole blobs, until
        usage <= target (default: the low watermark)."""
        if target is None:
            target = int(self.cap * LOW_WATERMARK)
        freed = 0
        with self._global():
            self._discard_legacy()
            used = self._scan_usage()
            if used > target:
                pins = self.pins()
                # (whole?, lastuse, key or digest, chunk or -1, bytes): chunks before whole blobs
                cands: list[tuple[bool, int, CacheKey | str, int, int]] = []
                for key in self._keys():
                    with self._scan_entry(key) as e:
                        if e is None:
                            continue
                        for i in e.present_indices():
                            if not pins.chunk(key.name, i):
                                cands.append((False, e.lastuse(i), key, i, e.span(i)[1]))
                for digest, path in self._wholes():
                    if pins.whole(digest):
                        continue
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        continue
                    cands.append((True, int(st.st_mtime * 1e6), digest, -1, st.st_blocks * 512))
                cands.sort(key=lambda c: (c[0], c[1]))
                victims: dict[CacheKey, list[int]] = {}
                need = used - target
                for _, _, what, i, nbytes in cands:
                    if need <= 0:
                        break
                    if isinstance(what, CacheKey):
                        victims.setdefault(what, []).append(i)
                    else:
                        try:
                            os.unlink(self._whole_path(what))
                            freed += nbytes
                            self._count(evicted_bytes=nbytes)
                        except FileNotFoundError:
                            pass
                    need -= nbytes
                for key, idx in victims.items():
                    with self._scan_entry(key) as e:
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

    def drop(self, what: CacheKey | str) -> None:
        """Remove an entry (a CacheKey), or everything cached for a blob digest (every entry of
        that blob and the whole blob), regardless of pins."""
        with self._global():
            if isinstance(what, CacheKey):
                keys = [what]
            else:
                keys = [k for k in self._keys() if k.blob == what]
                try:
                    os.unlink(self._whole_path(what))
                except FileNotFoundError:
                    pass
            for key in keys:
                self._forget(key)
                self._drop_locked(key)

    def _drop_locked(self, key: CacheKey, *, only_unused: bool = False) -> bool:
        """Delete an entry's files (caller holds the global lock and has forgotten its own handle)."""
        path = self._entry_dir(key)
        done = remove_entry(path, only_unused=only_unused)
        if done:
            try:
                os.rmdir(os.path.dirname(path))  # the blob's directory, once its last entry is gone
            except OSError:
                pass
        return done

    def prune(self, keep: Callable[[str], bool] | None = None) -> PruneResult:
        """Housekeeping: drop entries and whole blobs whose blob digest `keep` rejects, and empty
        entries, unless pinned or open in another process/instance (a device still uses it);
        free the bytes of absent chunks (crash leftovers); remove old tmp files, dead pins and
        old-format entries; evict down to the low watermark."""
        before = self.usage()
        pins = self.pins()
        dropped = 0
        with self._global():
            self._discard_legacy()
            for key in list(self._keys()):
                with self._elock:
                    held = key in self._refs
                if key.name in pins.by_digest:
                    continue
                with self._scan_entry(key) as e:
                    gone = e is None or (keep is not None and not keep(key.blob)) or not e.present_indices()
                    if not gone and e is not None:
                        try:
                            e.punch_absent()
                        except StaleEntry:
                            pass
                if gone and not held:
                    self._forget(key)  # an idle handle of ours must not count as a user
                    if self._drop_locked(key, only_unused=True):  # devices elsewhere keep theirs
                        dropped += 1
            for digest, path in list(self._wholes()):
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


def _digest_dirs(base: str, *, files: bool = False) -> Iterator[tuple[str, str, str]]:
    """(algo, hex, path) of every `<base>/<algo>/<hex>` directory (or file, with `files`)."""
    for algo in _listdir(base):
        d = os.path.join(base, algo)
        if not os.path.isdir(d):
            continue
        for name in _listdir(d):
            path = os.path.join(d, name)
            if ".tmp." in name or os.path.isdir(path) == files:
                continue
            try:
                split_digest(f"{algo}:{name}")
            except ValueError:
                continue
            yield algo, name, path


def _listdir(path: str) -> list[str]:
    """Sorted names; empty when another process removed the directory meanwhile."""
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _unlink_if_old(path: str, age: float = 3600.0) -> None:
    """Temp files of live writers are young; only old ones are crash leftovers."""
    try:
        if time.time() - os.stat(path).st_mtime > age:
            os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
