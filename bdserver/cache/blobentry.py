"""One layer blob's cached chunks: a sparse data file and a persistent state file.

    <dir>/data    uncompressed image data, chunk i at its uncompressed offset; holes elsewhere
    <dir>/state   StateHeader | offsets u64[n+1] | words u32[n] | lastuse u64[n]

`words[i] = gen << 1 | present`. The rules that make this crash- and race-safe:

* put: remember the word w0, write the bytes, fdatasync the data file, THEN (under the lock) set
  the present bit only if the word is still w0. A crash at any point leaves the chunk absent (its
  bytes, torn or not, are never served) or present with durable bytes.
* evict: (under the lock) clear present, msync the state, punch the hole, THEN bump gen. A power
  cut can lose the hole but never leave "present" over a hole; a put that read w0 before the bump
  may have had its bytes punched, and its mark fails because the word changed.
* read (lock-free, any process): w1 = words[i]; pread; w2 = words[i]; the bytes count only if
  present and w1 == w2. Any eviction in between changes the word, and a re-put after it carries
  the bumped gen, so zeros from a freshly punched hole are never returned (seqlock).

Mutations take an in-process lock plus flock(state) for other processes. The state file is mmapped
MAP_SHARED, so every process sees the same words without system calls.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import shutil
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from bdserver.fsutil import fsync_dir, no_space_as_error, punch_hole
from bdserver.errors import FormatError

STATE_MAGIC = b"BDCHUNK1"
STATE_VERSION = 1


class StaleEntry(Exception):
    """The entry's files were removed (dropped by another process); reopen it."""


@dataclass(frozen=True)
class StateHeader:
    """First 64 bytes of a state file; `geometry` = sha256 of the packed offsets."""

    nchunks: int
    size: int
    geometry: bytes
    magic: bytes = STATE_MAGIC
    version: int = STATE_VERSION
    flags: int = 0

    STRUCT = struct.Struct("<8sIIQQ32s")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.magic, self.version, self.flags, self.nchunks, self.size, self.geometry)

    @classmethod
    def unpack(cls, data: bytes) -> "StateHeader":
        if len(data) < cls.STRUCT.size:
            raise FormatError("cache state: short header")
        magic, version, flags, n, size, geometry = cls.STRUCT.unpack_from(data, 0)
        if magic != STATE_MAGIC or version != STATE_VERSION or flags:
            raise FormatError("cache state: bad magic or version")
        return cls(n, size, geometry, magic, version, flags)

    @staticmethod
    def state_size(n: int) -> int:
        return StateHeader.STRUCT.size + 8 * (n + 1) + 4 * n + 8 * n


def pack_offsets(offsets: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(offsets)}Q", *offsets)


def geometry_of(offsets: Sequence[int]) -> bytes:
    return hashlib.sha256(pack_offsets(offsets)).digest()


def validate_offsets(offsets: Sequence[int]) -> None:
    if not offsets or offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError("chunk offsets must start at 0 and increase strictly (n+1 fences)")


