"""A top-down walk of a layer's tree that does not recurse: before Python 3.12, os.walk calls
itself once per level, and a layer from an archive can be thousands of directories deep."""

from __future__ import annotations

import os
from collections.abc import Iterator


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """As os.walk(top): (directory, dirnames, filenames), parents first; a symlink to a
    directory is among dirnames but never followed; unreadable directories are skipped.
    Removing a name from dirnames before the next step prunes it."""
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                listed = list(entries)
        except OSError:
            continue
        dirnames: list[str] = []
        filenames: list[str] = []
        links: set[str] = set()
        for entry in listed:
            try:
                is_directory = entry.is_dir()
                if is_directory and entry.is_symlink():
                    links.add(entry.name)
            except OSError:
                is_directory = False
            (dirnames if is_directory else filenames).append(entry.name)
        yield directory, dirnames, filenames
        stack.extend(os.path.join(directory, name) for name in reversed(dirnames)
                     if name not in links)
