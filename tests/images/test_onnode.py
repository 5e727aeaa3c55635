"""On-node conversions: locked per source (an image already converted opens while another converts)
and collected when unused. Real conversions of small tar layers; only the waiting is staged."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from bdserver.convert.image import LocalDevice, convert_tar_layers
from bdserver.images.onnode import OnNodeConversions
from tests.fixtures.layers import small_tar_layer

SRC_A = "sha256:" + "a" * 64
SRC_B = "sha256:" + "b" * 64
CONFIG = "sha256:" + "c" * 64


def _converter(tmp_path: Path, name: str, gate: threading.Event | None = None):  # type: ignore[no-untyped-def]
    layer = small_tar_layer(tmp_path / f"{name}.tar", {f"{name}/file": name.encode() * 1000})

    def convert(workdir: Path) -> tuple[LocalDevice, str]:
        if gate is not None:
            assert gate.wait(60), "the test never released the conversion"
        return convert_tar_layers([lambda: open(layer, "rb")], workdir), CONFIG

    return convert


def test_an_image_already_converted_opens_while_another_converts(tmp_path: Path) -> None:
    conv = OnNodeConversions(tmp_path / "converted", keep_s=3600)
    done, fresh = conv.get_or_convert(SRC_A, _converter(tmp_path, "a"))
    assert fresh and done.open_device().size > 0
    gate = threading.Event()
    slow = threading.Thread(target=conv.get_or_convert, args=(SRC_B, _converter(tmp_path, "b", gate)))
    slow.start()
    try:
        time.sleep(0.2)  # B is now inside its conversion, holding B's lock
        t0 = time.monotonic()
        again, fresh = conv.get_or_convert(SRC_A, _converter(tmp_path, "unused"))
        assert not fresh and again.root == done.root
        assert time.monotonic() - t0 < 10, "A waited for B's conversion"
        assert slow.is_alive()
    finally:
        gate.set()
        slow.join(60)
    assert conv.find(SRC_B) is not None


def test_unused_conversions_are_collected_and_used_ones_kept(tmp_path: Path) -> None:
    conv = OnNodeConversions(tmp_path / "converted", keep_s=60)
    a, _ = conv.get_or_convert(SRC_A, _converter(tmp_path, "a"))
    b, _ = conv.get_or_convert(SRC_B, _converter(tmp_path, "b"))
    leftover = tmp_path / "converted" / ("d" * 64 + ".tmp")  # a conversion interrupted by a crash
    leftover.mkdir()
    assert conv.collect(in_use=[]) == [("d" * 64)]  # fresh ones stay; the crash leftover goes
    later = time.time() + 120
    removed = conv.collect(in_use=[SRC_A], now=later)  # A is used by a device: kept whatever its age
    assert removed == [SRC_B.split(":")[1]]
    assert a.root.is_dir() and not b.root.exists() and not leftover.exists()
    os.utime(a.root / "device.json", (0, 0))
    assert conv.find(SRC_A) is not None  # opening it refreshes its use time
    assert conv.collect(in_use=[], now=time.time() + 30) == []


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd"])
def test_a_record_naming_a_file_outside_its_dir_is_refused(tmp_path: Path, bad: str) -> None:
    from bdserver.errors import FormatError

    conv = OnNodeConversions(tmp_path / "converted", keep_s=60)
    a, _ = conv.get_or_convert(SRC_A, _converter(tmp_path, "a"))
    (a.root / "device.json").write_text(f'{{"extents": [["{bad}", 0]], "source": "{SRC_A}", "config": "{CONFIG}"}}')
    with pytest.raises(FormatError):
        conv.find(SRC_A)
