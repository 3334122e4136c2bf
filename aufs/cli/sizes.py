"""Sizes a person can read, as `docker images` prints them: decimal units and four
significant digits (Docker's go-units HumanSize), so 198900834 bytes is `198.9MB`."""

from __future__ import annotations

UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def human_size(size: float) -> str:
    """HumanSize's rule: divide by 1000 while the value is at least 1000 and a bigger unit
    is left, then print it with `%.4g` (so 999999 bytes is `1000kB`, as Docker prints it)."""
    value = float(size)
    unit = 0
    while value >= 1000.0 and unit < len(UNITS) - 1:
        value /= 1000.0
        unit += 1
    return f"{value:.4g}{UNITS[unit]}"
