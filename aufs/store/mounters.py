"""Who performs mount(2): the real syscalls, or a recorder that only writes them down.

Backends call a Mounter, so the aufs backend can be tested (and dry-run) on kernels that have
no aufs: the RecordingMounter keeps the exact (source, target, fstype, flags, data) calls.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aufs import _implementation as native

MS_REMOUNT = 0x20
MNT_DETACH = 0x2
CLONE_FS = 0x200


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


class _MountFromThread:
    """Runs mount(2) with relative paths in its data resolved from a given directory, as
    Docker's overlay2 does (mountFrom) so that short names keep deep chains in one page.

    The kernel resolves those paths from the caller's working directory, which the threads
    of a process share. This one thread unshares it (CLONE_FS) at start, so its chdir moves
    no one else's. Started on first use; a forked child starts its own."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the thread does not cross a fork

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[tuple[str, str | None, str, str | None, int,
                                                str | None]] = queue.SimpleQueue()
        self._replies: queue.SimpleQueue[OSError | None] = queue.SimpleQueue()
        self._started = False
        self._unusable: OSError | None = None

    def mount(self, directory: str, source: str | None, target: str, fstype: str | None,
              flags: int, data: str | None) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._serve, name="aufs-mount-from", daemon=True).start()
                self._unusable = self._replies.get()
            if self._unusable is not None:
                raise MountFromUnavailableError(self._unusable.errno, self._unusable.strerror,
                                                "unshare(CLONE_FS)")
            self._requests.put((directory, source, target, fstype, flags, data))
            error = self._replies.get()
        if error is not None:
            raise error

    def _serve(self) -> None:
        try:
            native.unshare(CLONE_FS)
        except OSError as error:
            self._replies.put(error)
            return
        self._replies.put(None)
        while True:
            directory, source, target, fstype, flags, data = self._requests.get()
            try:
                os.chdir(directory)
                native.mount(source, target, fstype, flags, data)
            except OSError as error:
                self._replies.put(error)
            else:
                self._replies.put(None)


_MOUNT_FROM = _MountFromThread()


class SyscallMounter:
    """The real thing: mount(2), the new mount API, umount2(2) and a statx mount-root test."""

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None) -> None:
        native.mount(source, target, fstype, flags, data)

    def mount_from(self, directory: str, source: str | None, target: str, fstype: str | None,
                   flags: int, data: str | None) -> None:
        """mount(2) with the relative paths in data resolved from directory: in this thread
        while it is the process's only one (its cwd moves there and back, as Docker's
        mounting child does), else on the thread of its own cwd (a hand-over each way)."""
        if not native.mount_from(directory, source, target, fstype, flags, data):
            _MOUNT_FROM.mount(directory, source, target, fstype, flags, data)

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
