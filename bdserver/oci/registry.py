"""The registry client (OCI distribution-spec v1.1 over httpx), an ImageStore per repository.

Built for the lazy read path as much as for push and pull: ``read_range`` is thread-safe and
called from many threads at once over a pooled connection set. Every request goes through the one
send path in transport.py (mirrors, retries honouring Retry-After, redirects without credentials,
auth flow, a total deadline per read), every body kept in memory is read within a cap
(responses.py), and a read that cannot complete surfaces as FetchError so that the device answers
EIO rather than hangs.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from typing import Any, BinaryIO, Iterable, Iterator, Mapping
from urllib.parse import quote

import httpx

from bdserver.digest import VerifyingReader, digest_of, hasher, is_digest, parse_digest, sha256_digest, verify_bytes
from bdserver.errors import FetchError, FormatError, IntegrityError, NotFoundError, RegistryError
from bdserver.oci import mediatypes as mt
from bdserver.oci.auth import CredentialStore, scope_for
from bdserver.oci.hosts import RegistryHost, load_hosts
from bdserver.oci.model import Descriptor, Index, detect_media_type, parse_manifest
from bdserver.oci.reference import Reference, parse_reference
from bdserver.oci.responses import (MAX_INDEX_BODY, MAX_MANIFEST_BODY, MAX_TAGS_BODY, Transient, content_type,
                                    error_text, read_body)
from bdserver.oci.transport import Answer, Deadline, RetryPolicy, Transport

__all__ = ["RegistryClient", "RegistryRepository", "RetryPolicy"]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 8 << 20
DEFAULT_FETCH_DEADLINE = 30.0  # seconds for one read, across its retries
SMALL_BLOB = 4 << 20  # open_blob of at most this many bytes is one fetch under the deadline
MAX_PAGES = 64  # of a tag list or a Referrers API answer
MAX_STREAM_RESUMES = 12  # a streamed blob resumes after this many broken bodies at most

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_SHARED: dict[tuple, "RegistryClient"] = {}
_SHARED_LOCK = threading.Lock()


class RegistryClient:
    """One registry host (and its mirrors): ``client.repository("a/b")`` for each repository.

    ``host`` is the registry as written in references (``127.0.0.1:5000``, ``docker.io``).
    ``fetch_deadline_s`` bounds each read (ranged blob reads, manifests, small blobs, listings)
    across its retries (None: no total bound). ``token_realms`` maps registry names to extra
    ``host[:port]`` token realms allowed to receive their credentials.
    """

    def __init__(
        self,
        host: str,
        *,
        credentials: CredentialStore | None = None,
        docker_config: str | None = None,
        hosts_dirs: list[str] | None = None,
        plain_http: bool | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        fetch_deadline_s: float | None = DEFAULT_FETCH_DEADLINE,
        token_realms: Mapping[str, Iterable[str]] | None = None,
        max_connections: int = 64,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        user_agent: str = "bdserver/0.1",
    ):
        self.host = host
        self.transport = Transport(host, load_hosts(host, hosts_dirs, plain_http),
                                   credentials or CredentialStore(docker_config), retry=retry or RetryPolicy(),
                                   timeout=timeout, max_connections=max_connections, user_agent=user_agent,
                                   token_realms=token_realms)
        self.send = self.transport.send
        self.fetch_deadline_s = fetch_deadline_s
        self.chunk_size = chunk_size
        self._warned_no_range = False

    @property
    def endpoints(self) -> list[RegistryHost]:
        return self.transport.endpoints

    @property
    def retry(self) -> RetryPolicy:
        return self.transport.retry

    @property
    def stats(self) -> dict[str, int]:
        return self.transport.stats

    def deadline(self) -> Deadline | None:
        """A fresh deadline for one read."""
        return Deadline.start(self.fetch_deadline_s)

    @classmethod
    def shared(cls, host: str, **kw: Any) -> "RegistryClient":
        """One client per (host, options) per process: connection pools and tokens are reused.

        The daemon's read path should use this so that every device on a registry shares a pool.
        """
        key = (host, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        with _SHARED_LOCK:
            c = _SHARED.get(key)
            if c is None:
                c = _SHARED[key] = cls(host, **kw)
            return c

    @classmethod
    def for_reference(cls, ref: Reference | str, **kw: Any) -> "RegistryClient":
        r = parse_reference(ref) if isinstance(ref, str) else ref
        if r.is_layout:
            raise FormatError(f"{r} is an OCI layout, not a registry reference")
        return cls(r.host, **kw)

    def repository(self, name: str) -> "RegistryRepository":
        return RegistryRepository(self, name)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def ping(self) -> None:
        """GET /v2/ (authenticating if challenged): raises if the registry is unusable."""
        self.send("resolve", "GET", "/", exhausted=RegistryError, deadline=self.deadline())


class RegistryRepository:
    """One repository of a registry, as an ImageStore plus ranged reads and referrers."""

    def __init__(self, client: RegistryClient, name: str, *, writer: bool = False):
        self.client = client
        self.name = name
        self.writer = writer  # True: every request goes to push-capable hosts (no mirrors)
        self._sizes: dict[str, int] = {}
        self.last_oci_subject: str | None = None  # OCI-Subject header of the last manifest PUT

    def for_writing(self) -> "RegistryRepository":
        """The same repository seen through push-capable hosts only.

        Read-modify-write (the referrers tag) and existence checks before a push must read what
        the upstream holds, not what a mirror cached.
        """
        if self.writer:
            return self
        r = RegistryRepository(self.client, self.name, writer=True)
        r._sizes = self._sizes
        return r

    def _cap(self, capability: str) -> str:
        return "push" if self.writer else capability

    def __repr__(self) -> str:
        return f"RegistryRepository({self.client.host}/{self.name})"

    def reference(self, tag: str | None = None, digest: str | None = None) -> Reference:
        return Reference(host=self.client.host, repository=self.name, tag=tag, digest=digest)

    def _pull_scope(self) -> tuple[str, ...]:
        return (scope_for(self.name, "pull"),)

    def _push_scope(self) -> tuple[str, ...]:
        return (scope_for(self.name, "pull,push"),)

    def _read(self, capability: str, method: str, path: str, **kw: Any) -> Answer:
        """A read: pull scope, RegistryError when retries run out, the client's deadline."""
        kw.setdefault("scopes", self._pull_scope())
        kw.setdefault("exhausted", RegistryError)
        return self.client.send(self._cap(capability), method, path, deadline=self.client.deadline(), **kw)

    # -- manifests -----------------------------------------------------------------------------

    def _manifest_path(self, ref: str) -> str:
        return f"/{self.name}/manifests/{quote(ref, safe=':')}"

    def resolve(self, ref: str) -> Descriptor:
        resp = self._read("resolve" if not is_digest(ref) else "pull", "HEAD", self._manifest_path(ref),
                          headers={"Accept": mt.MANIFEST_ACCEPT}).response
        digest = ref if is_digest(ref) else resp.headers.get("docker-content-digest")
        ctype = content_type(resp)
        size = resp.headers.get("content-length", "")
        if digest and is_digest(digest) and ctype in mt.MANIFEST_TYPES + mt.INDEX_TYPES and size.isdigit():
            return Descriptor(media_type=ctype, digest=digest, size=int(size))
        _, desc = self.get_manifest(ref)
        return desc

    def get_manifest(self, ref: str) -> tuple[bytes, Descriptor]:
        want = ref if is_digest(ref) else None

        def consume(resp: httpx.Response) -> tuple[bytes, Descriptor]:
            data = read_body(resp, MAX_MANIFEST_BODY, f"{self.client.host}/{self.name}: manifest {ref}")
            expected = want or resp.headers.get("docker-content-digest")
            if expected and is_digest(expected):
                try:
                    verify_bytes(data, expected, what=f"manifest {self.client.host}/{self.name}@{expected}")
                except IntegrityError as e:
                    raise Transient("manifest digest mismatch", e) from None
            digest = want or sha256_digest(data)
            ctype = content_type(resp)
            mtype = ctype if ctype in mt.MANIFEST_TYPES + mt.INDEX_TYPES else detect_media_type(data, ctype)
            return data, Descriptor(media_type=mtype, digest=digest, size=len(data))

        return self._read("resolve" if want is None else "pull", "GET", self._manifest_path(ref),
                          headers={"Accept": mt.MANIFEST_ACCEPT}, consume=consume).value

    def put_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> Descriptor:
        parsed = parse_manifest(data, media_type)
        digest = sha256_digest(data)
        resp = self.client.send(
            "push", "PUT", self._manifest_path(tag or digest), scopes=self._push_scope(),
            headers={"Content-Type": media_type}, content=data, expect=(200, 201, 202), exhausted=RegistryError,
        ).response
        got = resp.headers.get("docker-content-digest")
        if got and got != digest:
            raise IntegrityError(f"{self.client.host}/{self.name}: registry stored manifest as {got}, expected {digest}")
        self.last_oci_subject = resp.headers.get("oci-subject")
        at = parsed.artifact_type
        if at is None and parsed.subject is not None and hasattr(parsed, "config"):
            at = parsed.config.media_type  # type: ignore[union-attr]
        log.info("pushed manifest %s/%s@%s%s", self.client.host, self.name, digest, f" as {tag}" if tag else "")
        return Descriptor(media_type=media_type, digest=digest, size=len(data), artifact_type=at)

    def delete_manifest(self, digest: str) -> None:
        self.client.send("push", "DELETE", f"/{self.name}/manifests/{digest}",
                         scopes=(scope_for(self.name, "delete"), *self._push_scope()), expect=(200, 202),
                         exhausted=RegistryError)

    def _pages(self, capability: str, path: str, params: list[tuple[str, str]], limit: int, what: str,
               headers: dict[str, str] | None = None, expect: Iterable[int] = (200,)) -> Iterator[tuple[Answer, Any]]:
        """(answer, parsed JSON or None) per page, following ``Link: rel=next`` on the endpoint
        that answered, at most MAX_PAGES pages of at most ``limit`` bytes each."""
        url: httpx.URL | None = None
        ep: RegistryHost | None = None
        expect = tuple(expect)
        for _ in range(MAX_PAGES):
            def consume(resp: httpx.Response) -> Any:
                if resp.status_code != 200:
                    return None
                try:
                    return json.loads(read_body(resp, limit, what))
                except ValueError:
                    raise FormatError(f"{what} is not JSON") from None

            ans = self._read(capability, "GET", path, params=params if url is None else (), url=url, endpoint=ep,
                             headers=headers, expect=expect, consume=consume)
            yield ans, ans.value
            nxt = ans.response.links.get("next", {}).get("url")
            if not nxt or ans.response.status_code != 200:
                return
            url, ep = ans.response.url.join(nxt), ans.endpoint
        log.warning("%s: more than %d pages; the rest is ignored", what, MAX_PAGES)

    def list_tags(self) -> list[str]:
        tags: list[str] = []
        what = f"{self.client.host}/{self.name}: tag list"
        for _, body in self._pages("resolve", f"/{self.name}/tags/list", [("n", "1000")], MAX_TAGS_BODY, what):
            page = body.get("tags") if isinstance(body, dict) else None
            if page is not None and not (isinstance(page, list) and all(isinstance(t, str) for t in page)):
                raise FormatError(f"{what}: tags is not a list of strings")
            tags += page or []
        return tags

    # -- blobs ---------------------------------------------------------------------------------

    def _blob_path(self, digest: str) -> str:
        parse_digest(digest)
        return f"/{self.name}/blobs/{digest}"

    def has_blob(self, digest: str) -> bool:
        resp = self._read("pull", "HEAD", self._blob_path(digest), expect=(200, 404)).response
        cl = resp.headers.get("content-length", "")
        if resp.status_code == 200 and cl.isdigit():
            self._sizes[digest] = int(cl)
        return resp.status_code == 200

    def note_size(self, digest: str, size: int) -> None:
        """Tell the client a blob's size (from its descriptor) and save a HEAD before ranged reads."""
        self._sizes[digest] = size

    def blob_size(self, digest: str) -> int:
        s = self._sizes.get(digest)
        if s is not None:
            return s
        cl: str | None
        try:
            cl = self._read("pull", "HEAD", self._blob_path(digest)).response.headers.get("content-length")
        except NotFoundError:
            raise
        except RegistryError as e:
            # signed storage URLs often refuse HEAD: learn the size from a 1-byte ranged GET
            log.debug("HEAD of %s failed (%s); sizing with a ranged GET", digest, e)
            cl = None
        if cl is None:
            resp = self._read("pull", "GET", self._blob_path(digest), headers={"Range": "bytes=0-0"},
                              expect=(200, 206), consume=lambda r: None, redirect_key=f"{self.name}@{digest}",
                              exhausted=FetchError).response
            m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
            if m and m.group(3) != "*":
                cl = m.group(3)
            elif resp.status_code == 200:
                cl = resp.headers.get("content-length")
        if cl is None or not cl.isdigit():
            raise RegistryError(f"{self.client.host}/{self.name}: cannot learn the size of blob {digest}")
        self._sizes[digest] = int(cl)
        return int(cl)

    def read_range(self, digest: str, offset: int, length: int, size: int | None = None) -> bytes:
        """Bytes ``[offset, offset+length)`` of a blob, clamped to its size (b"" past the end).

        Unverified (a range cannot be checked against the blob digest; the chunk index checks
        chunks). Retries resets, 5xx, 429 and short bodies within the client's fetch deadline;
        FetchError when retries or the deadline run out. ``size`` (from the descriptor) saves the
        one HEAD per blob otherwise needed to clamp.
        """
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if size is not None:
            self._sizes.setdefault(digest, size)
        size = self.blob_size(digest)
        if length == 0 or offset >= size:
            return b""
        end = min(offset + length, size) - 1
        want = end - offset + 1

        def consume(resp: httpx.Response) -> bytes:
            if resp.status_code == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
                if not m or int(m.group(1)) != offset or int(m.group(2)) != end:
                    raise Transient(f"unexpected Content-Range {resp.headers.get('content-range')!r}")
                out = bytearray()
                for c in resp.iter_raw(1 << 16):  # to the end, so that the connection is reused
                    out += c
                    if len(out) > want:
                        raise Transient(f"more than the {want} bytes of the range")
                if len(out) != want:
                    raise Transient(f"short body: {len(out)} of {want} bytes")
                return bytes(out)
            # 200: the whole blob (proxies, some CDNs); skip to the range without keeping it
            if not self.client._warned_no_range:
                self.client._warned_no_range = True
                log.warning("%s ignores Range requests (HTTP 200 to a ranged GET of %s): lazy reads will "
                            "transfer whole blobs", self.client.host, digest)
            out = bytearray()
            pos = 0
            for c in resp.iter_raw(1 << 16):
                if pos + len(c) > offset and len(out) < want:
                    lo = max(0, offset - pos)
                    out += c[lo: lo + want - len(out)]
                pos += len(c)
                if len(out) >= want:
                    break  # the rest of the blob is not wanted: the connection is dropped
            if len(out) != want:
                raise Transient(f"short body: {len(out)} of {want} bytes")
            return bytes(out)

        data = self._read("pull", "GET", self._blob_path(digest), headers={"Range": f"bytes={offset}-{end}"},
                          expect=(200, 206), consume=consume, redirect_key=f"{self.name}@{digest}",
                          exhausted=FetchError).value
        self.client.stats["bytes"] += want
        return data

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        """A streaming, resuming (Range from the current offset) and digest-verifying reader.

        A blob of known size up to SMALL_BLOB (a config, a signature) is one fetch under the
        client's deadline; larger ones (whole layers) are bounded per request, not in total.
        """
        if size is not None:
            self._sizes[digest] = size
        deadline = self.client.deadline() if size is not None and size <= SMALL_BLOB else None
        return io.BufferedReader(VerifyingReader(_BlobStream(self, digest, size, deadline), digest, size),  # type: ignore[arg-type]
                                 buffer_size=1 << 20)

    def read_blob(self, digest: str, size: int | None = None) -> bytes:
        with self.open_blob(digest, size) as f:
            return f.read()

    def mount_blob(self, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; True if the registry linked the blob without an upload."""
        ans = self.client.send(
            "push", "POST", f"/{self.name}/blobs/uploads/", params=[("mount", digest), ("from", from_repo)],
            scopes=(*self._push_scope(), scope_for(from_repo, "pull")), expect=(201, 202), exhausted=RegistryError,
        )
        if ans.response.status_code == 201:
            log.info("mounted %s from %s into %s", digest, from_repo, self.name)
            return True
        loc = ans.response.headers.get("location")
        if loc:
            try:
                self.client.send("push", "DELETE", "", url=ans.response.url.join(loc), endpoint=ans.endpoint,
                                 scopes=self._push_scope(), expect=(200, 204, 404), attempts=1,
                                 exhausted=RegistryError)
            except RegistryError:
                pass
        return False

    def put_blob(self, fileobj: BinaryIO, digest: str, size: int, *, mount_from: str | None = None) -> bool:
        """Upload unless present (HEAD) or mountable; True if bytes were sent.

        Small blobs go in one PUT, large ones in PATCH chunks of ``client.chunk_size``. A failed
        upload restarts from the beginning when ``fileobj`` is seekable (bounded attempts).
        """
        parse_digest(digest)
        if self.for_writing().has_blob(digest):
            return False
        if mount_from and mount_from != self.name and self.mount_blob(digest, mount_from):
            return False
        start = fileobj.tell() if fileobj.seekable() else None
        tries = self.client.retry.attempts
        for i in range(tries):
            try:
                self._upload(fileobj, digest, size)
                self._sizes[digest] = size
                return True
            except FetchError as e:
                if start is None or i == tries - 1:
                    raise RegistryError(f"upload of {digest} to {self.client.host}/{self.name} failed: {e}") from None
                log.info("upload of %s failed (%s); restarting", digest, e)
                fileobj.seek(start)
                time.sleep(self.client.retry.delay(i))
        raise AssertionError("unreachable")

    def put_blob_bytes(self, data: bytes, digest: str | None = None) -> str:
        digest = digest or sha256_digest(data)
        self.put_blob(io.BytesIO(data), digest, len(data))
        return digest

    def _upload(self, fileobj: BinaryIO, digest: str, size: int) -> None:
        ans = self.client.send("push", "POST", f"/{self.name}/blobs/uploads/", scopes=self._push_scope(),
                               expect=(202,), exhausted=FetchError)
        ep = ans.endpoint
        loc = ans.response.headers.get("location")
        if not loc:
            raise RegistryError(f"{self.client.host}: upload started without a Location")
        url = ans.response.url.join(loc)
        h = hasher(digest)
        chunk = self.client.chunk_size
        body = b""
        off = 0
        if size <= chunk:
            body = _read_exact(fileobj, size)
            h.update(body)
            off = len(body)
        while off < size and size > chunk:
            data = _read_exact(fileobj, min(chunk, size - off))
            if not data:
                break
            h.update(data)
            resp = self.client.send(
                "push", "PATCH", "", url=url, endpoint=ep, scopes=self._push_scope(),
                headers={"Content-Type": "application/octet-stream", "Content-Range": f"{off}-{off + len(data) - 1}"},
                content=data, expect=(202,), attempts=1, exhausted=FetchError,
            ).response
            off += len(data)
            nl = resp.headers.get("location")
            if nl:
                url = resp.url.join(nl)
        extra = fileobj.read(1)
        got = digest_of(h)
        if got != digest or off != size or extra:
            raise IntegrityError(f"blob to upload does not match {digest} ({size} bytes): got {got}")
        resp = self.client.send(
            "push", "PUT", "", url=url.copy_add_param("digest", digest), endpoint=ep,  # keeps the critical ?_state=
            scopes=self._push_scope(), headers={"Content-Type": "application/octet-stream"}, content=body,
            expect=(201, 204, 404), exhausted=FetchError,
        ).response
        if resp.status_code == 404:
            # a retried PUT after the first one was committed: fine if the blob is there now
            if not self.for_writing().has_blob(digest):
                raise FetchError(f"upload session of {digest} vanished ({error_text(resp)})")

    # -- referrers -----------------------------------------------------------------------------

    def referrers_api(self, digest: str, artifact_type: str | None = None) -> Index | None:
        """The Referrers API answer, or None when the registry lacks it (404 and the like).

        Each page is read within MAX_INDEX_BODY, at most MAX_PAGES pages."""
        parse_digest(digest)
        params = [("artifactType", artifact_type)] if artifact_type else []
        what = f"{self.client.host}/{self.name}: referrers of {digest}"
        out: list[Descriptor] = []
        for ans, body in self._pages("pull", f"/{self.name}/referrers/{digest}", params, MAX_INDEX_BODY, what,
                                     headers={"Accept": mt.OCI_INDEX}, expect=(200, 400, 404, 405)):
            resp = ans.response
            if resp.status_code != 200 or not content_type(resp).startswith(mt.OCI_INDEX):
                return None
            try:
                idx = Index.from_dict(body, mt.OCI_INDEX)
            except (ValueError, FormatError):
                return None
            filtered = "artifacttype" in resp.headers.get("oci-filters-applied", "").lower()
            out += [d for d in idx.manifests if not artifact_type or filtered or d.artifact_type == artifact_type]
        if artifact_type:
            out = [d for d in out if d.artifact_type == artifact_type]
        return Index(manifests=out)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    parts = []
    left = n
    while left > 0:
        c = f.read(min(left, 1 << 20))
        if not c:
            break
        parts.append(c)
        left -= len(c)
    return b"".join(parts)


class _BlobStream(io.RawIOBase):
    """A blob body that survives resets and truncation by re-requesting from the current offset.

    Each (re)open goes through the one send path (mirrors, retries with Retry-After, redirects,
    auth); ``deadline`` (small blobs) bounds the whole read.
    """

    def __init__(self, repo: RegistryRepository, digest: str, size: int | None, deadline: Deadline | None):
        super().__init__()
        self.repo = repo
        self.digest = digest
        self.size = size
        self.deadline = deadline
        self.pos = 0
        self._resp: httpx.Response | None = None
        self._it: Iterator[bytes] | None = None
        self._buf = b""
        self._failures = 0

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}

        def aligned(resp: httpx.Response) -> None:
            if resp.status_code == 206 and self.pos:
                m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
                if not m or int(m.group(1)) != self.pos:
                    raise Transient("misaligned resume")

        repo = self.repo
        resp = repo.client.send(repo._cap("pull"), "GET", repo._blob_path(self.digest), scopes=repo._pull_scope(),
                                headers=headers, expect=(200, 206), consume=aligned, stream=True,
                                redirect_key=f"{repo.name}@{self.digest}", exhausted=FetchError,
                                deadline=self.deadline).response
        it = resp.iter_raw(1 << 16)
        if resp.status_code == 200:
            cl = resp.headers.get("content-length", "")
            if self.size is None and cl.isdigit():
                self.size = int(cl)
            it = self._skipping(it, self.pos)
        self._resp, self._it = resp, it

    @staticmethod
    def _skipping(it: Iterator[bytes], skip: int) -> Iterator[bytes]:
        for c in it:
            if skip >= len(c):
                skip -= len(c)
                continue
            yield c[skip:]
            skip = 0

    def readinto(self, b) -> int:  # type: ignore[override]
        client = self.repo.client
        while not self._buf:
            if self._it is None:
                if self.size is not None and self.pos >= self.size:
                    return 0
                self._open()
            try:
                self._buf = next(self._it)  # type: ignore[arg-type]
                client.stats["bytes"] += len(self._buf)
            except StopIteration:
                self._close_resp()
                if self.size is None or self.pos >= self.size:
                    return 0
                reason = f"body ended at {self.pos} of {self.size} bytes"
            except (httpx.TransportError, httpx.DecodingError) as e:
                self._close_resp()
                reason = f"{e.__class__.__name__} at offset {self.pos}"
            else:
                continue
            where = f"{client.host}/{self.repo.name}: blob {self.digest}"
            if self.deadline is not None and self.deadline.expired():
                raise FetchError(f"{where}: not complete within the {self.deadline.seconds:g} s fetch deadline "
                                 f"({reason}); the next read tries again")
            self._failures += 1
            if self._failures > MAX_STREAM_RESUMES:
                raise FetchError(f"{where}: {reason}; giving up after {MAX_STREAM_RESUMES} resumes")
            log.info("blob %s: %s; resuming", self.digest, reason)
            time.sleep(client.retry.delay(min(self._failures - 1, 6)))
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.pos += n
        return n

    def _close_resp(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self._resp, self._it = None, None

    def close(self) -> None:
        self._close_resp()
        super().close()
