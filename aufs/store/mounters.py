"""Who performs mount(2): the real syscalls, or a recorder that only writes them down.

Backends call a Mounter, so the aufs backend can be tested (and dry-run) on kernels that have
no aufs: the RecordingMounter keeps the exact (source, target, fstype, flags, data) calls.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aufs import _implementation as native

MS_REMOUNT = 0x20
MNT_DETACH = native.MNT_DETACH


class Mounter(Protocol):
    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None) -> None: ...

    def mount_from(self, directory: str, source: str | None, target: str, fstype: str | None,
                   flags: int, data: str | None) -> None: ...

    def fsmount(self, fstype: str, target: str,
                options: Sequence[tuple[str, str | None]], source: str | None) -> None: ...

    def unmount(self, target: str, flags: int) -> None: ...

    def is_mounted(self, target: str) -> bool: ...


class MountFromUnavailableError(OSError):
    """This process cannot mount with relative paths (no thread of its own cwd)."""


class SyscallMounter:
    """The real thing: mount(2), the new mount API, umount2(2) and a statx mount-root test."""

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None) -> None:
        native.mount(source, target, fstype, flags, data)

    def mount_from(self, directory: str, source: str | None, target: str, fstype: str | None,
                   flags: int, data: str | None) -> None:
        """mount(2) with the relative paths in data resolved from directory (in place while
        this is the process's only thread, as Docker's mounting child does; else on a thread
        whose working directory is its own)."""
        refused = native.mount_from(directory, source, target, fstype, flags, data)
        if refused:
            raise MountFromUnavailableError(refused, os.strerror(refused), "unshare(CLONE_FS)")

    def fsmount(self, fstype: str, target: str,
                options: Sequence[tuple[str, str | None]], source: str | None) -> None:
        native.fsmount(fstype, target, options, source=source)

    def unmount(self, target: str, flags: int) -> None:
        native.unmount(target, flags)

    def is_mounted(self, target: str) -> bool:
        try:
            return native.is_mountpoint(target)
        except FileNotFoundError:
            return False
        except OSError as error:
            # aufs answers ESTALE for the root of a mount one of whose branches was deleted
            # under it: the mount table still knows
            if error.errno != errno.ESTALE:
                raise
            return listed_in_mountinfo(target)


def listed_in_mountinfo(target: str) -> bool:
    """Whether target is a mount point of this mount namespace, by /proc/self/mountinfo."""
    wanted = os.path.abspath(target)
    with open("/proc/self/mountinfo", "rb") as info:
        for line in info:
            point = line.split(b" ", 5)[4]
            decoded = os.fsdecode(point).replace("\\040", " ").replace("\\011", "\t") \
                .replace("\\012", "\n").replace("\\134", "\\")
            if decoded == wanted:
                return True
    return False


SYSCALLS = SyscallMounter()


@dataclass(frozen=True)
class MountCall:
    """One recorded call. `data` holds mount(2) data, or for fsmount the fsconfig steps."""

    operation: str  # "mount", "fsmount" or "unmount"
    source: str | None
    target: str
    fstype: str | None
    flags: int
    data: str | tuple[tuple[str, str | None], ...] | None
    directory: str | None = None  # where relative paths in data start (mount_from)


@dataclass(eq=False)  # compared and hashed by identity, like the real mounter
class RecordingMounter:
    """Records every call instead of making it, and tracks what it "mounted".

    `fail_with` maps an operation name to errnos raised by its next calls, in order, so tests
    can script EBUSY on unmount or EINVAL on mount.
    """

    calls: list[MountCall] = field(default_factory=list)
    mounted: set[str] = field(default_factory=set)
    fail_with: dict[str, list[int]] = field(default_factory=dict)

    def _maybe_fail(self, operation: str, target: str) -> None:
        pending = self.fail_with.get(operation)
        if pending:
            code = pending.pop(0)
            raise OSError(code, os.strerror(code), target)

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None) -> None:
        self.calls.append(MountCall("mount", source, target, fstype, flags, data))
        self._maybe_fail("mount", target)
        if not flags & MS_REMOUNT and target in self.mounted:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), target)
        self.mounted.add(target)

    def mount_from(self, directory: str, source: str | None, target: str, fstype: str | None,
                   flags: int, data: str | None) -> None:
        self.calls.append(MountCall("mount", source, target, fstype, flags, data, directory))
        self._maybe_fail("mount", target)
        if target in self.mounted:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), target)
        self.mounted.add(target)

    def fsmount(self, fstype: str, target: str,
                options: Sequence[tuple[str, str | None]], source: str | None) -> None:
        self.calls.append(MountCall("fsmount", source, target, fstype, 0, tuple(options)))
        self._maybe_fail("fsmount", target)
        self.mounted.add(target)

    def unmount(self, target: str, flags: int) -> None:
        self.calls.append(MountCall("unmount", None, target, None, flags, None))
        self._maybe_fail("unmount", target)
        if target not in self.mounted:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), target)
        self.mounted.discard(target)

    def is_mounted(self, target: str) -> bool:
        return target in self.mounted

    def mount_calls(self) -> list[MountCall]:
        return [call for call in self.calls if call.operation != "unmount"]
