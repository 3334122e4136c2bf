"""aufs.directory_size (native and fallback) against GNU `du -sb` on the same warm tree."""

from __future__ import annotations

import shutil
import subprocess
import time

from aufs import _fallback, _native
from benchmarks.common import median_seconds, report, tmpfs_scratch
from benchmarks.tree import build_tree


def run(files: int, repeat: int) -> None:
    if shutil.which("du") is None:
        raise SystemExit("GNU du is needed as the peer")
    with tmpfs_scratch() as scratch:
        tree = scratch / "tree"
        tree.mkdir()
        start = time.perf_counter()
        build_tree(tree, files=files, dirs=max(1, files // 100))
        print(f"built {files:,} entries in {time.perf_counter() - start:.1f} s on tmpfs")

        def du() -> None:
            subprocess.run(["du", "-sb", str(tree)], check=True, stdout=subprocess.DEVNULL)

        peer = median_seconds(du, repeat)
        native = median_seconds(lambda: _native.directory_size(tree), repeat)
        native_one = median_seconds(lambda: _native.directory_size(tree, threads=1), repeat)
        fallback = median_seconds(lambda: _fallback.directory_size(tree), repeat)
        sizes = (_native.directory_size(tree), _fallback.directory_size(tree))
        assert sizes[0] == sizes[1], f"native and fallback disagree: {sizes}"
        report(
            f"directory size, {files:,} entries, warm cache, median of {repeat} "
            f"(ratio to du -sb; {sizes[0]:,} bytes)",
            [
                ("du -sb (peer)", peer, ""),
                ("aufs native, all cores", native, "goal <= 0.62"),
                ("aufs native, 1 thread", native_one, ""),
                ("aufs fallback", fallback, "goal <= 2.0"),
            ],
            peer,
        )


def main(arguments: list[str]) -> None:
    files = int(arguments[0]) if arguments else 200_000
    run(files, repeat=7)

