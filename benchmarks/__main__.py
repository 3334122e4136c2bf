"""Runs the benchmarks and prints each result as a ratio to a peer from the same run.

    python -m benchmarks                  # all
    python -m benchmarks dirsize [FILES]  # directory_size vs du -sb (default 200,000 files)
    python -m benchmarks mountdata        # mount-data builder, native vs fallback
    python -m benchmarks mount            # Driver.get+put vs raw mount(2) on deep chains
    python -m benchmarks layers           # apply_diff and diff vs GNU tar -x and tar -c
    python -m benchmarks layers 9 record  # only the tar-split recording's cost (9 rounds)
    python -m benchmarks imports          # aufs import vs gzip|tar, umoci unpack
    python -m benchmarks pulls            # aufs pull vs skopeo copy + umoci unpack
    python -m benchmarks dockerload       # docker load via our plugin vs dockerd's overlay2
    python -m benchmarks guest            # aufs vs overlay vs raw mount(2), in an aufs guest

Options (before the suite's name):
    --json FILE   every figure of the run (medians, ratios, goals, peak RSS) as JSON
    --plot FILE   a PNG bar chart of the ratios, ours against each peer (needs matplotlib:
                  pip install 'aufs[bench]')
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys

import aufs
from benchmarks.common import RESULTS

SUITES = ["dirsize", "mountdata", "mount", "layers", "imports", "pulls", "dockerload"]
ON_REQUEST = ["guest"]  # boots tests/guest/run's qemu guest: not part of "all"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", usage=__doc__,
                                     add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--plot", metavar="FILE")
    parser.add_argument("suite", nargs="?")
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    if options.help:
        print(__doc__)
        return
    if aufs.IMPLEMENTATION != "native":
        raise SystemExit("the native extension is not built: run `python -m pip install -e .`")
    if options.plot:
        from benchmarks.plot import check_available
        check_available()  # before the run, not after it
    chosen = [options.suite] if options.suite else SUITES
    for name in chosen:
        if name not in SUITES + ON_REQUEST:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(SUITES)}")
        module = importlib.import_module(f"benchmarks.{name}")
        first = len(RESULTS)
        module.main(options.arguments if options.suite else [])
        for table in RESULTS[first:]:
            table["suite"] = name
    if options.json:
        payload = {
            "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "implementation": aufs.IMPLEMENTATION},
            "tables": RESULTS,
        }
        with open(options.json, "w") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        print(f"\nfigures written to {options.json}")
    if options.plot:
        from benchmarks.plot import plot_ratios
        plot_ratios(RESULTS, options.plot)
        print(f"chart written to {options.plot}")


if __name__ == "__main__":
    main()
