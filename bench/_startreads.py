"""What a start really reads: the device's bytes read by the kernel for one command on a loop device
with 128 KiB readahead (no bdserver in the path), and what those bytes weigh compressed.

The loop device holds the SAME bytes as the lazy device (its image, dumped once). The block
requests the kernel sends it are recorded with the block layer's ``block_rq_issue`` trace event in
a tracefs instance of our own (tracefs is mounted if nobody has; we unmount what we mounted);
"compressed" is zstd at the converter's level of the bytes read, chunk by chunk, the lower bound
for a fetcher that got exactly those bytes with the blob's compression.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import zstandard

TRACEFS = Path("/sys/kernel/tracing")
_EVENT = re.compile(r"block_rq_issue: (\d+),(\d+) (\S+) \d+ \(.*?\) (\d+) \+ (\d+)")
CHUNK = 128 << 10
LEVEL = 3


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


class BlockTrace:
    """Record the read requests issued to one block device (a tracefs instance of this process)."""

    def __init__(self, device: str) -> None:
        st = os.stat(device)
        self.major, self.minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        self.mounted = False
        if not (TRACEFS / "instances").is_dir():
            _run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)]).check_returncode()
            self.mounted = True
        self.inst = TRACEFS / "instances" / f"bdbench-{os.getpid()}"
        self.inst.mkdir()
        ev = self.inst / "events" / "block" / "block_rq_issue"
        (ev / "filter").write_text(f"dev == {(self.major << 20) | self.minor}\n")
        (self.inst / "buffer_size_kb").write_text("8192\n")
        self._ev = ev

    def __enter__(self) -> "BlockTrace":
        (self.inst / "trace").write_text("")
        (self._ev / "enable").write_text("1\n")
        return self

    def __exit__(self, *exc: object) -> None:
        (self._ev / "enable").write_text("0\n")

    def reads(self) -> list[tuple[int, int]]:
        """(byte offset, length) of every read request recorded."""
        out = []
        for line in (self.inst / "trace").read_text().splitlines():
            m = _EVENT.search(line)
            if m and int(m.group(1)) == self.major and int(m.group(2)) == self.minor and "R" in m.group(3):
                out.append((int(m.group(4)) * 512, int(m.group(5)) * 512))
        return out

    def close(self) -> None:
        for _ in range(50):
            try:
                self.inst.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        if self.mounted:
            _run(["umount", str(TRACEFS)])


def compressed_size(image: Path, reads: list[tuple[int, int]], start: int = 0) -> tuple[int, int]:
    """(bytes, compressed bytes) of the distinct 4 KiB blocks that ``reads`` touched at or after
    ``start`` (the layers, past the merged metadata), compressed chunk by chunk at LEVEL."""
    blocks: set[int] = set()
    for off, n in reads:
        for b in range(max(off, start) // 4096, (off + n + 4095) // 4096):
            blocks.add(b)
    per_chunk: dict[int, list[int]] = {}
    for b in sorted(blocks):
        per_chunk.setdefault(b * 4096 // CHUNK, []).append(b)
    cctx = zstandard.ZstdCompressor(level=LEVEL)
    total = comp = 0
    with open(image, "rb") as f:
        for _, bs in sorted(per_chunk.items()):
            data = b"".join(os.pread(f.fileno(), 4096, b * 4096) for b in bs)
            total += len(data)
            comp += len(cctx.compress(data))
    return total, comp


def start_reads(image: Path, mnt: Path, cmd: list[str], env: dict[str, str], meta_bytes: int,
                read_ahead_kb: int = 128) -> dict[str, Any]:
    """Run ``cmd`` chrooted in the EROFS image ``image`` on a loop device with ``read_ahead_kb``
    readahead (page cache dropped first); what the kernel read, and its compressed weight."""
    loop = _run(["losetup", "--find", "--show", "--read-only", str(image)]).stdout.strip()
    if not loop:
        raise RuntimeError(f"losetup of {image} failed")
    trace: BlockTrace | None = None
    try:
        Path(f"/sys/block/{os.path.basename(loop)}/queue/read_ahead_kb").write_text(f"{read_ahead_kb}\n")
        trace = BlockTrace(loop)
        mnt.mkdir(parents=True, exist_ok=True)
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        with trace:
            _run(["mount", "-t", "erofs", "-o", "ro,nodev", loop, str(mnt)]).check_returncode()
            try:
                _run(["mount", "-t", "tmpfs", "tmpfs", str(mnt / "tmp")]).check_returncode()  # a writable /tmp
                try:
                    p = _run(["chroot", str(mnt), *cmd], env=env)
                finally:
                    _run(["umount", str(mnt / "tmp")])
                if p.returncode != 0:
                    raise RuntimeError(f"{cmd} failed on the loop device: {p.stderr[-500:]}")
            finally:
                _run(["umount", str(mnt)])
        reads = trace.reads()
    finally:
        if trace is not None:
            trace.close()
        _run(["losetup", "-d", loop])
    read_bytes = sum(n for _, n in reads)
    layer_bytes, layer_comp = compressed_size(image, reads, start=meta_bytes)
    return {"read_ahead_kb": read_ahead_kb, "requests": len(reads), "read_bytes": read_bytes,
            "layer_read_bytes": layer_bytes, "layer_read_compressed": layer_comp}
