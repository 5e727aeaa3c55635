"""Saved daemon state (JSON, written atomically) so that a restarted daemon takes its devices back."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from bdserver.daemon.owner import Owner
from bdserver.fsutil import atomic_write

STATE_VERSION = 1


@dataclass
class MountRecord:
    target: str
    lower: str  # where EROFS is mounted (== target with lower_only)
    upper: str = ""
    work: str = ""
    lower_only: bool = False
    made_target: bool = False  # the daemon created the mount point: umount removes it


@dataclass
class DeviceRecord:
    id: str
    ref: str
    backend: str
    path: str = ""
    kind: str = ""
    pin: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    owned_by_mount: bool = False  # attached by `mount`: `umount` detaches it too
    origin: str = "admin"  # "pod": a pod author chose the reference (images.opener.Origin)
    mounts: list[MountRecord] = field(default_factory=list)
    status: str = "attached"  # attached | error
    error: str = ""
    owner: Owner | None = None  # detached when this process is gone (runtime hooks; daemon/owner.py)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DeviceRecord:
        d = dict(d)
        d["mounts"] = [MountRecord(**m) for m in d.get("mounts", [])]
        d["owner"] = Owner(**d["owner"]) if d.get("owner") else None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_state(path: str) -> dict[str, DeviceRecord]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    return {k: DeviceRecord.from_json(v) for k, v in data.get("devices", {}).items()}


def save_state(path: str, devices: dict[str, DeviceRecord]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = {"version": STATE_VERSION, "devices": {k: v.to_json() for k, v in sorted(devices.items())}}
    atomic_write(path, json.dumps(data, indent=1).encode())
