"""Small helpers shared by the writer and the reader."""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small objects that all stay
    alive (tree and layout records): its repeated full scans would otherwise cost more than
    the work itself on trees of 100 000 inodes. Nothing here creates garbage cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
