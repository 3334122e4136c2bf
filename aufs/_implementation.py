"""Chooses the native core or its pure-Python twin, in one place.

Higher modules import the low-level functions from here only. AUFS_NO_EXTENSIONS=1 forces the
fallback; a native module that fails to import falls back with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from aufs import _fallback

log = logging.getLogger(__name__)


def _choose() -> ModuleType:
    if os.environ.get("AUFS_NO_EXTENSIONS", "") not in ("", "0"):
        return _fallback
    try:
        from aufs import _native
    except ImportError as error:
        log.warning("aufs native extension unavailable (%s); using the pure-Python fallback",
                    error)
        return _fallback
    return _native


if TYPE_CHECKING:  # the native stub (_native.pyi) mirrors the fallback's signatures
    _chosen = _fallback
else:
    _chosen = _choose()

IMPLEMENTATION: str = _chosen.IMPLEMENTATION
MNT_DETACH = _fallback.MNT_DETACH  # umount2(2): detach now, clean up when no longer busy
IOQueue = _chosen.IOQueue
aufs_mount_data = _chosen.aufs_mount_data
crc64_iso = _chosen.crc64_iso
directory_size = _chosen.directory_size
finish_file = _chosen.finish_file
fs_magic = _chosen.fs_magic
fsmount = _chosen.fsmount
is_mountpoint = _chosen.is_mountpoint
mount = _chosen.mount
mount_from = _chosen.mount_from
mounted = _chosen.mounted
openat2 = _chosen.openat2
open_directory_stepwise = _fallback.open_directory_stepwise  # pure Python on both paths
parse_tar_header = _chosen.parse_tar_header
parse_tar_number = _chosen.parse_tar_number
renameat2 = _chosen.renameat2
# native only: the tar of a tree, walked in C (csrc/tartree.c); its readable twin is
# aufs.archive.export.walk_tree, one floor up, as it builds headers with aufs.archive.format
tar_tree: Callable[..., OSError | None] | None = getattr(_chosen, "tar_tree", None)
TarSplitCollector = _chosen.TarSplitCollector
# native only: tar-split's gzip on a C thread without the GIL (csrc/gzlines.c); without it,
# aufs.archive.tarsplit.TarSplitRecorder compresses on a Python thread (the same file)
GzipLines: Callable[..., Any] | None = getattr(_chosen, "GzipLines", None)
tarsplit_lines = _chosen.tarsplit_lines
tarsplit_fd_cap = _chosen.tarsplit_fd_cap
tarsplit_fds_held = _chosen.tarsplit_fds_held
unmount = _chosen.unmount
unpack_run = _chosen.unpack_run
UnpackRun = _fallback.UnpackRun
UNPACK_NEED_DATA = _fallback.UNPACK_NEED_DATA
UNPACK_PARENT = _fallback.UNPACK_PARENT
UNPACK_ERROR = _fallback.UNPACK_ERROR
unshare = _fallback.unshare  # pure Python on both paths

__all__ = [
    "IMPLEMENTATION",
    "MNT_DETACH",
    "UNPACK_ERROR",
    "UNPACK_NEED_DATA",
    "UNPACK_PARENT",
    "GzipLines",
    "IOQueue",
    "TarSplitCollector",
    "UnpackRun",
    "aufs_mount_data",
    "crc64_iso",
    "directory_size",
    "finish_file",
    "fs_magic",
    "fsmount",
    "is_mountpoint",
    "mount",
    "mount_from",
    "mounted",
    "open_directory_stepwise",
    "openat2",
    "parse_tar_header",
    "parse_tar_number",
    "renameat2",
    "tar_tree",
    "tarsplit_fd_cap",
    "tarsplit_fds_held",
    "tarsplit_lines",
    "unmount",
    "unpack_run",
    "unshare",
]
