"""The exceptions of aufs. Every one subclasses AufsError; the driver raises them `from` the
OSError that caused them, so the errno and path stay reachable through __cause__."""

from __future__ import annotations


class AufsError(Exception):
    """Base class of every error aufs raises on purpose."""


class NotSupportedError(AufsError):
    """A backend cannot work here. The message starts with Docker's "driver not supported"."""

    base_message = "driver not supported"

    def __init__(self, reason: str = "") -> None:
        self.reason = reason
        super().__init__(f"{self.base_message}: {reason}" if reason else self.base_message)


class IncompatibleFSError(NotSupportedError):
    """The store's backing filesystem cannot carry this backend (aufs on aufs, btrfs, ecryptfs)."""

    base_message = "backing file system is unsupported for this graph driver"


class InvalidLayerIDError(AufsError, ValueError):
    """A layer id that is empty, too long, or holds characters a store cannot carry."""


class LayerNotFoundError(AufsError, LookupError):
    """No layer with this id exists in the store."""


class LayerExistsError(AufsError):
    """A layer with this id already exists."""


class LayerInUseError(AufsError):
    """The layer is the parent of other layers, or another process (or an apply, or a diff
    being read) holds it."""


class UnbalancedPutError(AufsError):
    """put() of a layer this process holds no reference to, and that is not mounted."""


class MountError(AufsError):
    """A mount or unmount failed. Carries the errno, the mount target and the mount data."""

    def __init__(self, message: str, *, errno: int = 0, target: str = "", data: str = "") -> None:
        super().__init__(message)
        self.errno = errno
        self.target = target
        self.data = data


class UnmountBusyError(MountError):
    """A mount stayed busy through every retry; it is left mounted and its layer intact."""


class DiffError(AufsError):
    """A layer archive is malformed or hostile. The message names the entry and the reason."""
