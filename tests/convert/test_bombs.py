"""Conversion bombs (issue 8.6): small layers that claim or decompress to huge things are refused
with a FormatError naming the limit, and the converting process never holds more than a bounded
amount of memory while refusing them (its VmHWM, measured in a child of its own)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.layers import bomb_tars

REPO = Path(__file__).resolve().parents[2]
PEAK_KIB = 96 * 1024  # python + bdserver (~20 MiB) + the largest buffer a default limit allows
AS_LIMIT = 2 << 30  # the child cannot take the machine down on a regression

_CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[4]), int(sys.argv[4])))
from bdserver.errors import BdError
res = {"error": None, "message": ""}
try:
    from bdserver.convert.layer import convert_layer
    kw = {}
    if json.loads(sys.argv[3]):
        from bdserver.convert.limits import ConvertLimits
        kw["limits"] = ConvertLimits(**json.loads(sys.argv[3]))
    with open(sys.argv[1], "rb") as f, open(sys.argv[2], "wb") as o:
        convert_layer(f, o, tmpdir=sys.argv[5], **kw)
except BdError as e:
    res = {"error": type(e).__name__, "message": str(e)}
except MemoryError:
    res = {"error": "MemoryError", "message": ""}
res["hwm_kib"] = int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1])
print(json.dumps(res))
"""


def convert_in_child(layer: Path, out: Path, limits: dict[str, int]) -> dict:
    """Convert ``layer`` in a fresh interpreter; its error (type, message) and peak RSS."""
    r = subprocess.run([sys.executable, "-c", _CHILD, str(layer), str(out), json.dumps(limits), str(AS_LIMIT),
                        str(out.parent)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", sorted(bomb_tars()))
def test_bomb_is_refused_with_bounded_memory(name: str, tmp_path: Path) -> None:
    raw, limits, limit_name = bomb_tars()[name]
    layer = tmp_path / "layer"
    layer.write_bytes(raw)
    res = convert_in_child(layer, tmp_path / "out.erofs", limits)
    assert res["error"] == "FormatError", res
    assert limit_name in res["message"], res["message"]
    assert res["hwm_kib"] < PEAK_KIB, f"peak RSS {res['hwm_kib'] // 1024} MiB while refusing {name}"
    assert len(raw) < 4 << 20  # the bombs really are small


def test_defaults_convert_a_normal_layer_in_the_same_child(tmp_path: Path) -> None:
    """The harness itself: a plain layer converts under the same limits (so a bomb's error is
    the bomb's, not the harness's)."""
    from tests.fixtures.tarwriter import TarWriter

    w = TarWriter()
    w.add("d/", b"5")
    w.add("d/f", b"0", b"hello")
    layer = tmp_path / "layer"
    layer.write_bytes(w.close())
    res = convert_in_child(layer, tmp_path / "out.erofs", {})
    assert res["error"] is None, res
    assert (tmp_path / "out.erofs").stat().st_size > 0


def test_a_deep_tree_within_the_limits_converts(tmp_path: Path) -> None:
    """2000 nested directories (within max_depth) go through conversion, the merge and our
    reader: no step recurses per level (Python's recursion limit is 1000)."""
    from bdserver.convert.image import convert_tar_layers
    from bdserver.erofs.reader import ErofsImage
    from tests.fixtures.tarwriter import TarWriter

    w = TarWriter()
    path = "/".join(["d"] * 2000) + "/leaf"
    w.add(path, b"0", b"deep")
    layer = tmp_path / "layer.tar"
    layer.write_bytes(w.close())
    dev = convert_tar_layers([lambda: open(layer, "rb")], tmp_path / "out")
    flat = dev.assemble(tmp_path / "device.img")
    with ErofsImage.open(flat) as img:
        assert img.read("/" + path) == b"deep"
