"""Cache poisoning across images (issue 8.1): a trusted lazy image that names a popular layer digest
with a chunk index (and bytes) of its own must never change what another image's device reads.

Both images are real conversions in OCI layouts. The attacker's lazy manifest is the victim's with
one change: the layer keeps the victim's blob digest D but carries the attacker's chunk index, and
the attacker's "registry" serves the attacker's blob under D (a range read cannot be checked
against D; only the index checks chunks). Its chunks verify against its own index, so its device
reads "evil"; keyed by D alone, the node cache would hand those bytes to the victim as hits.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from bdserver.blob.chunked import ANN_INDEX_DIGEST, ANN_INDEX_RANGE
from bdserver.cache import ChunkCache
from bdserver.erofs.reader import ErofsImage
from bdserver.vdev import FetchPools, open_lazy_image
from bdserver.vdev.lazyimage import layout_fetcher
from tests.vdev.conftest import convert_tar_image

GOOD = b"good\n" * 40_000
EVIL = b"evil\n" * 40_000


def _tree(motd: bytes) -> dict[str, bytes]:
    return {"etc/motd": motd, "lib/data": random.Random(7).randbytes(400_000)}


def _attacker(tmp: Path, victim, chunk_size: int) -> tuple[dict, Path]:
    """The attacker's lazy manifest and the blob store its registry serves."""
    evil = convert_tar_image(tmp / "attacker", [_tree(EVIL)], chunk_size=chunk_size)
    vm = json.loads(victim.result.manifest)
    em = json.loads(evil.result.manifest)
    layer, evil_layer = vm["layers"][0], em["layers"][0]
    assert layer["annotations"]["org.bdserver.blocks"] == evil_layer["annotations"]["org.bdserver.blocks"]
    for k in (ANN_INDEX_DIGEST, ANN_INDEX_RANGE):
        layer["annotations"][k] = evil_layer["annotations"][k]
    layer["size"] = evil_layer["size"]
    blobs = tmp / "attacker-registry" / "sha256"
    blobs.mkdir(parents=True)
    hexd = lambda d: d.split(":", 1)[1]  # noqa: E731
    shutil.copy(evil.layout.blob_path(evil_layer["digest"]), blobs / hexd(layer["digest"]))  # served as D
    meta = vm["layers"][-1]["digest"]
    shutil.copy(victim.layout.blob_path(meta), blobs / hexd(meta))
    return vm, blobs.parent


@pytest.mark.parametrize("chunk_size", [128 << 10, 64 << 10], ids=["same-layout", "other-layout"])
def test_another_index_for_the_same_layer_never_changes_what_a_device_reads(pools: FetchPools, tmp_path: Path,
                                                                            chunk_size: int) -> None:
    victim = convert_tar_image(tmp_path / "victim", [_tree(GOOD)])
    evil_manifest, evil_blobs = _attacker(tmp_path, victim, chunk_size)
    victim_fetch = layout_fetcher(str(victim.layout.path / "blobs"))
    with ChunkCache(str(tmp_path / "cache")) as cache:
        dev = open_lazy_image(victim.manifest, victim_fetch, cache, pools=pools)  # a running container
        img = ErofsImage(dev.read)
        assert img.read("lib/data") == _tree(GOOD)["lib/data"]
        evil_fetch = layout_fetcher(str(evil_blobs))
        with open_lazy_image(evil_manifest, evil_fetch, None, pools=pools) as alone:
            assert ErofsImage(alone.read).read("etc/motd") == EVIL  # the attack is real: its chunks verify
        evil_dev = open_lazy_image(evil_manifest, evil_fetch, cache, pools=pools)
        evil_dev.read(0, evil_dev.size)  # fills whatever cache entry it is given
        assert img.read("etc/motd") == GOOD
        assert img.read("lib/data") == _tree(GOOD)["lib/data"]
        with open_lazy_image(victim.manifest, victim_fetch, None, pools=pools) as fresh:  # no cache at all
            want = fresh.read(0, fresh.size)
        assert dev.read(0, dev.size) == want
        dev.close()
        later = open_lazy_image(victim.manifest, victim_fetch, cache, pools=pools)  # a later container
        assert ErofsImage(later.read).read("etc/motd") == GOOD
        assert later.read(0, later.size) == want
        later.close()
        assert ErofsImage(evil_dev.read).read("etc/motd") == EVIL  # nor does the victim change the attacker's
        evil_dev.close()
