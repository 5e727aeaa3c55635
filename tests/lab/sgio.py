"""A minimal SG_IO (sg v3) client: send one CDB to a SCSI disk and get status, sense and data.

Lets lab tests talk to the disk below the block layer, e.g. send a WRITE that the read-only block
device would refuse before it reaches the target.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from dataclasses import dataclass

SG_IO = 0x2285
SG_DXFER_NONE = -1
SG_DXFER_TO_DEV = -2
SG_DXFER_FROM_DEV = -3


class _SgIoHdr(ctypes.Structure):
    _fields_ = [
        ("interface_id", ctypes.c_int), ("dxfer_direction", ctypes.c_int),
        ("cmd_len", ctypes.c_ubyte), ("mx_sb_len", ctypes.c_ubyte), ("iovec_count", ctypes.c_ushort),
        ("dxfer_len", ctypes.c_uint), ("dxferp", ctypes.c_void_p), ("cmdp", ctypes.c_void_p),
        ("sbp", ctypes.c_void_p), ("timeout", ctypes.c_uint), ("flags", ctypes.c_uint),
        ("pack_id", ctypes.c_int), ("usr_ptr", ctypes.c_void_p), ("status", ctypes.c_ubyte),
        ("masked_status", ctypes.c_ubyte), ("msg_status", ctypes.c_ubyte), ("sb_len_wr", ctypes.c_ubyte),
        ("host_status", ctypes.c_ushort), ("driver_status", ctypes.c_ushort), ("resid", ctypes.c_int),
        ("duration", ctypes.c_uint), ("info", ctypes.c_uint),
    ]


@dataclass
class SgResult:
    status: int
    sense: bytes
    data: bytes
    host_status: int
    driver_status: int

    @property
    def sense_key_asc(self) -> tuple[int, int, int] | None:
        if len(self.sense) < 14:
            return None
        return self.sense[2] & 0x0F, self.sense[12], self.sense[13]


def sg_io(dev: str, cdb: bytes, *, data_in: int = 0, data_out: bytes = b"", timeout_ms: int = 60000) -> SgResult:
    cdb_buf = ctypes.create_string_buffer(cdb, len(cdb))
    sense = ctypes.create_string_buffer(96)
    if data_out:
        buf = ctypes.create_string_buffer(data_out, len(data_out))
        direction, length = SG_DXFER_TO_DEV, len(data_out)
    elif data_in:
        buf = ctypes.create_string_buffer(data_in)
        direction, length = SG_DXFER_FROM_DEV, data_in
    else:
        buf, direction, length = None, SG_DXFER_NONE, 0
    hdr = _SgIoHdr(interface_id=ord("S"), dxfer_direction=direction, cmd_len=len(cdb), mx_sb_len=96,
                   dxfer_len=length, dxferp=ctypes.addressof(buf) if buf is not None else None,
                   cmdp=ctypes.addressof(cdb_buf), sbp=ctypes.addressof(sense), timeout=timeout_ms)
    fd = os.open(dev, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, SG_IO, hdr)
    finally:
        os.close(fd)
    data = bytes(buf.raw[:length - hdr.resid]) if direction == SG_DXFER_FROM_DEV else b""
    return SgResult(hdr.status, bytes(sense.raw[:hdr.sb_len_wr]), data, hdr.host_status, hdr.driver_status)
