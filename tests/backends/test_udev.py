"""`backends.udev` on this machine's kernel, with loop devices as the disks that appear.

A loop device added through /dev/loop-control is a real block device that the kernel announces
asynchronously, as it does a TCMU or ublk disk: a watch started before it sees it by name (even
after another device's event came first), a device made before the watch is not mistaken for a
new one, and a wait for something that never comes ends in a KernelError naming it. This host
runs no udev daemon, so these tests exercise the fallback on the kernel's own uevents; the lab
runs udevd, and its TCMU and ublk tests check that attach waits for udev.
"""

from __future__ import annotations

import os
import stat
import time

import pytest

from bdserver.backends import udev
from bdserver.errors import KernelError
from tests.backends.conftest import LOOP_MAJOR


def assert_is_the_loop_disk(dev, name: str) -> None:
    st = os.stat(dev.device_node)
    assert dev.device_node == f"/dev/{name}" and stat.S_ISBLK(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (LOOP_MAJOR, int(name.removeprefix("loop")))
    assert dev.subsystem == "block" and dev.device_type == "disk"


def test_a_new_disk_is_found_by_name_even_behind_another(loops) -> None:
    with udev.DeviceWatch("block") as watch:
        assert watch.source == ("udev" if os.path.exists("/run/udev/control") else "kernel")
        first, second = loops.add(), loops.add()
        assert_is_the_loop_disk(watch.wait(f"/dev/{second}", udev.named(second), 60), second)
        # the first disk's event came before and was kept for this wait
        assert_is_the_loop_disk(watch.wait(f"/dev/{first}", udev.named(first), 60), first)


def test_what_existed_before_the_watch_or_never_comes_times_out(loops) -> None:
    old = loops.add()
    with udev.DeviceWatch("block") as watch:
        t0 = time.monotonic()
        with pytest.raises(KernelError, match=f"waiting for /dev/{old} to appear"):
            watch.wait(f"/dev/{old}", udev.named(old), 1.0)
        with pytest.raises(KernelError, match="timed out after 1 s waiting for the disk of nobody"):
            watch.wait("the disk of nobody", udev.named("loop-none"), 1.0)
        assert time.monotonic() - t0 < 30  # bounded: never hangs
    with udev.DeviceWatch("uio") as watch:  # another subsystem's watch does not see new disks
        new = loops.add()
        with pytest.raises(KernelError):
            watch.wait(f"/dev/{new}", udev.named(new), 1.0)


def test_existing_devices_are_found_until_removed(loops) -> None:
    name = loops.add()
    assert_is_the_loop_disk(udev.find("block", udev.named(name), DEVTYPE="disk"), name)
    by_number = udev.find("block", udev.with_attribute("dev", f"{LOOP_MAJOR}:{name.removeprefix('loop')}"))
    assert by_number is not None and by_number.sys_name == name
    assert {dev.sys_name for dev in udev.devices("block")} >= {name, *os.listdir("/sys/block")}
    loops.remove(name)
    assert udev.find("block", udev.named(name)) is None
