"""A small lazy image in Debian's docker-registry, for the tests of what operators see (metrics,
logs, stats): two layers of incompressible files (a few dozen 128 KiB chunks), converted with
`bdserver convert` (published as a referrer) and allowed by digest.

    from tests.node.small_lazy import small_lazy  # noqa: F401  (module-scoped fixture)
    def test_x(small_lazy, daemon): daemon.write_config(small_lazy.trust_toml()); ...
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import httpx
import pytest

from tests.fixtures.layers import build_oci_layout, data, small_tar_layer
from tests.fixtures.registry import REGISTRY_BIN, Registry, start_registry
from tests.fixtures.converter import convert_cli

if not os.path.exists(REGISTRY_BIN):  # installed by `make setup`: a missing one is a setup bug, not a skip
    pytest.fail(f"{REGISTRY_BIN} is missing: run kernel-setup/install-packages", pytrace=False)

REPO_NAME = "ops"


@dataclass
class SmallLazy:
    registry: Registry
    lazy: str  # the lazy manifest's digest
    files: dict[str, bytes]

    def ref(self, host: str | None = None) -> str:
        """The image through `host` (a fault proxy's) or straight from the registry."""
        return f"{host or self.registry.host}/{REPO_NAME}:v1"

    def trust_toml(self) -> str:
        return f'[trust]\nallowed = ["{self.lazy}"]\n'


@pytest.fixture(scope="module")
def small_lazy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallLazy]:
    base = tmp_path_factory.mktemp("small-lazy")
    files1 = {"data/big": data(3 << 20, 1), "etc/one": b"one\n"}
    files2 = {"data/more": data(1 << 20, 2), "etc/two": b"two\n"}
    layers = [small_tar_layer(base / "l1.tar", files1), small_tar_layer(base / "l2.tar", files2)]
    build_oci_layout(layers, base / "layout")
    reg = start_registry(base / "registry")
    try:
        reg.push_layout(base / "layout", "latest", REPO_NAME, "v1")
        converted = convert_cli(base, f"{reg.host}/{REPO_NAME}:v1", timeout=300)
        yield SmallLazy(reg, converted["lazy"], {**files1, **files2})
    finally:
        reg.stop()


def read_device(path: str, offset: int = 0, length: int | None = None) -> int:
    """Read the device file (through the kernel, as EROFS would); returns the bytes read."""
    n = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while length is None or n < length:
            b = f.read(min(1 << 20, (length - n) if length is not None else 1 << 20))
            if not b:
                break
            n += len(b)
    return n


def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait (bounded) for background work the test cannot join: fetch-ahead, a proxy's byte count."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def scrape(url: str, uds: str | None = None) -> str:
    """GET the metrics endpoint (over a unix socket with `uds`)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=uds) if uds else None, timeout=10) as c:
        r = c.get(url)
    r.raise_for_status()
    return r.text
