"""The child of the crash campaign: random store operations until it is killed."""

from __future__ import annotations

import io
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aufs
from aufs.cli.samples import shipped_sample_path
from aufs.images import Catalog, import_images
from aufs.store.layout import Store
from aufs.store.migrate import migrate, migration_in_progress
from campaigns.archives import campaign_archive

ARCHIVES = [campaign_archive(index) for index in range(3)]


def main(root: str, seed: int, backend: str) -> None:
    rng = random.Random(seed)
    heading = migration_in_progress(Store(root))
    if heading:
        migrate(Store(root), heading)
    driver = aufs.Driver(root, backend=backend)
    catalog = Catalog(driver.store)
    print("ready", flush=True)
    for step in range(1_000_000):
        roll = rng.random()
        ours = [layer for layer in driver.layer_ids() if layer.startswith("a")]
        if roll < 0.45 or not ours:
            archive = rng.randrange(len(ARCHIVES))
            parent = rng.choice(["", *ours]) if rng.random() < 0.5 else ""
            layer = f"a{archive}-{seed}-{step}"
            driver.create(layer, parent)
            driver.apply_diff(layer, parent, io.BytesIO(ARCHIVES[archive]))
        elif roll < 0.8:
            leaves = [layer for layer in ours if not driver.store.children(layer)]
            if leaves:
                driver.remove(rng.choice(leaves))
        elif roll < 0.95:
            import_images(driver, catalog, shipped_sample_path())
        else:
            current = driver.whiteout_format
            target = "overlay" if current == "aufs" else "aufs"
            if backend == "overlay" or (target == "aufs" and backend == "fuse-overlayfs"):
                continue  # the backend chosen must keep reading the store
            driver.cleanup()
            migrate(driver.store, target)
            driver = aufs.Driver(root, backend=backend)
            catalog = Catalog(driver.store)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
