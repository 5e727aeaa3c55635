"""Convert a list of tar layers and build the reference next to it (used by several tests)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from bdserver.convert.image import LocalDevice, convert_tar_layers
from tests.fixtures.reftree import apply_layer, extract_layer


@dataclass
class Converted:
    dev: LocalDevice
    flat: Path  # [meta | layer 1 | ... | layer N] as one file
    reference: Path  # the layers applied with overlay semantics
    views: list[Path]  # per layer: GNU tar extraction with overlay whiteouts


def convert_again(tars: list[Path], work: Path, like: Converted, *, compress: str) -> Converted:
    """The same layers converted with other options, against the same reference and views."""
    dev = convert_tar_layers([lambda t=t: open(t, "rb") for t in tars], work / "out", compress=compress)
    return Converted(dev=dev, flat=dev.assemble(work / "device.img"), reference=like.reference, views=like.views)


def convert_and_reference(tars: list[Path], work: Path, *, keep_views: bool = True) -> Converted:
    dev = convert_tar_layers([lambda t=t: open(t, "rb") for t in tars], work / "out")
    flat = dev.assemble(work / "device.img")
    ref = work / "ref"
    ref.mkdir()
    views = []
    for i, t in enumerate(tars):
        view = work / f"view{i}"
        imp = extract_layer(t, view)
        if keep_views:
            keep = work / f"layerview{i}"
            extract_layer(t, keep)
            views.append(keep)
        apply_layer(view, ref, imp, first=(i == 0))
        shutil.rmtree(view)
    return Converted(dev=dev, flat=flat, reference=ref, views=views)

