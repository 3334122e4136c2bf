"""The archives the campaigns apply: fixed content, big enough that a kill can land inside."""

from __future__ import annotations

import io
import random

from aufs.archive.format import (
    DIRECTORY,
    HARDLINK,
    REGULAR,
    SYMLINK,
    ZERO_BLOCK,
    TarHeader,
    build_header,
    padding,
)


def campaign_archive(index: int, files: int = 300) -> bytes:
    """Archive `index`: dirs, files of a few KB, a symlink, a hardlink and a whiteout."""
    rng = random.Random(index)
    out = io.BytesIO()

    def add(name: str, kind: bytes, data: bytes = b"", link: str = "") -> None:
        out.write(build_header(TarHeader(name=name, typeflag=kind, mode=0o755 if kind == DIRECTORY
                                         else 0o644, size=len(data), linkname=link,
                                         mtime_ns=1_700_000_000_000_000_000)))
        out.write(data + padding(len(data)))

    for directory in range(10):
        add(f"d{directory}/", DIRECTORY)
    for number in range(files):
        add(f"d{number % 10}/f{index}-{number}", REGULAR, rng.randbytes(rng.randint(0, 8000)))
    add("link", SYMLINK, link=f"d0/f{index}-0")
    add("hard", HARDLINK, link=f"d1/f{index}-1")
    add(".wh.gone", REGULAR)
    out.write(ZERO_BLOCK * 2)
    return out.getvalue()
