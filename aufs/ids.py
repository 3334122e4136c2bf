"""Layer ids: what a store accepts as a name for a layer."""

from __future__ import annotations

import re

from aufs.errors import InvalidLayerIDError

_ALLOWED = re.compile(r"[A-Za-z0-9_.-]+")
_MAX_BYTES = 255
REMOVING_SUFFIX = "-removing"


def validate_layer_id(layer_id: object, what: str = "layer id") -> str:
    """Returns the id if a store can carry it, else raises InvalidLayerIDError saying why.

    Docker's 64-hex ids and any name made of [A-Za-z0-9_.-] pass. Refused: empty, "." and
    "..", anything with "/", NUL or ",:=" (they would break paths or mount options), names
    ending in "-removing" (reserved for deletion in progress) and names over 255 bytes.
    """
    if not isinstance(layer_id, str):
        raise InvalidLayerIDError(f"{what} must be a str, not {type(layer_id).__name__}")
    if not layer_id:
        raise InvalidLayerIDError(f"{what} is empty")
    if layer_id in (".", ".."):
        raise InvalidLayerIDError(f"{what} {layer_id!r} names a directory, not a layer")
    if len(layer_id.encode("utf-8", "surrogateescape")) > _MAX_BYTES:
        raise InvalidLayerIDError(f"{what} is longer than {_MAX_BYTES} bytes")
    if not _ALLOWED.fullmatch(layer_id):
        bad = sorted({character for character in layer_id if not _ALLOWED.fullmatch(character)})
        raise InvalidLayerIDError(
            f"{what} {layer_id!r} holds {', '.join(map(repr, bad))}; use only letters, digits "
            "and '_', '.', '-'"
        )
    if layer_id.endswith(REMOVING_SUFFIX):
        raise InvalidLayerIDError(
            f"{what} {layer_id!r} ends in {REMOVING_SUFFIX!r}, which marks a layer being deleted"
        )
    return layer_id
