"""apply_diff and diff of a real root filesystem against GNU tar -x and tar -c, on tmpfs.

The root filesystem comes from `debootstrap --variant=minbase bookworm` (cached in
$AUFS_BENCH_CACHE, default /var/cache/aufs-bench), or from a fixed-seed tree of about the
same shape when debootstrap cannot run here.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aufs
from benchmarks.common import RESULTS, peak_rss_kib, report, report_memory, tmpfs_scratch
from benchmarks.tree import build_tree

CACHE = Path(os.environ.get("AUFS_BENCH_CACHE", "/var/cache/aufs-bench"))
# the recording table's rounds at least (its figure is a few percent: see _recording)
RECORDING_ROUNDS = 60


def root_filesystem(scratch: Path) -> tuple[Path, str]:
    rootfs = CACHE / "rootfs"
    if (rootfs / "usr" / "bin").is_dir():
        return rootfs, "debootstrap minbase bookworm (cached)"
    if shutil.which("debootstrap") and os.geteuid() == 0:
        CACHE.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs),
                                 "http://deb.debian.org/debian"], capture_output=True)
        if result.returncode == 0:
            return rootfs, "debootstrap minbase bookworm"
        shutil.rmtree(rootfs, ignore_errors=True)
    tree = scratch / "seeded-rootfs"
    tree.mkdir()
    build_tree(tree, files=6_700, dirs=700, max_size=50_000)
    return tree, "fixed-seed tree (debootstrap unavailable)"


def drain(stream: object) -> None:
    read = stream.read  # type: ignore[attr-defined]
    while read(1 << 20):
        pass


def main(arguments: list[str]) -> None:
    """arguments: [REPEAT [record]]; `record` runs only the recording's cost (two tables)."""
    repeat = int(arguments[0]) if arguments else 9
    if arguments[1:] not in ([], ["record"]):
        raise SystemExit(f"layers: unknown part {' '.join(arguments[1:])!r}; try `record`")
    only_recording = arguments[1:] == ["record"]
    with tmpfs_scratch("6g") as scratch:
        source, origin = root_filesystem(scratch)
        layer_tar = scratch / "layer.tar"
        subprocess.run(["tar", "--numeric-owner", "-cf", str(layer_tar), "-C", str(source),
                        "."], check=True)
        entries = sum(1 for _ in source.rglob("*"))
        print(f"layer: {origin}, {entries:,} entries, {layer_tar.stat().st_size / 1e6:.0f} MB "
              "of tar; targets on tmpfs")

        counter = iter(range(1_000_000))

        def gnu_extract() -> None:
            target = scratch / f"gnu-{next(counter)}"
            target.mkdir()
            subprocess.run(["tar", "--numeric-owner", "-xpf", str(layer_tar), "-C",
                            str(target)], check=True)

        driver = aufs.Driver(scratch / "store", backend="overlay")

        def our_apply() -> None:
            layer = f"layer-{next(counter)}"
            driver.create(layer)
            with open(layer_tar, "rb") as stream:
                driver.apply_diff(layer, "", stream)

        if only_recording:
            _recording(driver, our_apply, layer_tar, repeat, scratch, counter)
            driver.cleanup()
            return
        gnu_x, ours_x = _alternating(gnu_extract, our_apply, repeat, scratch, driver)
        report("apply a layer (ratio to GNU tar -x)",
               [("tar -x (peer)", gnu_x, ""), ("Driver.apply_diff", ours_x, "goal <= 0.9")],
               gnu_x)
        target = scratch / "gnu-memory"
        target.mkdir()
        report_memory("apply a layer, peak RSS of the child (goal < 100 MiB)", [
            ("tar -x (peer)", peak_rss_kib(["tar", "--numeric-owner", "-xpf", str(layer_tar),
                                            "-C", str(target)]), ""),
            ("Driver.apply_diff", peak_rss_kib([sys.executable, "-m", "benchmarks.child",
                                                "apply", str(layer_tar),
                                                str(scratch / "memory-store")]), ""),
        ])
        shutil.rmtree(target)
        _remove_store(scratch / "memory-store")

        diff_id = _recording(driver, our_apply, layer_tar, repeat, scratch, counter)
        driver.create("recorded")
        with open(layer_tar, "rb") as stream:
            driver.apply_diff("recorded", "", stream, record=diff_id)

        driver.create("exported")
        with open(layer_tar, "rb") as stream:
            driver.apply_diff("exported", "", stream)
        branch = driver.store.diff_path("exported")

        def gnu_create() -> None:
            with subprocess.Popen(["tar", "--numeric-owner", "-cf", "-", "-C", branch, "."],
                                  stdout=subprocess.PIPE) as process:
                drain(process.stdout)

        def our_diff() -> None:
            with driver.diff("exported") as stream:
                drain(stream)

        gnu_c, ours_c = _alternating(gnu_create, our_diff, repeat, scratch)
        report("diff a layer, read through a pipe (ratio to GNU tar -c)",
               [("tar -c (peer)", gnu_c, ""), ("Driver.diff", ours_c, "goal <= 0.9")], gnu_c)

        def replayed_diff() -> None:
            with driver.diff("recorded") as stream:
                drain(stream)

        def check_only() -> None:
            assert driver.verified_diff_id("recorded") == diff_id

        fresh, replayed = _alternating(our_diff, replayed_diff, repeat, scratch)
        _, checked = _alternating(our_diff, check_only, repeat, scratch)
        report("diff of a recorded layer: checked, then replayed (ratio to a fresh diff)",
               [("Driver.diff, fresh tar (peer)", fresh, ""),
                ("Driver.diff, exact (check + replay)", replayed, ""),
                ("  of which the check (walk + CRC-64s)", checked, "")], fresh)
        driver.cleanup()


