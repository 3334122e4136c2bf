"""Chooses the native core or its pure-Python twin, in one place.

Higher modules import the low-level functions from here only. AUFS_NO_EXTENSIONS=1 forces the
fallback; a native module that fails to import falls back with a warning.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import TYPE_CHECKING

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
tar_tree = _chosen.tar_tree
TarSplitCollector = _chosen.TarSplitCollector
tarsplit_lines = _chosen.tarsplit_lines
unmount = _chosen.unmount
unshare = _fallback.unshare  # pure Python on both paths

__all__ = [
    "IMPLEMENTATION",
    "IOQueue",
    "TarSplitCollector",
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
    "tarsplit_lines",
    "unmount",
    "unshare",
]
