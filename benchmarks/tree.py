"""Builds the fixed-seed file tree the walker benchmarks use."""

from __future__ import annotations

import os
import random
from pathlib import Path


def build_tree(root: Path, files: int = 200_000, dirs: int = 2_000, seed: int = 20261130,
               max_size: int = 4096) -> None:
    """`dirs` nested directories and `files` entries of 0 to max_size bytes, about 1% of them
    hardlinks and 1% symlinks, laid out the same way for the same seed."""
    rng = random.Random(seed)
    directories = [root]
    for index in range(dirs):
        path = rng.choice(directories) / f"dir{index}"
        path.mkdir()
        directories.append(path)
    payload = rng.randbytes(max_size)
    regular: list[Path] = []
    for index in range(files):
        path = rng.choice(directories) / f"file{index}"
        roll = rng.random()
        if roll < 0.01 and regular:
            os.link(rng.choice(regular), path)
        elif roll < 0.02:
            os.symlink(os.path.relpath(rng.choice(directories), path.parent), path)
        else:
            with open(path, "wb") as handle:
                handle.write(payload[: rng.randint(0, max_size)])
            regular.append(path)
