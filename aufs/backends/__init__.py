"""Union-mount backends: aufs (Docker's), kernel overlayfs and fuse-overlayfs."""

from aufs.backends.aufs import AufsBackend
from aufs.backends.base import Backend, MountRequest
from aufs.backends.fuse_overlayfs import FuseOverlayfsBackend
from aufs.backends.overlay import OverlayBackend
from aufs.backends.select import BACKENDS, resolve_backend

__all__ = [
    "BACKENDS",
    "AufsBackend",
    "Backend",
    "FuseOverlayfsBackend",
    "MountRequest",
    "OverlayBackend",
    "resolve_backend",
]
