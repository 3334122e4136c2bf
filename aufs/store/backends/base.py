"""What every union-mount backend provides, and the checks they share."""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import ClassVar

from aufs import _implementation as native
from aufs.errors import IncompatibleFSError
from aufs.fsmagic import backing_fs_name
from aufs.store.mounters import SYSCALLS, Mounter


@dataclass(frozen=True)
class MountRequest:
    """One union mount: the layer's own dir on top of its parents' dirs, nearest first."""

    layer_id: str
    upper: str
    lowers: tuple[str, ...]
    target: str
    work: str | None
    label: str = ""
    # the lowers as short links relative to root ("l/A:l/B"), when the store has them, and
    # the same by full path (ROOT/l/A:ROOT/l/B)
    root: str | None = None
    short_lowerdir: str | None = None
    short_lowerdir_absolute: str | None = None


def existing_ancestor(path: str) -> str:
    """path if it exists, else its nearest existing parent (where statfs can look)."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


class Backend(abc.ABC):
    """A way to union-mount a layer's diff dir over its parents'."""

    name: ClassVar[str]
    whiteout_format: ClassVar[str]  # the format this backend writes in a new store
    needs_work_dir: ClassVar[bool]
    uses_short_links: ClassVar[bool] = False  # mounts through ROOT/l/ (MountRequest.root)
    incompatible_filesystems: ClassVar[frozenset[int]] = frozenset()

    def __init__(self, mounter: Mounter | None = None) -> None:
        self.mounter: Mounter = mounter if mounter is not None else SYSCALLS

    def check(self, root: str) -> int:
        """Raises NotSupportedError saying why this backend cannot serve root; returns the
        statfs magic of root's filesystem."""
        self.check_machine()
        magic = native.fs_magic(existing_ancestor(root))
        if magic in self.incompatible_filesystems:
            raise IncompatibleFSError(f"{self.name} is not supported over {backing_fs_name(magic)}")
        return magic

    @abc.abstractmethod
    def check_machine(self) -> None:
        """Raises NotSupportedError when the kernel or the tools lack what this backend needs."""

    @abc.abstractmethod
    def mount(self, request: MountRequest) -> None:
        """Mounts request.target; raises MountError and leaves nothing mounted on failure."""

    def before_unmount(self, target: str) -> None:  # noqa: B027 - an optional hook
        """Work to do once before the unmount attempts (aufs flushes pseudo-links)."""

    def unmount(self, target: str, flags: int) -> None:
        self.mounter.unmount(target, flags)

    def is_mounted(self, target: str) -> bool:
        return self.mounter.is_mounted(target)

    def dirperm1_supported(self) -> bool:
        return False
