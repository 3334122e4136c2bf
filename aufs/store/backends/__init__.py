"""Union-mount backends: aufs (Docker's), kernel overlayfs and fuse-overlayfs."""

from aufs.store.backends.aufs import AufsBackend
from aufs.store.backends.base import Backend, MountRequest
from aufs.store.backends.fuse_overlayfs import FuseOverlayfsBackend
from aufs.store.backends.overlay import OverlayBackend
from aufs.store.backends.select import BACKENDS, resolve_backend

__all__ = [
    "BACKENDS",
    "AufsBackend",
    "Backend",
    "FuseOverlayfsBackend",
    "MountRequest",
    "OverlayBackend",
    "resolve_backend",
]
