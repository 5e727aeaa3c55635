"""The TCMU backend: a LIO user backstore exported through tcm_loop as /dev/sdX.

Per device (see shared/reference/tcmu-ublk.md, Part A):

1. rtslib-fb creates ``core/user_N/<name>`` with ``dev_config=bdserver/<name>``, the size, 4 KiB
   blocks and ``nl_reply_supported=-1`` (the kernel never waits for a netlink reply, so we need no
   netlink at all, and a host where tcmu-runner once ran cannot hang us in ``enable``).
2. We wait for its UIO device by name (``tcm-user/N/<name>/bdserver/<name>``), map map0 and start
   a handler thread serving the ring — BEFORE the LUN exists, because linking the LUN scans the
   disk synchronously (INQUIRY & co. arrive while the symlink syscall is still running).
3. A tcm_loop target, TPG (with its nexus) and LUN 0 make the SCSI host and the disk /dev/sdX,
   which we wait for by its WWID (the NAA id our VPD 0x83 page gives it, the kernel's
   ``device/wwid``) until udev has finished probing it (`udev.DeviceWatch`, started before step 1).

Reads go to a thread pool and complete out of order, so a miss waiting for the network never holds
a cache hit behind it. SCSI semantics live in `scsi.py`, the ring in `tcmu_ring.py`. Detach tears
down in the reverse order and leaves nothing in configfs.

Restarts: `close()` (daemon exit) stops serving but leaves configfs, /dev/sdX and mounts alone. A
later `attach` of the same dev_id and size *adopts* the surviving device: it opens the UIO device
again, writes ``action/reset_ring`` (commands the dead handler held fail with BUSY, which the
initiator retries) and serves the ring afresh, so the disk path and its mounts stay valid. A
leftover that cannot be adopted (other size, no LUN) is torn down and created anew.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import re
import select
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdserver.backends import udev
from bdserver.backends.base import Attached, Backend, Device, checked_read
from bdserver.backends.scsi import ReadRequest, Reply, ScsiDisk
from bdserver.backends.tcmu_ring import Command, Ring, RingError
from bdserver.errors import KernelError

if TYPE_CHECKING:
    import pyudev

log = logging.getLogger(__name__)

CONFIGFS = Path("/sys/kernel/config")
TARGET = CONFIGFS / "target"
SUBTYPE = "bdserver"
BLOCK_SIZE = 4096
MAX_SECTORS = 256  # blocks per command: 1 MiB (fewer, larger commands for sequential reads)
MAX_DATA_AREA_MB = 128  # room for 128 full-size commands at once
READ_WORKERS = 16
MODULES = ("target_core_mod", "target_core_user", "tcm_loop", "uio")
UIO_WAIT_S = 30.0
DISK_WAIT_S = 120.0  # the sd probe and udev's rules under qemu TCG can take a while


def _safe_name(dev_id: str) -> str:
    """A configfs-safe object name (no '/', spaces, ':'), unique per dev_id."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", dev_id)[:40] or "dev"
    return f"bd-{clean}"


def _our_disk(wwid: str) -> udev.Match:
    """The sd disk whose SCSI device reports ``wwid`` (the kernel reads it from VPD page 0x83)."""
    def match(dev: pyudev.Device) -> bool:
        scsi = dev.find_parent("scsi", "scsi_device")
        return dev.device_type == "disk" and scsi is not None and scsi.attributes.asstring("wwid").strip() == wwid
    return match


def _map_size(uio: pyudev.Device) -> int:
    return int(Path(uio.sys_path, "maps/map0/size").read_text().strip(), 0)


def _find_storage_object(name: str) -> Path | None:
    """``core/user_N/<name>`` if a user backstore of that name exists (e.g. left by a dead daemon)."""
    for p in (TARGET / "core").glob(f"user_*/{name}"):
        if p.is_dir():
            return p
    return None


def _target_of(so_path: Path) -> str:
    """The loopback target WWN whose LUN links to this storage object ('' if none)."""
    real = os.path.realpath(so_path)
    for link in (TARGET / "loopback").glob("naa.*/tpgt_*/lun/lun_*/*"):
        if link.is_symlink() and os.path.realpath(link) == real:
            return link.parents[3].name
    return ""


