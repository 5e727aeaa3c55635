"""`kernel-setup/check` reports, through pyudev, the udev daemon, the block disks and the modules
it sees; checked against the kernel's own files (sysfs) and a loop device added for the test."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECK = str(REPO / "kernel-setup" / "check")
# the modules the backends and mounts need, which the check reports as udev sees them
MODULES_REPORTED = ("ublk_drv", "target_core_mod", "target_core_user", "tcm_loop", "uio", "fuse", "erofs", "loop",
                    "overlay")


def disks_in_sysfs() -> dict[str, int]:
    """{disk: size in bytes} from /sys/block (whole disks only)."""
    out = {}
    for name in os.listdir("/sys/block"):
        try:
            out[name] = int(Path("/sys/block", name, "size").read_text()) * 512
        except OSError:
            pass  # went away meanwhile
    return out


def test_check_json_reports_what_udev_sees(loops) -> None:
    mine = loops.add()
    before = disks_in_sysfs()
    p = subprocess.run([CHECK, "--json", "--no-probe"], capture_output=True, text=True, check=True)
    after = disks_in_sysfs()
    u = json.loads(p.stdout)["udev"]
    assert u["running"] is os.path.exists("/run/udev/control")
    assert u["events"] == ("udev" if u["running"] else "kernel")
    seen = {d["name"]: d for d in u["block_devices"]}
    assert set(before) & set(after) <= set(seen) <= set(before) | set(after)  # others may add loops
    initialized = seen[mine].pop("udev_initialized")
    assert seen[mine] == {"name": mine, "node": f"/dev/{mine}", "size_bytes": 0, "read_only": False, "fs_type": None}
    assert u["running"] or initialized is False  # without a udev daemon nothing is in its database
    for name, d in seen.items():
        assert d["node"] == f"/dev/{name}"
        if before.get(name) == after.get(name) is not None:
            assert d["size_bytes"] == before[name]
    assert u["modules"] == {m: os.path.isdir(f"/sys/module/{m}") for m in MODULES_REPORTED}


def test_check_text_names_udev_modules_and_disks(loops) -> None:
    mine = loops.add()
    out = subprocess.run([CHECK, "--no-probe"], capture_output=True, text=True).stdout
    udev_line = next(line for line in out.splitlines() if line.startswith("udev "))
    assert ("NOT running" in udev_line) is not os.path.exists("/run/udev/control")
    modules = next(line for line in out.splitlines() if line.strip().startswith("modules seen"))
    for m in MODULES_REPORTED:
        assert f"{m} {'yes' if os.path.isdir(f'/sys/module/{m}') else 'NO'}" in modules
    disks = next(line for line in out.splitlines() if line.strip().startswith("block devices"))
    assert f"{mine} 0.0 MiB" in disks
