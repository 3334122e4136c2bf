"""Which gzip inflater decompresses layers: ISA-L's (the optional `fast` extra, `pip install
'aufs[fast]'`, about twice zlib's speed on layer blobs) when it is installed, else zlib.

Both hand out an object with zlib's decompressobj interface (`decompress(data,
max_length)`, `eof`, `unused_data`, `unconsumed_tail`, `flush()`), reading gzip members
(wbits 16 + 15), and both release the GIL while they work. AUFS_INFLATER=zlib (or isal)
chooses one by name.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

GZIP_WBITS = 16 + zlib.MAX_WBITS
INFLATERS = ("isal", "zlib")  # in order of preference


class InflaterUnavailableError(ImportError):
    """The inflater asked for by name is not installed."""


@dataclass(frozen=True)
class Inflater:
    """A gzip inflater: its name, its library's version, and a decompressobj factory."""

    name: str
    version: str
    new_gzip_decompressor: Callable[[], Any]


def _isal() -> Inflater:
    try:
        import isal  # type: ignore[import-not-found, unused-ignore]
        from isal import isal_zlib  # type: ignore[import-not-found, unused-ignore]
    except ImportError as error:
        raise InflaterUnavailableError(
            f"isal is not installed (pip install 'aufs[fast]'): {error}") from None
    return Inflater("isal", str(getattr(isal, "__version__", "?")),
                    lambda: isal_zlib.decompressobj(GZIP_WBITS))


def _zlib() -> Inflater:
    return Inflater("zlib", zlib.ZLIB_RUNTIME_VERSION, lambda: zlib.decompressobj(GZIP_WBITS))


_LOADERS: dict[str, Callable[[], Inflater]] = {"isal": _isal, "zlib": _zlib}


def select_inflater(name: str | None = None) -> Inflater:
    """The named inflater (InflaterUnavailableError if it is not installed), or without a
    name the first of INFLATERS that is."""
    if name:
        if name not in _LOADERS:
            raise ValueError(f"unknown inflater {name!r}; choose from {', '.join(INFLATERS)}")
        return _LOADERS[name]()
    for candidate in INFLATERS:
        try:
            return _LOADERS[candidate]()
        except InflaterUnavailableError:
            continue
    return _zlib()


def _from_environment() -> Inflater:
    wanted = os.environ.get("AUFS_INFLATER", "")
    try:
        return select_inflater(wanted or None)
    except (InflaterUnavailableError, ValueError) as error:
        log.warning("AUFS_INFLATER=%s: %s; using the default", wanted, error)
        return select_inflater()


GZIP_INFLATER: Inflater = _from_environment()


def _errors() -> tuple[type[Exception], ...]:
    try:
        from isal import isal_zlib  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return (zlib.error,)
    isal_error = isal_zlib.error
    assert isinstance(isal_error, type) and issubclass(isal_error, Exception)
    return (zlib.error, isal_error)


# what either inflater raises on corrupt data (ISA-L's error is not a zlib.error)
ERRORS: tuple[type[Exception], ...] = _errors()


def new_gzip_decompressor() -> Any:
    """A decompressobj for one gzip member, from the inflater chosen at import."""
    return GZIP_INFLATER.new_gzip_decompressor()
