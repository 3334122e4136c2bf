"""Whiteouts in both formats: AUFS (`.wh.<name>` files, `.wh..wh..opq` markers), which is
what archives carry, and overlay (0/0 character devices, trusted.overlay.opaque=y)."""

from __future__ import annotations

import os
import stat

PREFIX = ".wh."
META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
FUSE_OPAQUE_XATTR = "user.fuseoverlayfs.opaque"

# Attributes the union filesystems keep for themselves. Taken from an archive they could make
# overlayfs redirect lookups elsewhere, so they are never applied nor exported.
INTERNAL_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
HOST_ONLY_XATTRS = frozenset({"security.selinux"})


def is_overlay_whiteout(info: os.stat_result) -> bool:
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == 0


def is_internal_xattr(name: str) -> bool:
    return name.startswith(INTERNAL_XATTR_PREFIXES) or name in HOST_ONLY_XATTRS


def is_opaque(directory: int | str) -> bool:
    """Whether a directory (fd or path) carries overlay's opaque mark."""
    for name in (OVERLAY_OPAQUE_XATTR, FUSE_OPAQUE_XATTR):
        try:
            if isinstance(directory, int):
                value = os.getxattr(directory, name)
            else:
                value = os.getxattr(directory, name, follow_symlinks=False)
            if value == b"y":
                return True
        except OSError:
            continue
    return False
