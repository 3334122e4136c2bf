"""Runs the benchmarks and prints each result as a ratio to a peer from the same run.

    python -m benchmarks                  # all
    python -m benchmarks dirsize [FILES]  # directory_size vs du -sb (default 200,000 files)
    python -m benchmarks mountdata        # mount-data builder, native vs fallback
    python -m benchmarks mount            # Driver.get+put vs raw mount(2) on deep chains
    python -m benchmarks layers           # apply_diff and diff vs GNU tar -x and tar -c
    python -m benchmarks imports          # aufs import vs gzip|tar, umoci unpack
    python -m benchmarks pulls            # aufs pull vs skopeo copy + umoci unpack
    python -m benchmarks guest            # aufs vs overlay vs raw mount(2), in an aufs guest
"""

from __future__ import annotations

import importlib
import sys

import aufs

SUITES = ["dirsize", "mountdata", "mount", "layers", "imports", "pulls"]
ON_REQUEST = ["guest"]  # boots tests/guest/run's qemu guest: not part of "all"


def main() -> None:
    arguments = sys.argv[1:]
    if arguments and arguments[0] in ("-h", "--help"):
        print(__doc__)
        return
    if aufs.IMPLEMENTATION != "native":
        raise SystemExit("the native extension is not built: run `python -m pip install -e .`")
    chosen = [arguments[0]] if arguments else SUITES
    for name in chosen:
        if name not in SUITES + ON_REQUEST:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(SUITES)}")
        module = importlib.import_module(f"benchmarks.{name}")
        module.main(arguments[1:] if arguments else [])


if __name__ == "__main__":
    main()
