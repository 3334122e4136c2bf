"""aufs: Docker's AUFS layer store, mounted on today's kernels.

The low-level functions come from the native extension or its pure-Python twin;
`aufs.IMPLEMENTATION` says which one is live (AUFS_NO_EXTENSIONS=1 forces the fallback).
"""

from __future__ import annotations

import os

from aufs._implementation import (
    IMPLEMENTATION,
    aufs_mount_data,
    directory_size,
    fs_magic,
    fsmount,
    is_mountpoint,
    mount,
    mounted,
    unmount,
)
from aufs.archive.changes import Change, ChangeKind
from aufs.errors import (
    AufsError,
    DiffError,
    IncompatibleFSError,
    InvalidLayerIDError,
    LayerExistsError,
    LayerInUseError,
    LayerNotFoundError,
    MountError,
    NotSupportedError,
    UnbalancedPutError,
    UnmountBusyError,
)
from aufs.fsmagic import FS_NAMES, FsMagic, backing_fs_name
from aufs.store.backends import (
    AufsBackend,
    Backend,
    FuseOverlayfsBackend,
    MountRequest,
    OverlayBackend,
)
from aufs.store.diffs import FileGetter
from aufs.store.driver import CreateOpts, Driver
from aufs.store.mounters import MountCall, RecordingMounter, SyscallMounter
from aufs.store.retry import RetryPolicy

__version__ = "0.1.0"


def get_include() -> list[str]:
    """Directories to give Cython (include_path) so that `cimport aufs` finds aufs/*.pxd."""
    return [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]


__all__ = [
    "FS_NAMES",
    "IMPLEMENTATION",
    "AufsBackend",
    "AufsError",
    "Backend",
    "Change",
    "ChangeKind",
    "CreateOpts",
    "DiffError",
    "Driver",
    "FileGetter",
    "FsMagic",
    "FuseOverlayfsBackend",
    "IncompatibleFSError",
    "InvalidLayerIDError",
    "LayerExistsError",
    "LayerInUseError",
    "LayerNotFoundError",
    "MountCall",
    "MountError",
    "MountRequest",
    "NotSupportedError",
    "OverlayBackend",
    "RecordingMounter",
    "RetryPolicy",
    "SyscallMounter",
    "UnbalancedPutError",
    "UnmountBusyError",
    "aufs_mount_data",
    "backing_fs_name",
    "directory_size",
    "fs_magic",
    "fsmount",
    "get_include",
    "is_mountpoint",
    "mount",
    "mounted",
    "unmount",
]
