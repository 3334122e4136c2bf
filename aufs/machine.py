"""What this machine can do: the kernel filesystems, FUSE, the new mount API, namespaces.

Each probe is cheap and side-effect free; the backends and `aufs info` decide from them.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from dataclasses import dataclass


@functools.cache
def kernel_filesystems() -> frozenset[str]:
    """Filesystem types listed in /proc/filesystems."""
    try:
        with open("/proc/filesystems") as listing:
            return frozenset(line.split()[-1] for line in listing if line.strip())
    except OSError:
        return frozenset()


def kernel_version() -> tuple[int, int]:
    """(major, minor) of the running kernel."""
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def has_new_mount_api() -> bool:
    """fsopen(2) and friends exist from Linux 5.2."""
    return kernel_version() >= (5, 2)


def has_overlay_lowerdir_append() -> bool:
    """overlayfs takes one "lowerdir+" per fsconfig(2) call from Linux 6.7."""
    return kernel_version() >= (6, 7)


def in_user_namespace() -> bool:
    """Docker's test: anything but the full identity uid map means a non-initial namespace."""
    try:
        with open("/proc/self/uid_map") as uid_map:
            fields = uid_map.read().split()
    except OSError:
        return False
    return fields != ["0", "0", "4294967295"]


def is_root() -> bool:
    return os.geteuid() == 0


def fuse_overlayfs_binary() -> str | None:
    return shutil.which("fuse-overlayfs")


def has_fuse_device() -> bool:
    return os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK)


@dataclass(frozen=True)
class MachineReport:
    """One line of `aufs info`: a capability and whether this machine has it."""

    name: str
    present: bool
    detail: str


def describe() -> list[MachineReport]:
    """The kernel features the backends depend on, for humans and for --json."""
    filesystems = kernel_filesystems()
    release = os.uname().release
    binary = fuse_overlayfs_binary()
    return [
        MachineReport("kernel", True, release),
        MachineReport("root", is_root(), f"euid {os.geteuid()}"),
        MachineReport("user namespace", in_user_namespace(),
                      "non-initial" if in_user_namespace() else "initial"),
        MachineReport("aufs filesystem", "aufs" in filesystems, "/proc/filesystems"),
        MachineReport("overlay filesystem", "overlay" in filesystems, "/proc/filesystems"),
        MachineReport("new mount API", has_new_mount_api(), "fsopen/fsconfig, Linux 5.2+"),
        MachineReport("overlay lowerdir+", has_overlay_lowerdir_append(), "Linux 6.7+"),
        MachineReport("fuse device", has_fuse_device(), "/dev/fuse"),
        MachineReport("fuse-overlayfs", binary is not None, binary or "not on PATH"),
    ]


@dataclass(frozen=True)
class Kernel:
    """The kernel facts a backend checks; tests inject their own."""

    filesystems: frozenset[str]
    user_namespace: bool

    @classmethod
    def current(cls) -> Kernel:
        return cls(kernel_filesystems(), in_user_namespace())
