"""Timing and reporting helpers shared by the benchmarks: medians, ratios, tmpfs scratch."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aufs


def median_seconds(run: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median wall time of `repeat` runs after `warmup` untimed ones (warm caches)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def tmpfs_scratch(size: str = "4g") -> Iterator[Path]:
    """A private tmpfs when we are root (this VM's / is ext4 without a journal, whose file
    creation times are erratic), else a plain temporary directory."""
    with tempfile.TemporaryDirectory(prefix="aufs-bench-") as base:
        if os.geteuid() != 0:
            yield Path(base)
            return
        aufs.mount("tmpfs", base, "tmpfs", 0, f"size={size}")
        try:
            yield Path(base)
        finally:
            aufs.unmount(base, 2)  # MNT_DETACH


def report(title: str, rows: list[tuple[str, float, str]], peer: float) -> None:
    """Prints each timing as a ratio to the peer's time."""
    print(f"\n{title}")
    for name, seconds, note in rows:
        ratio = seconds / peer if peer else float("nan")
        unit = f"{seconds * 1e3:10.3f} ms" if seconds < 1 else f"{seconds:10.3f} s "
        print(f"  {name:<34} {unit}  {ratio:6.2f}x  {note}")