class RingServer:
    """Serves one TCMU ring with a leader/followers pool of threads.

    One thread at a time (the leader) waits on the UIO fd and parses new commands; it answers the
    non-read ones at once, keeps the first read for itself, queues the others, and hands leadership
    on BEFORE doing its read. A follower that becomes leader takes queued work first. So every read
    runs in its own thread (a miss waiting for the network never holds a hit behind it), and at
    queue depth 1 a command is served by the thread that woke up for it, with no hand-off (thread
    wake-ups are what cost most under emulation).
    """

    def __init__(self, uio_node: str, map_size: int, disk: ScsiDisk, device: Device,
                 name: str = "tcmu", workers: int = READ_WORKERS) -> None:
        self.disk = disk
        self.device = device
        self.fd = os.open(uio_node, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.map = mmap.mmap(self.fd, map_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.ring = Ring(self.map)
        except BaseException:
            os.close(self.fd)
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = select.epoll()
        self._poller.register(self.fd, select.EPOLLIN)
        self._poller.register(self._wake_r, select.EPOLLIN)
        self._leader = threading.Lock()
        self._work: queue.SimpleQueue[tuple[Command, ReadRequest]] = queue.SimpleQueue()
        self._kick_lock = threading.Lock()
        self._kick_due = False
        self._stop = threading.Event()
        self.commands = 0
        self.read_errors = 0
        self.broken: str | None = None
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # -- the threads ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._leader:
                    if self._stop.is_set():
                        return
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        item = self._lead()
                if item is not None:
                    self._read(*item)
            except Exception:  # noqa: BLE001 - a dying thread must say why; the others go on
                log.exception("tcmu ring thread failed")

    def _lead(self) -> tuple[Command, ReadRequest] | None:
        """As leader: wait for the kernel, take new commands; return one read to do ourselves."""
        self._poller.poll(1.0)
        try:
            os.read(self.fd, 4)  # clears readiness; the ring is always rescanned in full
        except BlockingIOError:
            pass
        if self.broken or self._stop.is_set():
            return None
        try:
            cmds = self.ring.take()
        except RingError as exc:
            self.broken = str(exc)
            log.error("tcmu ring unusable: %s", exc)
            return None
        mine = None
        answered = False
        for cmd in cmds:
            self.commands += 1
            try:
                answer = self.disk.handle(cmd.cdb)
            except Exception:  # noqa: BLE001 - a handler bug must not leave a command hanging
                log.exception("SCSI handler failed on CDB %s", cmd.cdb.hex())
                answer = Reply.check(0x4, (0x44, 0x00))
            if isinstance(answer, ReadRequest):
                if cmd.data_length >= answer.length:
                    if mine is None:
                        mine = (cmd, answer)
                    else:
                        self._work.put((cmd, answer))
                    continue
                answer = Reply.check(0x5, (0x24, 0x00))
            self._post(cmd, answer)
            answered = True
        if answered:
            self._kick()
        return mine

    # -- completions (any thread) --------------------------------------------------------------

    def _read(self, cmd: Command, req: ReadRequest) -> None:
        size = self.device.size
        try:
            data = checked_read(self.device, req.offset, min(req.length, max(0, size - req.offset)))
            reply = self.disk.read_reply(req, data)
        except OSError as exc:
            self.read_errors += 1
            log.warning("read lba=%d blocks=%d failed: %s", req.lba, req.blocks, exc)
            reply = self.disk.read_error_reply(req)
        except Exception:  # noqa: BLE001
            self.read_errors += 1
            log.exception("read lba=%d failed unexpectedly", req.lba)
            reply = self.disk.read_error_reply(req)
        try:
            self._post(cmd, reply)
            self._kick()
        except Exception:  # noqa: BLE001
            log.exception("completing command %d failed", cmd.cmd_id)

    def _post(self, cmd: Command, reply: Reply) -> None:
        read_len = None
        if reply.data:
            placed = self.ring.fill(cmd, reply.data)
            if placed < cmd.data_length:
                read_len = placed
        sense = reply.sense.to_bytes() if reply.sense else None
        self.ring.complete(cmd.cmd_id, reply.status, sense, read_len)
        self._kick_due = True

    def _kick(self) -> None:
        """Tell the kernel about completions; one write covers all published so far."""
        with self._kick_lock:
            if not self._kick_due:
                return  # another thread's kick, made after our completion, covered it
            self._kick_due = False
            try:
                os.write(self.fd, b"\x00\x00\x00\x00")
            except OSError as exc:
                if exc.errno not in (errno.EIO, errno.ENODEV, errno.EBADF):
                    raise

    # -- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish in-flight reads, stop the threads, unmap and close (before the SO is deleted)."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")  # stays readable: every later leader returns at once
        except OSError:
            pass
        for t in self._threads:
            t.join(timeout=60)
        self._poller.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self.ring.release()
        self.map.close()
        os.close(self.fd)


@dataclass
class _Live:
    so: Any
    target: Any
    tpg: Any
    lun: Any
    server: RingServer
    disk_path: str
    extra: dict[str, Any] = field(default_factory=dict)


class TcmuBackend(Backend):
    """LIO TCMU + tcm_loop: each attached device becomes a read-only SCSI disk /dev/sdX."""

    name = "tcmu"

    def __init__(self) -> None:
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()

    # -- availability --------------------------------------------------------------------------

    def available(self) -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "needs root (configfs and /dev/uio*)"
        try:
            import rtslib_fb  # noqa: F401
        except ImportError:
            return False, "python package rtslib-fb is missing (pip install rtslib-fb)"
        missing = [m for m in MODULES if not Path("/sys/module", m).is_dir()]
        if missing:
            subprocess.run(["modprobe", "-a", *missing], capture_output=True, check=False)
            missing = [m for m in MODULES if not Path("/sys/module", m).is_dir()]
            if missing:
                return False, (f"kernel modules {', '.join(missing)} are not available "
                               "(this kernel has no TCMU; try --backend ublk or fuse)")
        if not TARGET.is_dir():
            if not os.path.ismount(CONFIGFS):
                subprocess.run(["mount", "-t", "configfs", "configfs", str(CONFIGFS)],
                               capture_output=True, check=False)
            if not TARGET.is_dir():
                return False, f"{TARGET} missing (mount configfs at {CONFIGFS})"
        os.makedirs("/etc/target", exist_ok=True)  # rtslib-fb keeps its dbroot there
        return True, "target_core_user and tcm_loop loaded"

    # -- attach --------------------------------------------------------------------------------

    def attach(self, device: Device, dev_id: str) -> Attached:
        ok, reason = self.available()
        if not ok:
            raise KernelError(f"tcmu backend unavailable: {reason}")
        from rtslib_fb import LUN, TPG, FabricModule, Target, UserBackedStorageObject
        from rtslib_fb.utils import RTSLibError

        with self._lock:
            if dev_id in self._live:
                raise KernelError(f"device {dev_id} is already attached over tcmu")
        name = _safe_name(dev_id)
        config = f"{SUBTYPE}/{name}"
        leftover = _find_storage_object(name)
        if leftover is not None:
            try:
                return self._adopt(leftover, device, dev_id)
            except Exception as exc:  # noqa: BLE001 - fall back to a clean re-creation
                log.warning("tcmu: cannot adopt %s (%s); recreating it", leftover, exc)
                self._detach_leftover(Attached("", self.name, dev_id, {"storage_object": str(leftover),
                                                                        "target": _target_of(leftover)}))
        serial = uuid.uuid4().hex
        size = -(-device.size // BLOCK_SIZE) * BLOCK_SIZE
        disk = ScsiDisk(size=device.size, serial=serial, block_size=BLOCK_SIZE,
                        max_transfer_blocks=MAX_SECTORS, config=config)
        control = (f"hw_block_size={BLOCK_SIZE},max_data_area_mb={MAX_DATA_AREA_MB},"
                   "nl_reply_supported=-1")
        so = target = tpg = lun = server = None
        try:
            with udev.DeviceWatch("uio", "block") as watch:  # before the objects it waits for exist
                so = UserBackedStorageObject(name, config=config, size=size, wwn=serial,
                                             hw_max_sectors=MAX_SECTORS, control=control)
                hba = Path(so.path).parent.name.split("_", 1)[1]
                uio_name = f"tcm-user/{hba}/{name}/{config}"
                uio = watch.wait(f"UIO device {uio_name}", udev.with_attribute("name", uio_name), UIO_WAIT_S)
                node = uio.device_node
                server = RingServer(node, _map_size(uio), disk, device, name=name)
                target = Target(FabricModule("loopback"))
                tpg = TPG(target, 1)
                lun = LUN(tpg, 0, storage_object=so)  # scans the disk through our ring
                address = (Path(tpg.path) / "address").read_text().strip()
                path = watch.wait(f"the sd disk of SCSI {address}:0 (WWID {disk.wwid})", _our_disk(disk.wwid),
                                  DISK_WAIT_S).device_node
        except BaseException as exc:
            try:
                self._teardown(lun, tpg, target, server, so)
            except KernelError as undo:  # report the cause, not the clean-up trouble
                log.error("tcmu: cleaning up a failed attach of %s: %s", dev_id, undo)
            if isinstance(exc, (RTSLibError, OSError, RingError)):
                raise KernelError(f"tcmu attach of {dev_id} failed: {exc}") from exc
            raise
        extra = {
            "uio": node, "storage_object": so.path, "target": target.wwn, "scsi_address": f"{address}:0",
            "serial": serial, "wwid": disk.wwid, "block_size": BLOCK_SIZE,
        }
        with self._lock:
            self._live[dev_id] = _Live(so, target, tpg, lun, server, path, extra)
        log.info("tcmu: %s attached as %s (%s, %s)", dev_id, path, uio_name, address)
        return Attached(path=path, backend=self.name, dev_id=dev_id, extra=extra)

    def _adopt(self, so_path: Path, device: Device, dev_id: str) -> Attached:
        """Serve a device a previous (dead) handler left behind: same LUN, same /dev/sdX."""
        from rtslib_fb import FabricModule, Target, UserBackedStorageObject

        size = -(-device.size // BLOCK_SIZE) * BLOCK_SIZE
        have = int((so_path / "attrib" / "dev_size").read_text().strip() or 0) if \
            (so_path / "attrib" / "dev_size").exists() else int(re.search(
                r"Size: (\d+)", (so_path / "info").read_text()).group(1))
        if have != size:
            raise KernelError(f"size changed ({have} != {size})")
        target_wwn = _target_of(so_path)
        if not target_wwn:
            raise KernelError("no LUN links to it")
        hba = so_path.parent.name.split("_", 1)[1]
        name = so_path.name
        config = f"{SUBTYPE}/{name}"
        uio = udev.find("uio", udev.with_attribute("name", f"tcm-user/{hba}/{name}/{config}"))
        if uio is None:
            raise KernelError("its UIO device is gone")
        serial = (so_path / "wwn" / "vpd_unit_serial").read_text().split(":", 1)[1].strip()
        so = UserBackedStorageObject(name, index=hba)
        target = Target(FabricModule("loopback"), target_wwn, mode="lookup")
        tpg = next(iter(target.tpgs))
        lun = next(iter(tpg.luns))
        disk = ScsiDisk(size=device.size, serial=serial, block_size=BLOCK_SIZE,
                        max_transfer_blocks=MAX_SECTORS, config=config)
        address = (Path(tpg.path) / "address").read_text().strip()
        found = udev.find("block", _our_disk(disk.wwid), DEVTYPE="disk")
        if found is None:
            raise KernelError(f"no disk with WWID {disk.wwid} at SCSI {address}:{lun.lun}")
        node, path = uio.device_node, found.device_node
        # Fail what the dead handler held (BUSY: the initiator retries) and start the ring at 0.
        (so_path / "action" / "reset_ring").write_text("1")
        server = RingServer(node, _map_size(uio), disk, device, name=name)
        extra = {
            "uio": node, "storage_object": so.path, "target": target.wwn,
            "scsi_address": f"{address}:{lun.lun}", "serial": serial, "wwid": disk.wwid,
            "block_size": BLOCK_SIZE, "adopted": True,
        }
        with self._lock:
            self._live[dev_id] = _Live(so, target, tpg, lun, server, path, extra)
        log.info("tcmu: %s adopted as %s (%s)", dev_id, path, so_path)
        return Attached(path=path, backend=self.name, dev_id=dev_id, extra=extra)

    def close(self) -> None:
        """Stop serving every device but leave it in the kernel, for the next daemon to adopt."""
        with self._lock:
            lives = list(self._live.values())
            self._live.clear()
        for live in lives:
            try:
                live.server.stop()
            except Exception as exc:  # noqa: BLE001
                log.warning("tcmu: stopping %s: %s", live.disk_path, exc)

    # -- detach --------------------------------------------------------------------------------

    def detach(self, attached: Attached) -> None:
        with self._lock:
            live = self._live.pop(attached.dev_id, None)
        if live is None:
            self._detach_leftover(attached)
            return
        self._teardown(live.lun, live.tpg, live.target, live.server, live.so)
        log.info("tcmu: %s detached (%s)", attached.dev_id, live.disk_path)

    def stats(self, dev_id: str) -> dict[str, int]:
        live = self._live.get(dev_id)
        if live is None:
            return {}
        return {"commands": live.server.commands, "read_errors": live.server.read_errors}

    @staticmethod
    def _teardown(lun, tpg, target, server, so) -> None:
        """LUN (sd goes away while the ring is still served), nexus, TPG, target, ring, backstore."""
        errors = []

        def step(what: str, fn) -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep tearing down, report at the end
                errors.append(f"{what}: {exc}")

        if lun is not None:
            step("LUN", lun.delete)
        if tpg is not None:
            step("nexus", lambda: (Path(tpg.path) / "nexus").write_text("NULL")
                 if (Path(tpg.path) / "nexus").read_text().strip() else None)
            step("TPG", tpg.delete)
        if target is not None:
            step("target", target.delete)
        if server is not None:
            step("ring", server.stop)
        if so is not None:
            step("storage object", so.delete)
        if errors:
            raise KernelError("tcmu teardown incomplete: " + "; ".join(errors))

    def discard(self, dev_id: str) -> None:
        """A backstore whose handler died and will not be replaced: its ring is failed (CHECK
        CONDITION for what it holds, BUSY for new commands) and the LUN and backstore go."""
        with self._lock:
            if dev_id in self._live:
                raise KernelError(f"{dev_id} is served by this process: detach it instead")
        if not TARGET.is_dir():
            return
        so = _find_storage_object(_safe_name(dev_id))
        if so is None:
            return
        self._detach_leftover(Attached("", self.name, dev_id, {"storage_object": str(so), "target": _target_of(so)}))
        log.info("tcmu: discarded %s of %s (its I/O fails)", so, dev_id)

    def _detach_leftover(self, attached: Attached) -> None:
        """Detach a device this process did not attach (a restarted daemon cleaning up)."""
        from rtslib_fb import FabricModule, Target, UserBackedStorageObject
        from rtslib_fb.utils import RTSLibError

        extra = attached.extra or {}
        target = so = None
        if extra.get("target"):
            try:
                target = Target(FabricModule("loopback"), extra["target"], mode="lookup")
            except RTSLibError:
                target = None
        if extra.get("storage_object"):
            p = Path(extra["storage_object"])
            try:
                so = UserBackedStorageObject(p.name, index=p.parent.name.split("_", 1)[1])
            except RTSLibError:
                so = None
        if target is None and so is None:
            return  # already gone: detach is idempotent
        if so is not None:
            # Nobody serves this ring: fail what is in it (CHECK CONDITION) and keep new commands
            # out (BUSY) so that removing the LUN cannot wait for a handler that will never come.
            for action, value in (("block_dev", "1"), ("reset_ring", "2")):
                try:
                    (Path(so.path) / "action" / action).write_text(value)
                except OSError:
                    pass
        luns = list(target.tpgs)[0].luns if target is not None and list(target.tpgs) else []
        tpg = list(target.tpgs)[0] if target is not None and list(target.tpgs) else None
        for lun in luns:
            lun.delete()
        self._teardown(None, tpg, target, None, so)
