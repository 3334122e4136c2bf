"""Driver.get + put of a deep chain against the raw mount + unmount of the same layers."""

from __future__ import annotations

import shutil
from pathlib import Path

import aufs
from aufs import _native
from aufs.store.backends.overlay import DIFF_SAFE_OPTIONS
from benchmarks.common import median_seconds, report, tmpfs_scratch

DEPTHS = (1, 10, 100, 400)


def build_chain(driver: aufs.Driver, depth: int) -> str:
    parent = ""
    for index in range(depth + 1):  # a base plus `depth` children
        layer = f"d{depth}-{index:03d}"
        driver.create(layer, parent)
        Path(driver.store.diff_path(layer), f"f{index}").write_text("x")
        parent = layer
    return parent


def raw_overlay(driver: aufs.Driver, top: str) -> None:
    store = driver.store
    options: list[tuple[str, str | None]] = [
        ("lowerdir+", store.diff_path(p)) for p in driver.parent_ids(top)]
    options += [("upperdir", store.diff_path(top)), ("workdir", store.work_path(top)),
                *DIFF_SAFE_OPTIONS]
    _native.fsmount("overlay", store.mount_path(top), options, source="aufs")
    _native.unmount(store.mount_path(top))


def main(arguments: list[str]) -> None:
    repeat = int(arguments[0]) if arguments else 31
    with tmpfs_scratch("1g") as scratch:
        overlay = aufs.Driver(scratch / "overlay", backend="overlay")
        fuse = (aufs.Driver(scratch / "fuse", backend="fuse-overlayfs")
                if shutil.which("fuse-overlayfs") else None)
        for depth in DEPTHS:
            top = build_chain(overlay, depth)

            def get_put(driver: aufs.Driver = overlay, layer: str = top) -> None:
                driver.get(layer)
                driver.put(layer)

            raw = median_seconds(lambda top=top: raw_overlay(overlay, top), repeat, warmup=3)
            ours = median_seconds(get_put, repeat, warmup=3)
            rows = [("raw fsmount + umount2 (peer)", raw, ""),
                    ("Driver.get + put, overlay", ours,
                     "goal <= 1.5" if depth == 100 else "")]
            if fuse is not None and depth <= 100:
                fuse_top = build_chain(fuse, depth)
                rows.append(("Driver.get + put, fuse-overlayfs",
                             median_seconds(lambda top=fuse_top: get_put(fuse, top), 5,
                                            warmup=1), ""))
            report(f"get + put of a {depth}-layer chain (ratio to the raw syscalls)", rows, raw)
        overlay.cleanup()
        if fuse is not None:
            fuse.cleanup()
