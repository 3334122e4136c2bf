"""Inside a kernel with aufs (tests/guest/run boots one when this one has none): Driver.get +
put of a 100-layer chain on the aufs backend, against the same chain on overlay and against
raw mount(2) + umount2 with our own aufs mount data. A guest's absolute times mean nothing
(plain emulation); the ratios do.

    python -m benchmarks guest [REPEAT]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import aufs
from aufs import _native
from aufs.store.backends.aufs import MOUNT_LOCK, split_mount_data
from aufs.store.mounters import MS_REMOUNT
from benchmarks.common import median_seconds, report
from benchmarks.mount import build_chain

DEPTH = 100
RUNNER = Path(__file__).resolve().parent.parent / "tests" / "guest" / "run"


def kernel_has_aufs() -> bool:
    with open("/proc/filesystems") as listing:
        return any(line.split()[-1] == "aufs" for line in listing if line.strip())


def raw_aufs(driver: aufs.Driver, top: str) -> None:
    """What the backend does, without the driver: our data, mount(2), remounts, umount2."""
    store = driver.store
    target = store.mount_path(top)
    chunks = split_mount_data(_native.aufs_mount_data(
        store.diff_path(top), [store.diff_path(p) for p in driver.parent_ids(top)],
        dirperm1=True))
    with MOUNT_LOCK:
        _native.mount("none", target, "aufs", 0, chunks[0])
        for data in chunks[1:]:
            _native.mount("none", target, "aufs", MS_REMOUNT, data)
    _native.unmount(target)


def main(arguments: list[str]) -> None:
    repeat = int(arguments[0]) if arguments else 15
    if not kernel_has_aufs():
        if os.environ.get("AUFS_IN_GUEST"):
            raise SystemExit("the guest's kernel lists no aufs")
        command = [str(RUNNER), "-t", "900", sys.executable, "-m", "benchmarks", "guest",
                   str(repeat)]
        print("this kernel has no aufs: running in tests/guest/run's guest", flush=True)
        raise SystemExit(subprocess.run(command, check=False,
                                        cwd=RUNNER.parent.parent.parent).returncode)
    # a short root: overlay on the guest's Linux 6.1 (no lowerdir+) takes 100 lowers only
    # when their paths fit in one page
    with tempfile.TemporaryDirectory(prefix="g", dir="/tmp") as scratch:
        aufs.mount("tmpfs", scratch, "tmpfs", 0, "size=1g")
        try:
            run(Path(scratch), repeat)
        finally:
            aufs.unmount(scratch, 2)


def run(scratch: Path, repeat: int) -> None:
    drivers = {name: aufs.Driver(scratch / name[0], backend=name)
               for name in ("aufs", "overlay")}
    tops = {name: build_chain(driver, DEPTH) for name, driver in drivers.items()}

    def get_put(name: str) -> None:
        drivers[name].get(tops[name])
        drivers[name].put(tops[name])

    raw = median_seconds(lambda: raw_aufs(drivers["aufs"], tops["aufs"]), repeat, warmup=2)
    rows = [("raw mount(2) + umount2, our aufs data (peer)", raw, ""),
            ("Driver.get + put, aufs", median_seconds(lambda: get_put("aufs"), repeat,
                                                      warmup=2), ""),
            ("Driver.get + put, overlay", median_seconds(lambda: get_put("overlay"), repeat,
                                                         warmup=2), "")]
    report(f"get + put of a {DEPTH}-layer chain in the aufs guest (ratio to raw aufs)",
           rows, raw)
    for driver in drivers.values():
        driver.cleanup()
