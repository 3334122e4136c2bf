"""Timing and reporting helpers shared by the benchmarks: medians, ratios, tmpfs scratch,
the peak memory of a child process, and the record of every figure (for --json and --plot)."""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aufs

REPOSITORY = Path(__file__).resolve().parent.parent

# Every table printed in this run, in order: what --json writes and --plot draws.
RESULTS: list[dict[str, Any]] = []


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


def goal_of(note: str) -> float | None:
    """The ratio a row's note sets as its goal ("goal <= 1.2"), if any."""
    found = re.search(r"goal\s*<=?\s*([0-9.]+)", note)
    return float(found.group(1)) if found else None


def report(title: str, rows: list[tuple[str, float, str]], peer: float) -> None:
    """Prints each timing as a ratio to the peer's time, and records the table."""
    print(f"\n{title}")
    recorded = []
    for name, seconds, note in rows:
        ratio = seconds / peer if peer else float("nan")
        unit = f"{seconds * 1e3:10.3f} ms" if seconds < 1 else f"{seconds:10.3f} s "
        print(f"  {name:<34} {unit}  {ratio:6.2f}x  {note}")
        recorded.append({"name": name, "seconds": seconds, "ratio": ratio, "note": note,
                         "goal": goal_of(note), "peer": seconds == peer})
    RESULTS.append({"kind": "time", "title": title, "rows": recorded})


def report_memory(title: str, rows: list[tuple[str, int, str]]) -> None:
    """Prints and records peak resident memory (KiB, as getrusage gives it) per command."""
    print(f"\n{title}")
    recorded = []
    for name, kibibytes, note in rows:
        print(f"  {name:<34} {kibibytes / 1024:10.1f} MiB  {note}")
        recorded.append({"name": name, "peak_rss_kib": kibibytes, "note": note})
    RESULTS.append({"kind": "memory", "title": title, "rows": recorded})


# A child's ru_maxrss also counts the memory of the process it was forked from, up to its
# exec (Linux keeps the old mm's high-water mark), so a command forked straight from this
# benchmark would report at least the benchmark's own RSS. A small launcher that was itself
# exec'ed starts the command instead: GNU time when present, else this one (whose own ~8 MiB
# then sets the floor). Both write the peak in KiB to the file named first.
_LAUNCHER = """
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as output:
    output.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_kib(command: Sequence[str] | str, *, shell: bool = False,
                 cwd: str | os.PathLike[str] | None = None) -> int:
    """Runs command to its end and returns its peak RSS in KiB, as wait4 reports it for the
    command's process and the descendants it waited for (each stage of a shell pipeline)."""
    argv = ["/bin/sh", "-c", command] if shell else list(command)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="aufs-bench-rss-") as directory:
        result = os.path.join(directory, "peak")
        if os.access("/usr/bin/time", os.X_OK):
            launcher = ["/usr/bin/time", "-q", "-f", "%M", "-o", result]
        else:
            launcher = [sys.executable, "-S", "-c", _LAUNCHER, result]
        # `python -m benchmarks.child` finds this package wherever the command runs
        path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
        subprocess.run([*launcher, *argv], cwd=cwd, stdout=subprocess.DEVNULL, check=True,
                       env=dict(os.environ, PYTHONPATH=path))
        with open(result) as output:
            return int(output.read().split()[-1])


def alternating_medians(runs: Sequence[Callable[[], object]], repeat: int,
                        warmup: int = 1) -> list[float]:
    """Median wall time of each run, taken in turns (one of each per round) so that drift in
    the machine's speed hits them alike; `warmup` untimed rounds first."""
    times: list[list[float]] = [[] for _ in runs]
    for round_number in range(warmup + repeat):
        for run, samples in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            if round_number >= warmup:
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]
