"""A total deadline per fetch: a registry that trickles its answer cannot stall a read."""

from __future__ import annotations

import time

import pytest

from bdserver.errors import FetchError

from .helpers import client, push_image, rand_bytes

DEADLINE = 2.0
NEVER_HANGS = DEADLINE + 8.0  # generous: the trickled bodies below would take hours


@pytest.mark.parametrize("what", ["read_range", "get_manifest", "read_blob"])
def test_trickling_registry_fails_the_read_then_the_next_read_works(registry, fault_proxy, what):
    p = fault_proxy
    repo = client(p.host, fetch_deadline_s=DEADLINE).repository("slow/x")
    blob = rand_bytes(200_000, 3)
    d = repo.put_blob_bytes(blob)
    small = rand_bytes(30_000, 4)
    sd = repo.put_blob_bytes(small)
    desc = push_image(repo, "v1", [blob])
    repo.blob_size(d)
    reads = {
        "read_range": (lambda: repo.read_range(d, 1000, 100_000), blob[1000:101_000], r"/blobs/sha256"),
        "get_manifest": (lambda: repo.get_manifest("v1")[1].digest, desc.digest, r"/manifests/v1"),
        "read_blob": (lambda: repo.read_blob(sd, len(small)), small, r"/blobs/sha256"),  # a small object, whole
    }
    read, want, match = reads[what]
    # every piece comes well within httpx's per-receive timeout; only the total is too long
    p.inject("trickle", piece=16, seconds=0.25, count=1000, match=match, method="GET")
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="fetch deadline"):
        read()
    assert time.monotonic() - t0 < NEVER_HANGS
    p.clear_faults()
    assert read() == want
