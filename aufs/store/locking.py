"""Locks: per-id locks inside a process, the root lock across processes, and the shared
references that tell one process whether another still uses a layer's mount."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from dataclasses import dataclass, field


def lock_would_block(path: str, *, exclusive: bool) -> bool:
    """True when another open file (in any process) holds a flock on path that a shared
    (or exclusive) lock would wait for; False when path is gone or free."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False


class NamedLocks:
    """One lock per name, created on demand and dropped when nobody waits (moby/locker)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def hold(self, name: str) -> _NamedHold:
        return _NamedHold(self, name)

    def _enter(self, name: str) -> None:
        with self._guard:
            entry = self._locks.get(name)
            lock = threading.Lock() if entry is None else entry[0]
            self._locks[name] = (lock, 1 if entry is None else entry[1] + 1)
        try:
            lock.acquire()
        except BaseException:  # interrupted while waiting: give the place back
            with self._guard:
                self._drop(name)
            raise

    def _drop(self, name: str) -> None:
        lock, users = self._locks[name]
        if users == 1:
            del self._locks[name]
        else:
            self._locks[name] = (lock, users - 1)

    def _exit(self, name: str) -> None:
        with self._guard:
            self._locks[name][0].release()
            self._drop(name)


class _NamedHold:
    """`with locks.hold(name):` (a class, not a generator: get and put take it each time)."""

    __slots__ = ("_locks", "_name")

    def __init__(self, locks: NamedLocks, name: str) -> None:
        self._locks = locks
        self._name = name

    def __enter__(self) -> None:
        self._locks._enter(self._name)

    def __exit__(self, *exc_info: object) -> None:
        self._locks._exit(self._name)


class RootLock:
    """Serialises changes to a store root across threads and processes.

    It flocks the root's layers/ directory itself, so it adds no file to a Docker root and
    works on a read-only mount. Re-entrant within a thread.
    """

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    def hold(self) -> RootLock:
        """`with root.hold():`; the lock is its own context manager."""
        return self

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            if self._depth == 0:
                if self._fd is None:
                    self._fd = os.open(self._directory,
                                       os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._depth -= 1
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        with self._thread_lock:
            if self._fd is not None and self._depth == 0:
                os.close(self._fd)
                self._fd = None


class LayerReferences:
    """How many times this process holds each layer, plus a shared flock on the layer's diff
    dir while it holds any. Another process can then ask `held_elsewhere` before unmounting.
    Locks die with their process, so a crash never leaves a stale reference."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._fds: dict[str, int] = {}

    def count(self, layer_id: str) -> int:
        return self._counts.get(layer_id, 0)

    def held(self) -> list[str]:
        return [layer_id for layer_id, count in self._counts.items() if count > 0]

    def acquire(self, layer_id: str, diff_path: str) -> int:
        count = self._counts.get(layer_id, 0) + 1
        if count == 1:
            fd = os.open(diff_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._fds[layer_id] = fd
        self._counts[layer_id] = count
        return count

    def release(self, layer_id: str) -> int:
        count = self._counts.get(layer_id, 0) - 1
        if count <= 0:
            self.forget(layer_id)
            return 0
        self._counts[layer_id] = count
        return count

    def forget(self, layer_id: str) -> None:
        self._counts.pop(layer_id, None)
        fd = self._fds.pop(layer_id, None)
        if fd is not None:
            os.close(fd)

    def restore(self, layer_id: str, diff_path: str, count: int) -> None:
        """Takes back `count` references dropped by forget()."""
        for _ in range(count):
            self.acquire(layer_id, diff_path)

    def forget_all(self) -> None:
        for layer_id in list(self._counts):
            self.forget(layer_id)

    @staticmethod
    def hold_shared(diff_path: str) -> int:
        """A shared flock on a layer that is not counted as a reference (an apply or a diff
        under way): other processes see the layer as held. Close the fd to let go."""
        fd = os.open(diff_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

    @staticmethod
    def lock_for_change(layer_file: str) -> int:
        """An exclusive flock on layers/<id> for an apply: it does not move when the diff dir
        is swapped, so it guards the layer for the whole operation. Close the fd to let go."""
        fd = os.open(layer_file, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @staticmethod
    def changing(layer_file: str) -> bool:
        """True while an apply (in any process) holds layers/<id>."""
        return lock_would_block(layer_file, exclusive=False)

    @staticmethod
    def held_elsewhere(diff_path: str) -> bool:
        """True when another process (or another Driver) holds a reference to this layer."""
        return lock_would_block(diff_path, exclusive=True)


@dataclass(frozen=True)
class StoreLocks:
    """The locks of one open store, shared by the Driver and its diffs: per-id locks, the
    root lock, and this process's references to layers."""

    root: RootLock
    ids: NamedLocks = field(default_factory=NamedLocks)
    references: LayerReferences = field(default_factory=LayerReferences)
