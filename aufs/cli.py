"""The `aufs` command line. Each subcommand is a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from aufs import machine
from aufs._implementation import IMPLEMENTATION


def command_info(arguments: argparse.Namespace) -> int:
    reports = machine.describe()
    if arguments.json:
        payload = {
            "implementation": IMPLEMENTATION,
            "machine": [report.__dict__ for report in reports],
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(f"implementation: {IMPLEMENTATION}")
    for report in reports:
        mark = "yes" if report.present else "no "
        print(f"  {mark}  {report.name:<20} {report.detail}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aufs", description="Docker's AUFS layer store on today's kernels."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser(
        "info",
        help="what this machine supports",
        description="Show the implementation in use and the kernel features found.",
        epilog="example: aufs info --json",
    )
    info.add_argument("--json", action="store_true", help="print JSON for scripts")
    info.set_defaults(handler=command_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    return int(arguments.handler(arguments))


if __name__ == "__main__":
    sys.exit(main())