def create_entry(path: str, offsets: Sequence[int]) -> None:
    """Create an entry directory atomically enough: data first, state renamed into place last.

    Called with the cache's global lock held, so two processes never race on creation.
    """
    validate_offsets(offsets)
    n = len(offsets) - 1
    os.makedirs(path, exist_ok=True)
    with no_space_as_error("creating a cache entry"):
        fd = os.open(os.path.join(path, "data"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != offsets[-1]:
                os.ftruncate(fd, offsets[-1])
        finally:
            os.close(fd)
        hdr = StateHeader(n, offsets[-1], geometry_of(offsets))
        body = hdr.pack() + pack_offsets(offsets) + b"\0" * (12 * n)
        tmp = os.path.join(path, f"state.tmp.{os.getpid()}.{threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, os.path.join(path, "state"))
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        fsync_dir(path)


class BlobEntry:
    """An open cache entry. Thread-safe; safe against other processes using the same files."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._ops = 0  # operations in progress (begin/end): close waits for them
        self._closing = False
        fds: list[int] = []
        try:
            # A shared lock on `users` for as long as we are open: prune leaves entries in use alone.
            self._ufd = os.open(os.path.join(path, "users"), os.O_RDWR | os.O_CREAT, 0o600)
            fds.append(self._ufd)
            fcntl.flock(self._ufd, fcntl.LOCK_SH)
            self._sfd = os.open(os.path.join(path, "state"), os.O_RDWR)
            fds.append(self._sfd)
            self._dfd = os.open(os.path.join(path, "data"), os.O_RDWR)
            fds.append(self._dfd)
            self._map(os.fstat(self._sfd).st_size)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _map(self, fsize: int) -> None:
        with open(os.path.join(self.path, "state"), "rb") as f:
            head = f.read(StateHeader.STRUCT.size)
        hdr = StateHeader.unpack(head)
        if fsize != StateHeader.state_size(hdr.nchunks):
            raise FormatError("cache state: size does not match its chunk count")
        self.header = hdr
        self.n = hdr.nchunks
        self._mm = mmap.mmap(self._sfd, fsize, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        base = StateHeader.STRUCT.size
        o_end = base + 8 * (self.n + 1)
        w_end = o_end + 4 * self.n
        mv = memoryview(self._mm)
        self.offsets: list[int] = list(mv[base:o_end].cast("Q"))
        self._words = mv[o_end:w_end].cast("I")
        self._lastuse = mv[w_end : w_end + 8 * self.n].cast("Q")
        self._mv = mv
        if geometry_of(self.offsets) != hdr.geometry or self.offsets[-1] != hdr.size:
            self._release_views()
            raise FormatError("cache state: geometry checksum mismatch")
        try:
            validate_offsets(self.offsets)
        except ValueError as e:
            self._release_views()
            raise FormatError(f"cache state: {e}") from e

    def _release_views(self) -> None:
        for name in ("_words", "_lastuse", "_mv"):
            v = getattr(self, name, None)
            if v is not None:
                v.release()
        self._mm.close()

    def begin(self) -> bool:
        """Start an operation; False if the entry is closing (reopen it instead).

        Closing a handle under a running pread would let the fd number be reused by another
        file, so close() only marks the entry and the last operation out closes it.
        """
        with self._lock:
            if self._closing:
                return False
            self._ops += 1
            return True

    def end(self) -> None:
        with self._lock:
            self._ops -= 1
            if self._closing and self._ops == 0:
                self._close_now()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if self._ops == 0:
                self._close_now()

    def _close_now(self) -> None:
        if self._sfd < 0:
            return
        self._release_views()
        os.close(self._sfd)
        os.close(self._dfd)
        os.close(self._ufd)
        self._sfd = self._dfd = self._ufd = -1

    # ---- geometry ---------------------------------------------------------------------

    def span(self, i: int) -> tuple[int, int]:
        return self.offsets[i], self.offsets[i + 1] - self.offsets[i]

    def matches(self, offsets: Sequence[int]) -> bool:
        return len(offsets) == self.n + 1 and geometry_of(offsets) == self.header.geometry

    # ---- reads (lock-free) ------------------------------------------------------------

    def present(self, i: int) -> bool:
        return bool(self._words[i] & 1)

    def present_indices(self) -> list[int]:
        w = self._words
        return [i for i in range(self.n) if w[i] & 1]

    def lastuse(self, i: int) -> int:
        return self._lastuse[i]

    def read(self, i: int, start: int, length: int, now: int) -> bytes | None:
        """Bytes [start, start+length) of chunk i, or None when the chunk is not (stably) present."""
        w1 = self._words[i]
        if not w1 & 1:
            return None
        off, clen = self.span(i)
        if start < 0 or length < 0 or start + length > clen:
            raise ValueError(f"range [{start}, {start + length}) outside chunk {i} of {clen} bytes")
        data = os.pread(self._dfd, length, off + start)
        if self._words[i] != w1 or len(data) != length:
            return None
        if self._lastuse[i] < now:
            self._lastuse[i] = now
        return data

    # ---- mutations --------------------------------------------------------------------

    @contextmanager
    def _mutating(self) -> Iterator[None]:
        with self._lock:
            if self._sfd < 0:
                raise StaleEntry(self.path)
            fcntl.flock(self._sfd, fcntl.LOCK_EX)
            try:
                if os.fstat(self._sfd).st_nlink == 0:
                    raise StaleEntry(self.path)
                yield
            finally:
                fcntl.flock(self._sfd, fcntl.LOCK_UN)

    def put_many(self, items: Iterable[tuple[int, bytes]], now: int) -> int:
        """Store chunks durably, then mark them present. Returns the bytes newly marked present.

        The word seen before writing must be unchanged when marking: every hole punch bumps the
        generation of the chunks it covers AFTER punching (under the state lock), so a put whose
        bytes may have been punched finds a changed word and leaves the chunk absent.
        """
        if self._sfd < 0:
            raise StaleEntry(self.path)
        todo = []
        for i, data in items:
            off, clen = self.span(i)
            if len(data) != clen:
                raise ValueError(f"chunk {i} is {clen} bytes, got {len(data)}")
            w0 = self._words[i]
            if not w0 & 1:
                todo.append((i, off, data, w0))
        if not todo:
            return 0
        with no_space_as_error(f"caching {len(todo)} chunk(s)"):
            for _, off, data, _ in todo:
                view = memoryview(data)
                pos = off
                while view:
                    n = os.pwrite(self._dfd, view, pos)
                    view = view[n:]
                    pos += n
            os.fdatasync(self._dfd)
        written = 0
        with self._mutating():
            self._before_mark_present()
            for i, _, data, w0 in todo:
                if self._words[i] == w0:
                    self._words[i] = (w0 | 1) & 0xFFFFFFFF
                    self._lastuse[i] = max(self._lastuse[i], now)
                    written += len(data)
        return written

    def _before_mark_present(self) -> None:
        """Hook for crash tests (the data is durable, presence not yet set)."""

    def _punch(self, idx: list[int]) -> None:
        """Punch the chunks' bytes, then bump their generation (caller holds the state lock).

        Order matters for puts racing us (see put_many): the bump comes after the punch.
        """
        for a, b in _runs(idx):
            if not punch_hole(self._dfd, self.offsets[a], self.offsets[b + 1] - self.offsets[a]):
                break  # no hole punching here: space comes back when the entry is dropped
        for i in idx:
            self._words[i] = (((self._words[i] >> 1) + 1) << 1) & 0xFFFFFFFF

    def evict(self, indices: Iterable[int]) -> int:
        """Clear presence, flush the state, punch the bytes, bump generations. Returns bytes freed."""
        freed = []
        with self._mutating():
            for i in sorted(set(indices)):
                w = self._words[i]
                if w & 1:
                    self._words[i] = w & ~1 & 0xFFFFFFFF  # readers racing us see the word change
                    freed.append(i)
            if not freed:
                return 0
            self._mm.flush()  # "absent" is on disk before the hole: a power cut cannot undo it
            self._punch(freed)
        return sum(self.span(i)[1] for i in freed)

    def punch_absent(self) -> None:
        """Free bytes of chunks that are not present (left behind by crashes or failed puts)."""
        with self._mutating():
            self._punch([i for i in range(self.n) if not self._words[i] & 1])


def remove_entry(path: str, *, only_unused: bool) -> bool:
    """Delete an entry's files; False (and nothing done) if `only_unused` and someone has it open.

    Holds the state lock while deleting so no put is between its check and its mark; puts that
    come later see the state unlinked (StaleEntry) and reopen.
    """
    if not os.path.isdir(path):
        return True
    ufd = -1
    if only_unused:
        ufd = os.open(os.path.join(path, "users"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(ufd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(ufd)
            return False
    try:
        try:
            sfd = os.open(os.path.join(path, "state"), os.O_RDWR)
        except FileNotFoundError:
            sfd = -1
        try:
            if sfd >= 0:
                fcntl.flock(sfd, fcntl.LOCK_EX)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            if sfd >= 0:
                os.close(sfd)
    finally:
        if ufd >= 0:
            os.close(ufd)
    return True


def _runs(sorted_idx: list[int]) -> list[tuple[int, int]]:
    """Group sorted indices into inclusive runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for i in sorted_idx:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
