"""Which lazy images a node may use, and finding the trusted one for a reference.

Anyone who can push to a repository can attach a referrer, so a lazy image is used only if the
policy accepts it: its digest is in an allow-list, or this node converted it itself (a record
under the state dir), or a configured key signed it for this source (signing.py), or (only where
the node admin opts in) the reference pins the lazy manifest's digest. The ``[trust]`` config
table is read by `TrustPolicy.from_config`, which fails closed. Discovery failures raise
NoLazyImageError, which callers treat as "fall back" (convert here or pull).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bdserver.errors import BdError, ConfigError, FormatError, NoLazyImageError, NotFoundError
from bdserver.oci import mediatypes as mt
from bdserver.digest import is_digest, parse_digest
from bdserver.fsutil import atomic_write
from bdserver.oci.model import Descriptor, Index, Manifest, Platform, parse_manifest
from bdserver.oci.reference import Reference, parse_reference
from bdserver.oci.referrers import list_referrers
from bdserver.oci.store import ImageStore

log = logging.getLogger(__name__)

MAX_SIGNATURE_CANDIDATES = 64  # lazy images whose signatures are looked up (one listing each) per subject
MAX_NAMED = 5  # untrusted digests named in an error message
DEFAULT_STATE_DIR = Path(os.environ.get("BDSERVER_STATE_DIR", "/var/lib/bdserver"))


def _read_digest_list(path: Path) -> set[str]:
    out: set[str] = set()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not is_digest(line):
            raise FormatError(f"{path}:{n}: not a digest: {line!r}")
        out.add(line)
    return out


def _config_list(table: Mapping[str, Any], key: str) -> list[str]:
    v = table.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"[trust] {key} must be a list of non-empty strings, not {v!r}")
    return list(v)


def _config_bool(table: Mapping[str, Any], key: str, default: bool) -> bool:
    v = table.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"[trust] {key} must be true or false, not {v!r}")
    return v


@dataclass
class TrustPolicy:
    """Accept a lazy image if allow-listed, converted on this node, signed by a configured key, or
    (opt-in) pinned by the reference.

    ``state_dir/trust/allowed`` (one digest a line, ``#`` comments) and ``allow_files`` extend
    ``allowed``; ``state_dir/trust/converted/<hex>.json`` records what this node produced;
    ``state_dir/trust/keys/*.pem`` extend ``public_keys``. ``trust_converted_here`` can be switched
    off for nodes that share a state dir they do not trust. ``trust_pinned_reference`` is off by
    default: on a shared node the reference is written by a pod author, and naming a digest says
    which bytes they want, not that the node admin vouches for them.
    """

    state_dir: Path = DEFAULT_STATE_DIR
    allowed: set[str] = field(default_factory=set)
    allow_files: list[Path] = field(default_factory=list)
    trust_converted_here: bool = True
    trust_pinned_reference: bool = False
    public_keys: list[Path] = field(default_factory=list)  # PEM; plus state_dir/trust/keys/*.pem

    CONFIG_KEYS = ("allowed", "allow_files", "converted_here", "pinned_reference", "public_keys")

    @classmethod
    def from_config(cls, table: Mapping[str, Any] | None, state_dir: str | os.PathLike) -> "TrustPolicy":
        """The policy of a ``[trust]`` config table; ConfigError naming the key for anything amiss.

        Keys (all optional; anything else is an error, so a typo never silently widens or narrows trust):

        * ``allowed``: list of lazy manifest digests to trust (``sha256:<hex>``).
        * ``allow_files``: list of files holding more digests, one a line, ``#`` comments; a missing
          file is an empty list (it may be provisioned later), a malformed one an error at use.
        * ``converted_here`` (default true): trust lazy images this node converted itself
          (records under ``state_dir/trust/converted``, written only by ``bdserver convert`` as root).
        * ``pinned_reference`` (default false): trust a reference that names the lazy manifest by
          digest (``REPO@sha256:...``). Only for single-tenant nodes where every reference comes from
          the node admin; on a shared node a pod author writes the reference, and a digest they pick
          is not the admin's trust.
        * ``public_keys``: list of PEM public key files (ECDSA, Ed25519, RSA); a lazy image whose cosign
          signature one of them verifies, for its source, is trusted (signing.py). Each file must hold
          such a key. ``state_dir/trust/keys/*.pem`` are added.
        """
        t = dict(table or {})
        unknown = sorted(set(t) - set(cls.CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"[trust]: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(cls.CONFIG_KEYS)}")
        allowed = _config_list(t, "allowed")
        bad = [d for d in allowed if not is_digest(d)]
        if bad:
            raise ConfigError(f"[trust] allowed: not a digest: {bad[0]!r} (write sha256:<64 hex>)")
        keys = [Path(k) for k in _config_list(t, "public_keys")]
        from bdserver.oci.signing import load_public_key

        for k in keys:
            try:
                load_public_key(k)
            except ConfigError as e:
                raise ConfigError(f"[trust] public_keys: {e}") from None
        return cls(
            state_dir=Path(state_dir),
            allowed=set(allowed),
            allow_files=[Path(p) for p in _config_list(t, "allow_files")],
            trust_converted_here=_config_bool(t, "converted_here", True),
            trust_pinned_reference=_config_bool(t, "pinned_reference", False),
            public_keys=keys,
        )

    def keys(self) -> list[Path]:
        """Public keys whose signatures (see signing.py) make a lazy image trusted."""
        d = self.trust_dir / "keys"
        found = sorted(d.glob("*.pem")) if d.is_dir() else []
        return [Path(k) for k in self.public_keys] + found

    def decide_with_signatures(self, store: ImageStore, lazy_digest: str, source_digest: str,
                               pinned_by_reference: bool = False) -> tuple[bool, str]:
        """decide(), then (if that says no and keys are configured) a signature check in ``store``."""
        ok, why = self.decide(lazy_digest, source_digest, pinned_by_reference)
        if ok:
            return ok, why
        return self.check_signatures(store, lazy_digest, source_digest, why)

    def check_signatures(self, store: ImageStore, lazy_digest: str, source_digest: str,
                         why: str = "not trusted otherwise") -> tuple[bool, str]:
        keys = self.keys()
        if not keys:
            return False, why
        from bdserver.oci.signing import signed_by

        key = signed_by(store, lazy_digest, source_digest, keys)
        if key:
            return True, f"signed by {key}"
        return False, f"{why}, and not signed by any of {len(keys)} trusted key(s)"

    @property
    def trust_dir(self) -> Path:
        return Path(self.state_dir) / "trust"

    def _converted_path(self, lazy_digest: str) -> Path:
        alg, hexd = parse_digest(lazy_digest)
        return self.trust_dir / "converted" / f"{alg}-{hexd}.json"

    def allowed_digests(self) -> set[str]:
        s = set(self.allowed) | _read_digest_list(self.trust_dir / "allowed")
        for f in self.allow_files:
            s |= _read_digest_list(Path(f))
        return s

    def allow(self, lazy_digest: str) -> None:
        """Add a digest to the node's persistent allow-list file."""
        parse_digest(lazy_digest)
        f = self.trust_dir / "allowed"
        f.parent.mkdir(parents=True, exist_ok=True)
        cur = f.read_text() if f.exists() else ""
        if lazy_digest not in _read_digest_list(f):
            atomic_write(f, (cur + ("" if cur.endswith("\n") or not cur else "\n") + lazy_digest + "\n").encode())

    def record_converted(self, lazy_digest: str, source_digest: str, ref: str | None = None) -> Path:
        """Remember that this node produced ``lazy_digest`` from ``source_digest`` (the converter calls this)."""
        parse_digest(source_digest)
        p = self._converted_path(lazy_digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        rec = {"lazy": lazy_digest, "source": source_digest, "ref": ref, "time": int(time.time())}
        atomic_write(p, json.dumps(rec, sort_keys=True).encode() + b"\n")
        return p

    def converted_here(self, lazy_digest: str, source_digest: str | None = None) -> bool:
        try:
            rec = json.loads(self._converted_path(lazy_digest).read_text())
        except (FileNotFoundError, ValueError):
            return False
        return rec.get("lazy") == lazy_digest and (source_digest is None or rec.get("source") == source_digest)

    def decide(self, lazy_digest: str, source_digest: str | None = None,
               pinned_by_reference: bool = False) -> tuple[bool, str]:
        """(trusted, why) for one lazy manifest digest."""
        if lazy_digest in self.allowed_digests():
            return True, "digest in allow-list"
        if self.trust_converted_here and self.converted_here(lazy_digest, source_digest):
            return True, "converted on this node"
        if self.trust_pinned_reference and pinned_by_reference:
            return True, "pinned by the reference"
        return False, "not in the allow-list and not converted on this node"


def _source_manifest(store: ImageStore, parsed: Manifest | Index, desc: Descriptor,
                     platform: Platform | None) -> tuple[Descriptor, list[Descriptor]]:
    """The platform manifest plus the digests whose referrers to search (manifest, index)."""
    if isinstance(parsed, Index):
        chosen = parsed.select_platform(platform)
        _, mdesc = store.get_manifest(chosen.digest)
        return mdesc, [mdesc, desc]
    return desc, [desc]


def _named(digests: list[str]) -> str:
    more = f" and {len(digests) - MAX_NAMED} more" if len(digests) > MAX_NAMED else ""
    return ", ".join(digests[:MAX_NAMED]) + more


def discover_lazy_image(store: ImageStore, ref: str | Reference, policy: TrustPolicy, *,
                        platform: Platform | None = None) -> tuple[Descriptor, Descriptor]:
    """Find the trusted lazy image for ``ref`` in ``store`` (the repository ``ref`` names).

    ``store`` may also be a RegistryClient (then ``ref``'s repository on it is used).

    Returns ``(source manifest descriptor, lazy manifest descriptor)``. If ``ref`` itself names a
    lazy manifest, its subject is the source. Any writer to the repository can add referrers and
    date them as they like, so candidates the policy accepts without the network (allow-list,
    converted here) are examined first, whatever their number and dates, and without fetching
    any other; then, with keys configured, up to MAX_SIGNATURE_CANDIDATES others, newest first,
    by their signatures. Each must verify (digest, artifactType, subject). Raises
    NoLazyImageError (non-fatal for callers) with what was found and what to do.
    """
    r = parse_reference(ref) if isinstance(ref, str) else ref
    if hasattr(store, "repository") and not hasattr(store, "get_manifest"):
        store = store.repository(r.repository)  # type: ignore[attr-defined]
    target = r.target or "latest"
    try:
        data, desc = store.get_manifest(target)
    except NotFoundError as e:
        raise NoLazyImageError(f"{r}: image not found ({e})") from None
    parsed = parse_manifest(data, desc.media_type)
    if isinstance(parsed, Manifest) and parsed.artifact_type == mt.LAZY_ARTIFACT_TYPE:
        if parsed.subject is None:
            raise NoLazyImageError(f"{r}: lazy manifest without a subject")
        ok, why = policy.decide_with_signatures(store, desc.digest, parsed.subject.digest,
                                                pinned_by_reference=r.digest == desc.digest)
        if not ok:
            raise NoLazyImageError(f"{r}: lazy image {desc.digest} is not trusted ({why}); "
                                   f"add it to {policy.trust_dir / 'allowed'} or convert on this node")
        lazy = Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size,
                          artifact_type=mt.LAZY_ARTIFACT_TYPE, annotations=dict(parsed.annotations))
        return parsed.subject, lazy
    try:
        source, search = _source_manifest(store, parsed, desc, platform)
    except NotFoundError as e:
        raise NoLazyImageError(f"{r}: {e}") from None
    untrusted: list[str] = []
    broken: list[str] = []

    def verified(cand: Descriptor, subj: Descriptor) -> Descriptor | None:
        """The lazy descriptor if the candidate's manifest is what its listing claims, for this source."""
        try:
            cdata, cdesc = store.get_manifest(cand.digest)
            cm = parse_manifest(cdata, cdesc.media_type)
        except (BdError, ValueError) as e:
            broken.append(f"{cand.digest} ({e.__class__.__name__})")
            return None
        if not isinstance(cm, Manifest) or cm.artifact_type != mt.LAZY_ARTIFACT_TYPE or cm.subject is None \
                or cm.subject.digest != subj.digest:
            broken.append(f"{cand.digest} (does not point at {subj.digest})")
            return None
        if subj.digest != source.digest:
            # a lazy image of the index: only usable if it is the one for this platform
            broken.append(f"{cand.digest} (attached to the index, not to the {source.digest} manifest)")
            return None
        return Descriptor(media_type=cdesc.media_type, digest=cdesc.digest, size=cdesc.size,
                          artifact_type=mt.LAZY_ARTIFACT_TYPE, annotations=dict(cm.annotations))

    for subj in search:
        cands = list_referrers(store, subj.digest, mt.LAZY_ARTIFACT_TYPE)  # newest first
        accepted = [(c, policy.decide(c.digest, source.digest)) for c in cands]
        for cand, (ok, why) in accepted:
            if ok and (lazy := verified(cand, subj)) is not None:
                log.info("%s: lazy image %s (%s)", r, cand.digest, why)
                return source, lazy
        rest = [c for c, (ok, _) in accepted if not ok]
        if policy.keys() and subj.digest == source.digest:
            for cand in rest[:MAX_SIGNATURE_CANDIDATES]:
                ok, why = policy.check_signatures(store, cand.digest, source.digest)
                if ok and (lazy := verified(cand, subj)) is not None:
                    log.info("%s: lazy image %s (%s)", r, cand.digest, why)
                    return source, lazy
            if len(rest) > MAX_SIGNATURE_CANDIDATES:
                broken.append(f"{len(rest) - MAX_SIGNATURE_CANDIDATES} more whose signatures were not looked up")
        untrusted += [c.digest for c in rest]
    if untrusted:
        log.warning("%s: ignoring %d untrusted lazy image(s): %s", r, len(untrusted), _named(untrusted))
        why = "not in the allow-list and not converted on this node"
        if policy.keys():
            why += f", and not signed by any of {len(policy.keys())} trusted key(s)"
        extra = f"; unusable: {_named(broken)}" if broken else ""
        raise NoLazyImageError(
            f"{r}: {len(untrusted)} lazy image(s) found for {source.digest} but none is trusted "
            f"({_named(untrusted)}: {why}){extra}; add one to {policy.trust_dir / 'allowed'} or convert on this node")
    extra = f"; unusable: {_named(broken)}" if broken else ""
    raise NoLazyImageError(f"{r}: no lazy image for {source.digest}; run `bdserver convert {r}`{extra}")