def _recording(driver: aufs.Driver, our_apply: Callable[[], None], layer_tar: Path,
               repeat: int, scratch: Path, counter: Iterator[int]) -> str:
    """The recording's cost: apply with and without record, in wall and CPU time; returns
    the layer's diff_id."""
    digest = hashlib.sha256()
    with open(layer_tar, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    diff_id = "sha256:" + digest.hexdigest()

    def our_apply_recorded() -> None:  # as import and pull do: the caller hashes
        layer = f"layer-{next(counter)}"
        driver.create(layer)
        with open(layer_tar, "rb") as stream:
            driver.apply_diff(layer, "", stream, record=diff_id)

    # the goal is a few percent, of the order of a VM's noise from one apply to the next:
    # more rounds than the other tables, and the plain apply twice over (A/A), so that the
    # table shows how far two runs of the very same thing differ
    rounds = max(repeat, RECORDING_ROUNDS)
    samples, cpu_samples = _alternating_samples([our_apply, our_apply, our_apply_recorded],
                                                rounds, scratch, driver)
    plain, again, recorded = (statistics.median(times) for times in samples)
    plain_cpu, again_cpu, recorded_cpu = (statistics.median(times) for times in cpu_samples)
    report(f"apply a layer, recording its tar-split (ratio to apply without; {rounds} rounds)",
           [("Driver.apply_diff (peer)", plain, ""),
            ("Driver.apply_diff again (A/A: noise)", again, ""),
            ("apply_diff(record=diff_id)", recorded, "goal <= 1.03")], plain)
    # the same, round by round: each run against the plain apply of its own round, which
    # leaves out the drift of a shared machine's speed over the minutes of the table
    print("  round by round, median and 95% interval (bootstrap):")
    paired = []
    for name, times in (("again / plain (A/A)", samples[1]), ("recorded / plain", samples[2])):
        middle, low, high = _paired_ratio(times, samples[0])
        paired.append({"name": name, "ratio": middle, "low": low, "high": high})
        print(f"    {name:<32} {middle:6.3f}x  [{low:.3f}, {high:.3f}]")
    RESULTS.append({"kind": "paired", "title": "recording's cost, round by round",
                    "rounds": rounds, "rows": paired})
    # the same runs in CPU time of this process (every thread: unpacking, I/O, gzip), which a
    # busy shared machine disturbs less than the wall clock
    report("apply a layer, recording its tar-split: CPU time of the process",
           [("Driver.apply_diff (peer)", plain_cpu, ""),
            ("Driver.apply_diff again (A/A: noise)", again_cpu, ""),
            ("apply_diff(record=diff_id)", recorded_cpu, "")], plain_cpu)
    return diff_id


def _alternating(peer: Callable[[], None], ours: Callable[[], None], repeat: int,
                 scratch: Path, driver: aufs.Driver | None = None) -> tuple[float, float]:
    """Median wall times of peer and ours (see _alternating_runs)."""
    (peer_time, our_time), _ = _alternating_runs([peer, ours], repeat, scratch, driver)
    return peer_time, our_time


def _paired_ratio(ours: list[float], peers: list[float]) -> tuple[float, float, float]:
    """The median of ours[i] / peers[i] (runs of the same round), and the 2.5th and 97.5th
    percentiles of that median over 2,000 resamples of the rounds (a fixed seed: the same
    samples give the same figures)."""
    ratios = [mine / peer for mine, peer in zip(ours, peers, strict=True)]
    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(ratios, k=len(ratios)))
                     for _ in range(2000))
    return statistics.median(ratios), medians[49], medians[1949]


def _alternating_runs(runs: list[Callable[[], None]], repeat: int, scratch: Path,
                      driver: aufs.Driver | None = None
                      ) -> tuple[list[float], list[float]]:
    """Median wall and CPU times of each run (see _alternating_samples)."""
    wall, cpu = _alternating_samples(runs, repeat, scratch, driver)
    return ([statistics.median(times) for times in wall],
            [statistics.median(times) for times in cpu])


def _alternating_samples(runs: list[Callable[[], None]], repeat: int, scratch: Path,
                         driver: aufs.Driver | None = None
                         ) -> tuple[list[list[float]], list[list[float]]]:
    """Wall and CPU times of each run, round by round, taken in turns in each round so
    that drift in the machine's speed hits them alike, in forward then reverse order from
    one round to the next. The tree a run made is deleted right after it, untimed, so that
    each run starts with the same memory in use: on a 2-core VM, with the trees of a round
    kept to its end, one apply in five or so took 2 to 4 times as long, and mostly the later
    ones of a round. The first round only warms the caches."""
    wall: list[list[float]] = [[] for _ in runs]
    cpu: list[list[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    for round_number in range(repeat + 1):
        for index in (order if round_number % 2 else order[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[index]()
            if round_number:
                wall[index].append(time.perf_counter() - start)
                cpu[index].append(time.process_time() - start_cpu)
            for path in scratch.glob("gnu-*"):
                shutil.rmtree(path)
            if driver is not None:
                for layer in driver.layer_ids():
                    if layer.startswith("layer-"):
                        driver.remove(layer)
    return wall, cpu


def _remove_store(path: Path) -> None:
    aufs.Driver(path, backend="overlay").cleanup()
    shutil.rmtree(path)
