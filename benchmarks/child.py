"""One operation in a fresh interpreter, so that its peak RSS is its own (the parent reads
it with wait4): `python -m benchmarks.child apply|import|pull ARGUMENT STORE`."""

from __future__ import annotations

import sys

import aufs
from aufs.images import Catalog, import_images
from aufs.images.pull import pull


def main(arguments: list[str]) -> None:
    operation, argument, root = arguments
    with aufs.Driver(root, backend="overlay") as driver:
        if operation == "apply":
            driver.create("layer")
            with open(argument, "rb") as stream:
                driver.apply_diff("layer", "", stream)
        elif operation == "import":
            import_images(driver, Catalog(driver.store), argument)
        elif operation == "pull":
            pull(driver, Catalog(driver.store), argument)
        else:
            raise SystemExit(f"unknown operation {operation!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
