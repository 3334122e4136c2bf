"""The aufs backend: Docker's own way, for kernels that still ship the aufs module."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from typing import Any

from aufs import _implementation as native
from aufs.errors import MountError, NotSupportedError
from aufs.fsmagic import FsMagic
from aufs.machine import Kernel
from aufs.store.backends.base import Backend, MountRequest
from aufs.store.mounters import MNT_DETACH, MS_REMOUNT, Mounter
from aufs.store.retry import RetryPolicy

log = logging.getLogger(__name__)

# aufs creates and unlinks the shared /dev/shm/aufs.xino during every mount, so two mounts at
# once race (moby PR 39107): every mount(2) of this process goes through this lock.
MOUNT_LOCK = threading.Lock()


_dirperm1_results: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def probe_dirperm1(mounter: Mounter) -> bool:
    """Docker's test, once per process (and per mounter): can aufs mount with dirperm1?"""
    if mounter not in _dirperm1_results:
        _dirperm1_results[mounter] = _mount_with_dirperm1(mounter)
    return _dirperm1_results[mounter]


def _mount_with_dirperm1(mounter: Mounter) -> bool:
    try:
        base = tempfile.mkdtemp(prefix="docker-aufs-base")
        union = tempfile.mkdtemp(prefix="docker-aufs-union")
    except OSError as error:
        log.error("error checking dirperm1: %s", error)
        return False
    try:
        with MOUNT_LOCK:
            mounter.mount("none", union, "aufs", 0, f"br:{base},dirperm1,xino=/dev/shm/aufs.xino")
    except OSError:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(union, ignore_errors=True)
        return False
    try:
        mounter.unmount(union, MNT_DETACH)
    except OSError as error:
        log.error("error checking dirperm1: failed to unmount %s", error)
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(union, ignore_errors=True)
    return True


class AufsBackend(Backend):
    """Mounts Docker's `br:` data, then `append:` remounts, all under one lock.

    mounter, kernel, dirperm1 and auplink can be injected: on kernels without aufs, tests use a
    RecordingMounter and a Kernel that lists aufs, and check the exact mount(2) calls.
    """

    name = "aufs"
    whiteout_format = "aufs"
    needs_work_dir = False
    incompatible_filesystems = frozenset({FsMagic.AUFS, FsMagic.BTRFS, FsMagic.ECRYPTFS})

    def __init__(
        self,
        mounter: Mounter | None = None,
        *,
        kernel: Kernel | None = None,
        dirperm1: bool | None = None,
        auplink: str | None = "auto",
        policy: RetryPolicy | None = None,
    ) -> None:
        super().__init__(mounter)
        self._kernel = kernel
        self._dirperm1 = dirperm1
        self._auplink = shutil.which("auplink") if auplink == "auto" else auplink
        self._policy = policy or RetryPolicy()

    def check_machine(self) -> None:
        kernel = self._kernel
        if kernel is None:
            _try_modprobe()
            kernel = Kernel.current()
        if kernel.user_namespace:
            raise NotSupportedError("AUFS cannot be used in non-init user namespace")
        if "aufs" not in kernel.filesystems:
            raise NotSupportedError("AUFS was not found in /proc/filesystems")

    def dirperm1_supported(self) -> bool:
        if self._dirperm1 is None:
            self._dirperm1 = probe_dirperm1(self.mounter)
        return self._dirperm1

    def mount(self, request: MountRequest) -> None:
        chunks = native.aufs_mount_data(request.upper, request.lowers, request.label,
                                        dirperm1=self.dirperm1_supported())
        data = chunks[0]
        with MOUNT_LOCK:
            try:
                self.mounter.mount("none", request.target, "aufs", 0, data)
                for data in chunks[1:]:
                    self.mounter.mount("none", request.target, "aufs", MS_REMOUNT, data)
            except OSError as error:
                with contextlib.suppress(OSError):
                    self.mounter.unmount(request.target, MNT_DETACH)
                raise MountError(
                    f"error creating aufs mount to {request.target}: {error.strerror} "
                    f"(data={data})",
                    errno=error.errno or 0, target=request.target, data=data,
                ) from error

    def before_unmount(self, target: str) -> None:
        """`auplink <target> flush`, retried while it exits with 22; failures only warn."""
        if self._auplink is None:
            return
        retries = self._policy.auplink_retries
        for attempt in range(retries + 1):
            result = subprocess.run([self._auplink, target, "flush"], capture_output=True,
                                    text=True, check=False)
            if result.returncode == 0:
                return
            output = (result.stdout + result.stderr).strip()
            if attempt >= retries or result.returncode != 22:
                log.warning("auplink flush failed: %s", output)
                return
            log.debug("auplink flush error (retrying %d/%d): %s", attempt + 1, retries, output)


def _try_modprobe() -> None:
    """Docker runs `modprobe aufs` and ignores the result (it fails inside containers)."""
    if shutil.which("modprobe") is None or os.path.exists("/sys/module/aufs"):
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["modprobe", "aufs"], capture_output=True, check=False, timeout=10)
