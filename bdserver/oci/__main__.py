"""``python -m bdserver.oci``: registry and trust tools for operators and debugging.

    resolve REF                      digest, media type and size of a reference
    referrers REF [--artifact-type T]  referrers of REF's manifest (API, else tag schema)
    discover REF                     the trusted lazy image of REF (exit 6 if none)
    allow DIGEST                     add a lazy image digest to the node's allow-list
    sign REF --key KEY.pem           sign the lazy image REF names (a lazy manifest reference)
    copy SRC DST                     copy an image byte-for-byte (registry or oci: layout)

Common options: ``--state-dir`` (default /var/lib/bdserver), ``--hosts-dir``, ``--docker-config``.
Errors print one line and exit with the error's code (bdserver.errors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bdserver.errors import BdError
from bdserver.oci import mediatypes as mt
from bdserver.oci.reference import parse_reference
from bdserver.oci.store import open_store
from bdserver.oci.trust import DEFAULT_STATE_DIR, TrustPolicy


def _kw(a: argparse.Namespace) -> dict:
    kw: dict = {}
    if a.hosts_dir:
        kw["hosts_dirs"] = [a.hosts_dir]
    if a.docker_config:
        kw["docker_config"] = a.docker_config
    return kw


def _store(ref: str, a: argparse.Namespace, create: bool = False):
    r = parse_reference(ref)
    return r, open_store(r.store_ref(), create=create,
                         **({} if r.is_layout else _kw(a)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bdserver.oci", description=__doc__.split("\n\n")[0])
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument("--hosts-dir")
    p.add_argument("--docker-config")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("resolve").add_argument("ref")
    sp = sub.add_parser("referrers")
    sp.add_argument("ref")
    sp.add_argument("--artifact-type")
    sub.add_parser("discover").add_argument("ref")
    sub.add_parser("allow").add_argument("digest")
    sp = sub.add_parser("sign")
    sp.add_argument("ref")
    sp.add_argument("--key", required=True)
    sp = sub.add_parser("copy")
    sp.add_argument("src")
    sp.add_argument("dst")
    a = p.parse_args(argv)
    try:
        out = _run(a)
    except BdError as e:
        print(f"error: {e.user_message()}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def _run(a: argparse.Namespace) -> dict:
    policy = TrustPolicy(state_dir=a.state_dir)
    if a.cmd == "allow":
        policy.allow(a.digest)
        return {"allowed": a.digest, "file": str(policy.trust_dir / "allowed")}
    if a.cmd == "copy":
        from bdserver.oci.copy import copy_image

        sr, src = _store(a.src, a)
        dr, dst = _store(a.dst, a, create=True)
        d = copy_image(src, dst, sr.target or "latest", dr.tag)
        return {"digest": d.digest, "media_type": d.media_type, "size": d.size}
    r, store = _store(a.ref, a)
    if a.cmd == "resolve":
        d = store.resolve(r.target or "latest")
        return {"digest": d.digest, "media_type": d.media_type, "size": d.size}
    if a.cmd == "referrers":
        from bdserver.oci.referrers import list_referrers

        d = store.resolve(r.target or "latest")
        return {"subject": d.digest, "referrers": [x.to_dict() for x in list_referrers(store, d.digest,
                                                                                        a.artifact_type)]}
    if a.cmd == "discover":
        from bdserver.oci.trust import discover_lazy_image

        s, lz = discover_lazy_image(store, r, policy)
        return {"source": s.digest, "lazy": lz.digest}
    if a.cmd == "sign":
        from bdserver.oci.model import Manifest, parse_manifest
        from bdserver.oci.signing import sign_lazy_image

        data, desc = store.get_manifest(r.target or "latest")
        m = parse_manifest(data, desc.media_type)
        if not isinstance(m, Manifest) or m.artifact_type != mt.LAZY_ARTIFACT_TYPE or m.subject is None:
            raise BdError(f"{r} is not a lazy image manifest (reference it by digest)")
        sig = sign_lazy_image(store, desc, m.subject.digest, a.key)
        return {"lazy": desc.digest, "source": m.subject.digest, "signature": sig.digest}
    raise AssertionError(a.cmd)


if __name__ == "__main__":
    sys.exit(main())
