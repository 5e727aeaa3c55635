"""Kernel devices found and waited for through udev (pyudev), for the ublk and TCMU backends.

A backend creates a kernel object (a UIO device, a SCSI disk, a ublk char or block device) with a
configfs write or a control command, and the object appears asynchronously. A `DeviceWatch` is
started BEFORE that action, so the object's event cannot be missed (the netlink socket queues it
while the action runs), and it completes on the ``add`` event that the udev daemon broadcasts once
its rules have run: blkid and scsi_id have read the disk, its node and links exist. So nothing
probes a disk after attach returns, and whoever counts the disk's reads sees only their own.

Without a udev daemon (no ``/run/udev/control``, the test libudev itself makes: containers,
minimal hosts, the project's development VM) the kernel's own uevent is the signal: the kernel
sends it after the node exists in devtmpfs and, for a disk, after the partition scan, and there
is nobody else to probe.

Objects that already exist (a device a restarted daemon adopts) are found with `find`.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Callable, Iterator

import pyudev

from bdserver.errors import KernelError

UDEV_CONTROL = "/run/udev/control"  # the udev daemon's control socket: it runs iff this exists
BACKLOG = 256  # add events of other devices kept for a later `wait` of the same watch

Match = Callable[[pyudev.Device], bool]


def udev_running() -> bool:
    return os.path.exists(UDEV_CONTROL)


def event_source() -> str:
    """``udev`` (events after the udev daemon processed them) or ``kernel`` (no daemon here)."""
    return "udev" if udev_running() else "kernel"


def named(sys_name: str) -> Match:
    """The device whose kernel name is ``sys_name`` (``ublkb3``, ``loop7``)."""
    return lambda dev: dev.sys_name == sys_name


def with_attribute(name: str, value: str) -> Match:
    """The device whose sysfs attribute ``name`` reads ``value`` (UIO devices by ``name``)."""
    return lambda dev: dev.attributes.asstring(name).strip() == value


def _accepts(match: Match, dev: pyudev.Device) -> bool:
    try:
        return bool(match(dev))
    except (KeyError, OSError, pyudev.DeviceNotFoundError):
        return False  # an attribute or parent is missing, or the device went away meanwhile


class DeviceWatch:
    """The ``add`` events of devices in ``subsystems``, from the moment the watch is made.

    Use as a context manager around the action that creates the device, then `wait` for it by
    identity; events of other devices are kept (up to `BACKLOG`) for later waits of this watch.
    """

    def __init__(self, *subsystems: str) -> None:
        self.source = event_source()
        try:
            self._monitor: pyudev.Monitor | None = pyudev.Monitor.from_netlink(pyudev.Context(), source=self.source)
            for subsystem in subsystems:
                self._monitor.filter_by(subsystem)
            self._monitor.start()
        except OSError as exc:
            raise KernelError(f"cannot listen to {self.source} device events ({', '.join(subsystems)}): {exc}; "
                              "run the daemon as root in the host's network namespace") from exc
        self._backlog: collections.deque[pyudev.Device] = collections.deque(maxlen=BACKLOG)

    def __enter__(self) -> DeviceWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._monitor = None  # libudev closes the socket when the last reference goes

    def wait(self, what: str, match: Match, timeout: float) -> pyudev.Device:
        """The first added device that ``match`` accepts; KernelError naming ``what`` once
        ``timeout`` seconds passed without it."""
        for dev in self._backlog:
            if _accepts(match, dev):
                self._backlog.remove(dev)
                return dev
        if self._monitor is None:
            raise RuntimeError("the watch is closed")
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                dev = self._monitor.poll(timeout=max(left, 0.001))
            except OSError as exc:  # e.g. ENOBUFS: the socket overflowed, events were lost
                raise KernelError(f"lost {self.source} device events while waiting for {what}: {exc}") from exc
            if dev is None or dev.action != "add":
                continue  # also None for an event libudev filtered out: keep waiting
            if _accepts(match, dev):
                return dev
            self._backlog.append(dev)
        why = ("the udev daemon did not report it; see `udevadm monitor` and the kernel log"
               if self.source == "udev" else
               "no kernel uevent came (they reach only the host's network namespace); see the kernel log")
        raise KernelError(f"timed out after {timeout:.0f} s waiting for {what} to appear ({why})")


def devices(subsystem: str, **properties: str) -> Iterator[pyudev.Device]:
    """The devices of ``subsystem`` that exist now (udev's view of sysfs)."""
    return iter(pyudev.Context().list_devices(subsystem=subsystem, **properties))


def find(subsystem: str, match: Match, **properties: str) -> pyudev.Device | None:
    """The existing device of ``subsystem`` that ``match`` accepts, or None."""
    return next((dev for dev in devices(subsystem, **properties) if _accepts(match, dev)), None)
