"""Lab fixtures: only usable inside vagrant/lab (Debian 6.12 kernel with TCMU under qemu)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.lab.helpers import in_tcmu_lab, make_tree, mkfs_erofs


@pytest.fixture(scope="session")
def tcmu_lab() -> None:
    ok, why = in_tcmu_lab()
    if not ok:
        pytest.skip(f"not inside the TCMU lab: {why}")


@pytest.fixture(scope="session")
def tcmu_backend(tcmu_lab) -> Iterator[object]:
    from bdserver.backends.tcmu import TcmuBackend

    backend = TcmuBackend()
    ok, why = backend.available()
    assert ok, why  # inside the lab this must work: never skip here
    yield backend


@pytest.fixture(scope="session")
def erofs_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(EROFS image made by mkfs.erofs, its source tree)."""
    base = tmp_path_factory.mktemp("erofs")
    src = make_tree(base / "src", seed=1)
    return mkfs_erofs(base / "img.erofs", src), src


@pytest.fixture(scope="session")
def erofs_pair2(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("erofs2")
    src = make_tree(base / "src", seed=2)
    return mkfs_erofs(base / "img.erofs", src), src
