"""Fixtures for the backend tests on this machine's kernel."""

from __future__ import annotations

import errno
import fcntl
import os
import random
from typing import Iterator

import pytest

LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81
LOOP_MAJOR = 7


class Loops:
    """Adds loop devices at unused high numbers (out of `losetup -f`'s way) and removes them."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        self.made: list[int] = []

    def add(self) -> str:
        while True:
            n = random.randrange(10_000, 60_000)
            try:
                fcntl.ioctl(self.fd, LOOP_CTL_ADD, n)
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    continue
                raise
            self.made.append(n)
            return f"loop{n}"

    def remove(self, name: str) -> None:
        n = int(name.removeprefix("loop"))
        fcntl.ioctl(self.fd, LOOP_CTL_REMOVE, n)
        self.made.remove(n)

    def close(self) -> None:
        for n in self.made:
            try:
                fcntl.ioctl(self.fd, LOOP_CTL_REMOVE, n)
            except OSError:
                pass
        os.close(self.fd)


@pytest.fixture
def loops() -> Iterator[Loops]:
    made = Loops()
    try:
        yield made
    finally:
        made.close()

