"""`aufs demo`: the sample image imported into a temporary store, mounted, changed, its new
layer exported, and everything cleaned up, on the best backend this machine has."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable

from aufs import _implementation as native
from aufs.cli.samples import shipped_sample_path
from aufs.images import Catalog, import_images
from aufs.store.driver import Driver


def _tree(directory: str, depth: int = 0) -> list[str]:
    """An indented listing, small files' contents and link targets included."""
    lines = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        info = os.lstat(path)
        if stat.S_ISDIR(info.st_mode):
            lines.append(f"{'    ' * depth}{name}/")
            lines += _tree(path, depth + 1)
            continue
        detail = ""
        if stat.S_ISLNK(info.st_mode):
            detail = f" -> {os.readlink(path)}"
        elif stat.S_ISREG(info.st_mode) and info.st_size < 80:
            with open(path) as handle:
                detail = f"  {handle.read().strip()!r}"
        lines.append(f"{'    ' * depth}{name}{detail}")
    return lines


def run_demo(backend: str = "auto", say: Callable[[str], None] = print) -> int:
    sample = shipped_sample_path()
    with tempfile.TemporaryDirectory(prefix="aufs-demo-") as base:
        root = os.path.join(base, "store")
        with Driver(root, backend=backend) as driver:
            catalog = Catalog(driver.store)
            say(f"store {root}: backend {driver.backend}, {driver.whiteout_format} whiteouts, "
                f"{native.IMPLEMENTATION} core")
            (image,) = import_images(driver, catalog, sample)
            say(f"\n1. imported {os.path.basename(sample)} as {image.name!r}: "
                f"{len(image.layers)} layers, digests and diff_ids verified")
            with driver.mounted(image.top) as merged:
                say(f"\n2. mounted at {merged}; the second layer deleted app/obsolete.txt and "
                    "made app/cache/ opaque:")
                for line in _tree(merged):
                    say(f"   {line}")
            change = "demo-change"
            driver.create(change, image.top)
            with driver.mounted(change) as merged:
                with open(os.path.join(merged, "app", "notes.txt"), "w") as handle:
                    handle.write("written by aufs demo\n")
                with open(os.path.join(merged, "app", "config.txt"), "a") as handle:
                    handle.write("demo=1\n")
                os.remove(os.path.join(merged, "app", "new.txt"))
            say("\n3. wrote to a new layer on top; its changes:")
            for entry in driver.changes(change, image.top):
                say(f"   {entry}")
            with driver.diff(change, image.top) as stream:
                archive = stream.read()
            path = os.path.join(base, "demo-change.tar")
            with open(path, "wb") as handle:
                handle.write(archive)
            say(f"\n4. exported the new layer ({len(archive)} bytes of tar, AUFS whiteouts):")
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                for member in tar:
                    say(f"   {member.name}")
        say("\n5. cleaned up: mounts released, temporary store removed")
    return 0
