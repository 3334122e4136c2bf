"""The aufs backend: Docker's own way, for kernels that still ship the aufs module."""

from __future__ import annotations

import contextlib
import errno
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


# The kernel's limits, measured on Linux 6.1 with aufs6.1 (tests/guest, tests/store/
# test_backend_aufs_kernel.py):
# - a mount holds at most AUFS_BRANCH_MAX branches, 127 in aufs' default build
#   (CONFIG_AUFS_BRANCH_MAX_127; 511, 1023 and 32767 are build options); the next append: fails
#   with ENOSPC, and a first mount(2) past it can oops the kernel;
# - one mount(2) call parses its options into a single page of 48-byte struct au_opt (85
#   slots): past 82 branches plus dio and xino it fails with E2BIG, and a few more oops the
#   kernel. Docker sized its calls in bytes only, which holds ~40 of its 91-byte paths; shorter
#   paths would put far more in one call, so no call carries more than BRANCHES_PER_CALL.
AUFS_BRANCH_MAX = 127
BRANCHES_PER_CALL = 64
_MOUNT_DATA_RESERVE = 54  # what Docker keeps free in each page for the options


def split_mount_data(chunks: list[str], per_call: int = BRANCHES_PER_CALL,
                     page: int | None = None) -> list[str]:
    """Docker's mount data (aufs_mount_data) with no call holding more than per_call branches.

    Docker's own calls pass through unchanged; a call with too many branches is cut, its
    surplus going into `append:` remounts of at most per_call branches that fit in a page.
    Branch paths hold no ':', ',' or '=' (aufs_mount_data refuses them), so splitting is safe.
    """
    first, appends = chunks[0], chunks[1:]
    branch_part, comma, first_options = first.partition(",")
    branches = branch_part.removeprefix("br:").split(":")
    label = first_options[first_options.find('context="') - 1:] if 'context="' in first_options \
        else ""
    if len(branches) <= per_call and all(
            chunk.count("append:") <= per_call for chunk in appends):
        return chunks
    page = os.sysconf("SC_PAGE_SIZE") if page is None else page
    capacity = page - len(label) - _MOUNT_DATA_RESERVE
    items = [f"append:{branch}," for branch in branches[per_call:]]
    for chunk in appends:
        items += [f"{item}," for item in chunk.removesuffix(label).split(",")
                  if item.startswith("append:")]
    result = ["br:" + ":".join(branches[:per_call]) + comma + first_options]
    current = ""
    for item in items:
        if current and (current.count("append:") >= per_call
                        or len(current) + len(item) > capacity):
            result.append(current + label)
            current = ""
        current += item
    if current:
        result.append(current + label)
    return result


def branch_limit_message(layer_id: str, branches: int, limit: int) -> str:
    return (
        f"layer {layer_id} needs {branches} aufs branches (itself and {branches - 1} parents), "
        f"but aufs mounts at most {limit} (CONFIG_AUFS_BRANCH_MAX_{limit}); mount this store "
        "with backend='fuse-overlayfs' (no branch limit), or convert it with "
        "`aufs migrate --to overlay` for backend='overlay' (up to 500 layers)"
    )


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
        branch_max: int = AUFS_BRANCH_MAX,
    ) -> None:
        super().__init__(mounter)
        self._kernel = kernel
        self._dirperm1 = dirperm1
        self._auplink = shutil.which("auplink") if auplink == "auto" else auplink
        self._policy = policy or RetryPolicy()
        self.branch_max = branch_max

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
        branches = 1 + len(request.lowers)
        if branches > self.branch_max:
            raise MountError(
                f"error creating aufs mount to {request.target}: "
                + branch_limit_message(request.layer_id, branches, self.branch_max),
                errno=errno.ENOSPC, target=request.target)
        chunks = split_mount_data(native.aufs_mount_data(
            request.upper, request.lowers, request.label, dirperm1=self.dirperm1_supported()))
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
