"""The aufs mount-data builder for Docker's 126-layer chain: native against fallback."""

from __future__ import annotations

import hashlib

from aufs import _fallback, _native
from benchmarks.common import median_seconds, report


def chain(root: str = "/var/lib/docker/aufs", depth: int = 126) -> tuple[str, list[str]]:
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(1, depth + 1)]
    return f"{root}/diff/{ids[-1]}", [f"{root}/diff/{i}" for i in reversed(ids[:-1])]


def main(arguments: list[str]) -> None:
    rw, ro = chain()
    loops = 2000

    def timed(module: object) -> float:
        build = module.aufs_mount_data  # type: ignore[attr-defined]
        return median_seconds(lambda: [build(rw, ro) for _ in range(loops)], 7) / loops

    assert _native.aufs_mount_data(rw, ro) == _fallback.aufs_mount_data(rw, ro)
    fallback = timed(_fallback)
    native = timed(_native)
    report(
        "mount data for the 126-layer chain, per call (ratio to the fallback)",
        [("aufs fallback (peer)", fallback, ""), ("aufs native", native, "")],
        fallback,
    )
