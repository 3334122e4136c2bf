"""Driver.get + put of a deep chain against the raw mount + unmount of the same layers.

The peer is what Docker's overlay2 does: one classic mount(2) whose lowerdir data names each
layer by a short symlink (`l/<26 chars>`), relative to the store's root (Docker mounts from
there), then umount2. Where the chain does not fit in one page of mount data even so, the peer
is the new mount API (`fsopen`, one `lowerdir+` per layer, `fsmount`, `move_mount`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import aufs
from aufs import _native
from aufs.store.backends.overlay import DIFF_SAFE_OPTIONS
from benchmarks.common import alternating_medians, median_seconds, report, tmpfs_scratch

DEPTHS = (1, 10, 100, 400)
PAGE = os.sysconf("SC_PAGE_SIZE")


def build_chain(driver: aufs.Driver, depth: int) -> str:
    parent = ""
    for index in range(depth + 1):  # a base plus `depth` children
        layer = f"d{depth}-{index:03d}"
        driver.create(layer, parent)
        Path(driver.store.diff_path(layer), f"f{index}").write_text("x")
        parent = layer
    return parent


def peer_links(driver: aufs.Driver, top: str, home: Path) -> list[str]:
    """Docker-style short symlinks home/l/<26 chars> -> the chain's diff dirs, made by the
    benchmark itself (not by the driver), nearest parent first."""
    (home / "l").mkdir(parents=True, exist_ok=True)
    names = []
    for layer in driver.parent_ids(top):
        name = base64.b32encode(hashlib.sha256(layer.encode()).digest()).decode()[:26]
        link = home / "l" / name
        if not link.is_symlink():
            link.symlink_to(driver.store.diff_path(layer))
        names.append(f"l/{name}")
    return names


def classic_data(driver: aufs.Driver, top: str, links: list[str]) -> str:
    store = driver.store
    return ",".join([f"lowerdir={':'.join(links)}", f"upperdir={store.diff_path(top)}",
                     f"workdir={store.work_path(top)}",
                     *(f"{key}={value}" for key, value in DIFF_SAFE_OPTIONS)])


def raw_classic(driver: aufs.Driver, top: str, home: Path, data: str) -> None:
    previous = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    os.chdir(home)  # as Docker's mountFrom does, in a child; this benchmark has one thread
    try:
        _native.mount("overlay", driver.store.mount_path(top), "overlay", 0, data)
    finally:
        os.fchdir(previous)
        os.close(previous)
    _native.unmount(driver.store.mount_path(top))


def raw_fsmount(driver: aufs.Driver, top: str) -> None:
    store = driver.store
    options: list[tuple[str, str | None]] = [
        ("lowerdir+", store.diff_path(p)) for p in driver.parent_ids(top)]
    options += [("upperdir", store.diff_path(top)), ("workdir", store.work_path(top)),
                *DIFF_SAFE_OPTIONS]
    _native.fsmount("overlay", store.mount_path(top), options, source="aufs")
    _native.unmount(store.mount_path(top))


def beside_a_thread(peer: Callable[[], None], ours: Callable[[], None], repeat: int) -> None:
    """The same pair while another thread is alive, as in the Docker plugin's threaded
    server: the working directory is shared then, so mounts over relative links go through
    the thread of its own cwd (the peer, one thread of Go's runtime, keeps its chdir)."""
    release = threading.Event()
    other = threading.Thread(target=release.wait, name="idle")
    other.start()
    try:
        medians = alternating_medians([peer, ours], repeat, warmup=3)
    finally:
        release.set()
        other.join()
    report("the same, beside another thread (the plugin's case: mounts on a thread of its "
           "own cwd)", [("raw mount(2) + umount2 (peer)", medians[0], ""),
                        ("Driver.get + put, overlay", medians[1], "")], medians[0])


def main(arguments: list[str]) -> None:
    repeat = int(arguments[0]) if arguments else 31
    with tmpfs_scratch("1g") as scratch:
        overlay = aufs.Driver(scratch / "overlay", backend="overlay")
        fuse = (aufs.Driver(scratch / "fuse", backend="fuse-overlayfs")
                if shutil.which("fuse-overlayfs") else None)
        for depth in DEPTHS:
            top = build_chain(overlay, depth)
            home = scratch / "peer"
            data = classic_data(overlay, top, peer_links(overlay, top, home))

            def get_put(driver: aufs.Driver = overlay, layer: str = top) -> None:
                driver.get(layer)
                driver.put(layer)

            def classic(top: str = top, data: str = data, home: Path = home) -> None:
                raw_classic(overlay, top, home, data)

            def fsmount(top: str = top) -> None:
                raw_fsmount(overlay, top)

            fits = len(data.encode()) < PAGE
            peers: list[tuple[str, Callable[[], None]]] = (
                [("raw mount(2) + umount2 (peer)", classic)] if fits else [])
            peers.append((f"raw fsmount + umount2{'' if fits else ' (peer)'}", fsmount))
            runs = [*peers, ("Driver.get + put, overlay", get_put)]
            medians = alternating_medians([run for _, run in runs], repeat, warmup=3)
            rows = [(name, seconds, "goal <= 1.2" if depth == 100 and name.startswith("Driver")
                     else "") for (name, _), seconds in zip(runs, medians, strict=True)]
            if fuse is not None and depth <= 100:
                fuse_top = build_chain(fuse, depth)
                rows.append(("Driver.get + put, fuse-overlayfs",
                             median_seconds(lambda top=fuse_top: get_put(fuse, top), 5,
                                            warmup=1), ""))
            how = "classic data over short links" if fits else "beyond a page: fsmount"
            report(f"get + put of a {depth}-layer chain (ratio to the raw syscalls, {how})",
                   rows, rows[0][1])
            if depth == 100:
                beside_a_thread(runs[0][1], get_put, repeat)
        overlay.cleanup()
        if fuse is not None:
            fuse.cleanup()
