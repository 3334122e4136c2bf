"""Docker's table of statfs(2) f_type magic numbers and the names it shows for them."""

from __future__ import annotations

import enum


class FsMagic(enum.IntEnum):
    """statfs f_type values, as Docker's graphdriver names them."""

    UNSUPPORTED = 0x00000000
    AUFS = 0x61756673
    BTRFS = 0x9123683E
    CRAMFS = 0x28CD3D45
    ECRYPTFS = 0x0000F15F
    EXTFS = 0x0000EF53
    F2FS = 0xF2F52010
    GPFS = 0x47504653
    JFFS2 = 0x000072B6
    JFS = 0x3153464A
    NFS = 0x00006969
    RAMFS = 0x858458F6
    REISERFS = 0x52654973
    SMB = 0x0000517B
    SQUASHFS = 0x73717368
    TMPFS = 0x01021994
    VXFS = 0xA501FCF5
    XFS = 0x58465342
    ZFS = 0x2FC12FC1
    OVERLAY = 0x794C7630
    FUSE = 0x65735546


# The names `docker info` prints as "Backing Filesystem".
FS_NAMES: dict[int, str] = {
    FsMagic.UNSUPPORTED: "unsupported",
    FsMagic.AUFS: "aufs",
    FsMagic.BTRFS: "btrfs",
    FsMagic.CRAMFS: "cramfs",
    FsMagic.ECRYPTFS: "ecryptfs",
    FsMagic.EXTFS: "extfs",
    FsMagic.F2FS: "f2fs",
    FsMagic.GPFS: "gpfs",
    FsMagic.JFFS2: "jffs2",
    FsMagic.JFS: "jfs",
    FsMagic.NFS: "nfs",
    FsMagic.RAMFS: "ramfs",
    FsMagic.REISERFS: "reiserfs",
    FsMagic.SMB: "smb",
    FsMagic.SQUASHFS: "squashfs",
    FsMagic.TMPFS: "tmpfs",
    FsMagic.VXFS: "vxfs",
    FsMagic.XFS: "xfs",
    FsMagic.ZFS: "zfs",
    FsMagic.OVERLAY: "overlayfs",
    FsMagic.FUSE: "fuse",
}


def backing_fs_name(magic: int) -> str:
    """Docker's name for a magic number, or "<unknown>" as Docker shows before it knows."""
    return FS_NAMES.get(magic, "<unknown>")
