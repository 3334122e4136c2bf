"""Chooses the native core or its pure-Python twin, in one place.

Higher modules import the low-level functions from here only. AUFS_NO_EXTENSIONS=1 forces the
fallback; a native module that fails to import falls back with a warning.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_forced_fallback = os.environ.get("AUFS_NO_EXTENSIONS", "") not in ("", "0")

if _forced_fallback:
    from aufs._fallback import (
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
else:
    try:
        from aufs._native import (
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
    except ImportError as error:
        log.warning("aufs native extension unavailable (%s); using the pure-Python fallback",
                    error)
        from aufs._fallback import (
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

__all__ = [
    "IMPLEMENTATION",
    "aufs_mount_data",
    "directory_size",
    "fs_magic",
    "fsmount",
    "is_mountpoint",
    "mount",
    "mounted",
    "unmount",
]
