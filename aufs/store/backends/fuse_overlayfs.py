"""The fuse-overlayfs backend: reads AUFS-format diff dirs as they are, rootless if need be.

fuse-overlayfs understands `.wh.<name>` and `.wh..wh..opq` in lower dirs, so it mounts an
existing Docker AUFS store on a kernel without aufs. In its upper dir it writes 0/0 character
devices and trusted.overlay.opaque, which the diff code reads as well.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

from aufs import machine
from aufs.errors import MountError, NotSupportedError
from aufs.fsmagic import FsMagic
from aufs.store.backends.base import Backend, MountRequest
from aufs.store.mounters import MNT_DETACH, Mounter

MOUNT_TIMEOUT = 60


class FuseOverlayfsBackend(Backend):
    name = "fuse-overlayfs"
    whiteout_format = "aufs"
    needs_work_dir = True
    incompatible_filesystems = frozenset({FsMagic.AUFS})

    def __init__(self, mounter: Mounter | None = None, *, binary: str | None = None) -> None:
        super().__init__(mounter)
        self.binary = binary or machine.fuse_overlayfs_binary()

    def check_machine(self) -> None:
        if self.binary is None:
            raise NotSupportedError(
                "fuse-overlayfs is not installed (apt-get install fuse-overlayfs)")
        if not machine.has_fuse_device():
            raise NotSupportedError("/dev/fuse is missing or not writable by this user")

    def mount(self, request: MountRequest) -> None:
        assert self.binary is not None and request.work is not None
        options = (f"lowerdir={':'.join(request.lowers)},upperdir={request.upper},"
                   f"workdir={request.work}")
        if request.label:
            options += f',context="{request.label}"'
        try:
            result = subprocess.run([self.binary, "-o", options, request.target],
                                    capture_output=True, text=True, timeout=MOUNT_TIMEOUT,
                                    check=False)
        except subprocess.TimeoutExpired as error:
            raise MountError(f"fuse-overlayfs did not mount {request.target} within "
                             f"{MOUNT_TIMEOUT} s", errno=errno.ETIMEDOUT, target=request.target,
                             data=options) from error
        if result.returncode != 0 or not self.is_mounted(request.target):
            message = result.stderr.strip() or f"exit status {result.returncode}"
            raise MountError(f"fuse-overlayfs could not mount {request.target}: {message}",
                             errno=errno.EIO, target=request.target, data=options)

    def unmount(self, target: str, flags: int) -> None:
        if os.geteuid() == 0:
            self.mounter.unmount(target, flags)
            return
        # Rootless: only fusermount may unmount a FUSE mount we own.
        helper = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
        command = [helper, "-u"] + (["-z"] if flags & MNT_DETACH else []) + [target]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            text = result.stderr.strip()
            code = (errno.EBUSY if "busy" in text.lower()
                    else errno.EINVAL if "not" in text.lower() else errno.EIO)
            raise OSError(code, text or os.strerror(code), target)
