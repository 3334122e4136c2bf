"""Which backend serves a store: `backend="auto"` and the format rules of DESIGN.md §3."""

from __future__ import annotations

from aufs.errors import NotSupportedError
from aufs.store.backends.aufs import AufsBackend
from aufs.store.backends.base import Backend
from aufs.store.backends.fuse_overlayfs import FuseOverlayfsBackend
from aufs.store.backends.overlay import OverlayBackend
from aufs.store.mounters import Mounter

BACKENDS: dict[str, type[Backend]] = {
    "aufs": AufsBackend,
    "overlay": OverlayBackend,
    "fuse-overlayfs": FuseOverlayfsBackend,
}

# store whiteout format (None: a new root) -> backends "auto" tries, in order
AUTO_ORDER: dict[str | None, tuple[str, ...]] = {
    "aufs": ("aufs", "fuse-overlayfs"),
    "overlay": ("overlay",),
    None: ("aufs", "overlay", "fuse-overlayfs"),
}


def check_format(backend: Backend, store_format: str | None) -> None:
    """Refuses a backend that would show a store's whiteouts as files."""
    if store_format == "aufs" and backend.whiteout_format == "overlay":
        raise NotSupportedError(
            "this store keeps AUFS whiteouts (.wh. files), which kernel overlayfs would show "
            "as plain files; mount it with backend='fuse-overlayfs', or convert it with "
            "`aufs migrate --to overlay`"
        )
    if store_format == "overlay" and backend.name == "aufs":
        raise NotSupportedError(
            "this store keeps overlay whiteouts, which aufs cannot read; use backend='overlay' "
            "or 'fuse-overlayfs', or convert it with `aufs migrate --to aufs`"
        )


def resolve_backend(requested: str | Backend, root: str, store_format: str | None,
                    mounter: Mounter | None = None) -> tuple[Backend, int]:
    """The backend for this root and its statfs magic, or NotSupportedError with reasons."""
    if isinstance(requested, Backend):
        candidates = [requested]
    elif requested == "auto":
        candidates = [BACKENDS[name](mounter) for name in AUTO_ORDER[store_format]]
    elif requested in BACKENDS:
        candidates = [BACKENDS[requested](mounter)]
    else:
        raise ValueError(
            f"unknown backend {requested!r}; choose auto, {', '.join(BACKENDS)} or a Backend")
    failures: list[NotSupportedError] = []
    for backend in candidates:
        try:
            check_format(backend, store_format)
            return backend, backend.check(root)
        except NotSupportedError as error:
            failures.append(error)
    if len(failures) == 1:
        raise failures[0]
    reasons = "; ".join(f"{backend.name}: {error.reason or error}"
                        for backend, error in zip(candidates, failures, strict=True))
    raise NotSupportedError(f"no backend can serve {root} ({reasons})")
