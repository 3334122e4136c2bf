"""The kernel overlayfs backend, for stores that keep overlay-format whiteouts."""

from __future__ import annotations

import errno
import logging
import os

from aufs import machine
from aufs.errors import MountError, NotSupportedError
from aufs.fsmagic import FsMagic
from aufs.machine import Kernel
from aufs.store.backends.base import Backend, MountRequest
from aufs.store.mounters import Mounter, MountFromUnavailableError

log = logging.getLogger(__name__)

# Keep the upper dir a plain layer diff: no redirect xattrs for renamed dirs (a rename copies
# the tree up instead), no metadata-only copy-ups, no index of hardlinked lower files.
DIFF_SAFE_OPTIONS: tuple[tuple[str, str], ...] = (
    ("redirect_dir", "off"),
    ("index", "off"),
    ("metacopy", "off"),
)


class OverlayBackend(Backend):
    """Mounts as Docker's overlay2 does: one classic mount(2) whose lowerdir data names the
    layers by their short links (`l/<26 chars>`), by full path when that fits in one page,
    else relative to the store's root (about 130 layers fit). Deeper chains use the new mount
    API, one `lowerdir+` per layer (Linux 6.7+); older kernels stop at one page."""

    name = "overlay"
    whiteout_format = "overlay"
    needs_work_dir = True
    uses_short_links = True
    incompatible_filesystems = frozenset(
        {FsMagic.AUFS, FsMagic.OVERLAY, FsMagic.ECRYPTFS, FsMagic.NFS, FsMagic.FUSE}
    )

    def __init__(self, mounter: Mounter | None = None, *, kernel: Kernel | None = None,
                 lowerdir_append: bool | None = None) -> None:
        super().__init__(mounter)
        self._kernel = kernel
        self._lowerdir_append = (machine.has_overlay_lowerdir_append()
                                 if lowerdir_append is None else lowerdir_append)
        self._mount_from = True  # until the mounter says it cannot
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        self._data_cache: dict[str, tuple[MountRequest, str | None, str | None]] = {}

    def check_machine(self) -> None:
        kernel = self._kernel or Kernel.current()
        if "overlay" not in kernel.filesystems:
            raise NotSupportedError("overlay was not found in /proc/filesystems")
        if os.geteuid() != 0 or kernel.user_namespace:
            raise NotSupportedError(
                "kernel overlayfs whiteouts need root in the initial user namespace; "
                "use backend='fuse-overlayfs' to run rootless"
            )

    def mount(self, request: MountRequest) -> None:
        assert request.work is not None, "overlay needs a work dir"
        tail: list[tuple[str, str | None]] = [("upperdir", request.upper),
                                              ("workdir", request.work), *DIFF_SAFE_OPTIONS]
        if request.label:
            tail.append(("context", request.label))
        absolute, relative = self._short_link_data(request, tail)
        if absolute is not None:  # fits by full path: nothing to resolve from the root
            try:
                self.mounter.mount("aufs", request.target, "overlay", 0, absolute)
                return
            except OSError as error:
                raise _mount_error(request, error, absolute) from error
        if relative is not None and self._mount_from:
            try:
                self.mounter.mount_from(request.root or "", "aufs", request.target, "overlay", 0,
                                        relative)
                return
            except MountFromUnavailableError as error:
                log.warning("overlay: cannot mount with relative paths (%s); using full "
                            "paths", error)
                self._mount_from = False
            except OSError as error:
                raise _mount_error(request, error, relative) from error
        if self._lowerdir_append:
            options = [("lowerdir+", lower) for lower in request.lowers] + tail
            try:
                self.mounter.fsmount("overlay", request.target, options, "aufs")
                return
            except OSError as error:
                if error.errno == errno.ENOSYS or "lowerdir+" in str(error):
                    log.warning("overlay: no lowerdir+ on this kernel (%s); using lowerdir=",
                                error)
                    self._lowerdir_append = False
                else:
                    raise _mount_error(request, error,
                                       ",".join(f"{k}={v}" for k, v in options)) from error
        self._mount_classic(request, tail)

    def _short_link_data(self, request: MountRequest, tail: list[tuple[str, str | None]]
                         ) -> tuple[str | None, str | None]:
        """The classic data through the short links that fits in a page: (by full path,
        relative to request.root), at most one of them; cached for the request, which the
        driver keeps while the layer's chain is unchanged."""
        cached = self._data_cache.get(request.target)
        if cached is not None and cached[0] is request:
            return cached[1], cached[2]
        absolute = relative = None
        if request.short_lowerdir_absolute is not None:
            absolute = _classic_data(request.short_lowerdir_absolute, tail)
            if len(absolute.encode()) >= self._page_size:
                absolute = None
        if absolute is None and request.short_lowerdir is not None and request.root:
            relative = _classic_data(request.short_lowerdir, tail)
            if len(relative.encode()) >= self._page_size:
                relative = None
        if len(self._data_cache) > 4096:
            self._data_cache.clear()
        self._data_cache[request.target] = (request, absolute, relative)
        return absolute, relative

    def _mount_classic(self, request: MountRequest, tail: list[tuple[str, str | None]]) -> None:
        data = _classic_data(":".join(request.lowers), tail)
        if len(data.encode()) >= self._page_size:
            raise MountError(
                f"{len(request.lowers)} layers do not fit in one page of overlay mount options "
                "on this kernel; Linux 6.7+ mounts any depth with lowerdir+",
                errno=errno.E2BIG, target=request.target, data=data,
            )
        try:
            self.mounter.mount("aufs", request.target, "overlay", 0, data)
        except OSError as error:
            raise _mount_error(request, error, data) from error


def _classic_data(lowerdir: str, tail: list[tuple[str, str | None]]) -> str:
    pieces = [f"lowerdir={lowerdir}"]
    pieces += [key if value is None else f"{key}={value}" for key, value in tail]
    return ",".join(pieces)


def _mount_error(request: MountRequest, error: OSError, data: str) -> MountError:
    return MountError(f"error creating overlay mount to {request.target}: {error.strerror}",
                      errno=error.errno or 0, target=request.target, data=data)
