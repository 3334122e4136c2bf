"""Crash campaign: a child process creates, applies, removes, imports and migrates at random,
and is SIGKILLed at a random moment, again and again. After every kill the root is reopened:
`fsck --repair` must leave it clean, and every layer must hold exactly the content of a
completed operation (empty, or a whole archive; never half of one).

    python tests/campaigns/crash.py [KILLS] [SEED] [BACKEND]   # default 300 1 fuse-overlayfs
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aufs
from aufs.cli.samples import shipped_sample_path
from aufs.images import Catalog, fsck, import_images
from campaigns.archives import campaign_archive

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_worker.py")


@dataclass
class CampaignResult:
    kills: int = 0
    violations: list[str] = field(default_factory=list)
    repaired: int = 0
    layers_checked: int = 0


def archive_signature(data: bytes) -> list[tuple[str, bytes, int, bytes]]:
    """What a diff must contain: names, types, modes and contents (mtimes aside). A whiteout
    is its name only, and a symlink has no mode: neither means anything on disk."""
    entries = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            name = member.name.rstrip("/")
            if os.path.basename(name).startswith(".wh."):
                entries.append((name, b"whiteout", 0, b""))
                continue
            content = tar.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
            # a symlink's mode means nothing on Linux: an image's tar may say 0644 where a
            # fresh tar of the same layer (after a migrate) says 0777
            mode = 0 if member.issym() else member.mode
            entries.append((name, member.type, mode, content + member.linkname.encode()))
    return sorted(entries)


def expected_signatures(backend: str) -> tuple[dict[int, object], dict[str, object]]:
    """Each archive's diff, and each sample-image layer's diff, from a reference store."""
    with tempfile.TemporaryDirectory() as scratch:
        driver = aufs.Driver(os.path.join(scratch, "reference"), backend=backend)
        archives = {}
        for index in range(3):
            driver.create(f"ref{index}")
            driver.apply_diff(f"ref{index}", "", io.BytesIO(campaign_archive(index)))
            with driver.diff(f"ref{index}") as stream:
                archives[index] = archive_signature(stream.read())
        (image,) = import_images(driver, Catalog(driver.store), shipped_sample_path())
        imported = {}
        parent = ""
        for layer in image.layers:
            with driver.diff(layer, parent) as stream:
                imported[layer] = archive_signature(stream.read())
            parent = layer
        driver.cleanup()
    return archives, imported


def check_root(root: str, backend: str, archives: dict[int, object],
               imported: dict[str, object], result: CampaignResult) -> None:
    repaired, remaining = fsck.repair(root)
    result.repaired += len(repaired)
    for problem in remaining:
        result.violations.append(f"after kill {result.kills}: fsck --repair left {problem}")
    driver = aufs.Driver(root, backend=backend)
    empty = archive_signature(bytes(1024))
    for layer in driver.layer_ids():
        parents = driver.parent_ids(layer)
        with driver.diff(layer, parents[0] if parents else "") as stream:
            found = archive_signature(stream.read())
        result.layers_checked += 1
        if layer.startswith("a"):
            allowed = [empty, archives[int(layer[1])]]
        else:
            allowed = [imported.get(layer)]
        if found not in allowed:
            result.violations.append(f"after kill {result.kills}: layer {layer} holds "
                                     f"{len(found)} entries, not a completed operation")
    tags = Catalog(driver.store).tags()
    for tag in tags.values():
        chain = [tag.top, *driver.parent_ids(tag.top)] if driver.exists(tag.top) else []
        if not chain or any(not driver.exists(layer) for layer in chain):
            result.violations.append(f"after kill {result.kills}: tag {tag.name} is broken")
    driver.cleanup()


def run_campaign(root: str, kills: int, seed: int, backend: str,
                 max_delay: float = 0.15) -> CampaignResult:
    rng = random.Random(seed)
    archives, imported = expected_signatures(backend)
    result = CampaignResult()
    while result.kills < kills:
        child = subprocess.Popen([sys.executable, WORKER, root, str(rng.randrange(1 << 30)),
                                  backend], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        assert child.stdout is not None
        ready = child.stdout.readline()
        if ready.strip() != "ready":
            child.wait()
            error = child.stderr.read() if child.stderr else ""
            result.violations.append(f"worker failed to start: {error.strip()[-500:]}")
            check_root(root, backend, archives, imported, result)
            result.kills += 1
            continue
        time.sleep(rng.uniform(0, max_delay))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stderr is not None:
            error = child.stderr.read()
            if "Traceback" in error:
                result.violations.append(f"worker raised before kill {result.kills}: "
                                         f"{error.strip().splitlines()[-1]}")
        result.kills += 1
        check_root(root, backend, archives, imported, result)
    return result


def main() -> int:
    kills = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    backend = sys.argv[3] if len(sys.argv) > 3 else "fuse-overlayfs"
    with tempfile.TemporaryDirectory() as scratch:
        started = time.monotonic()
        result = run_campaign(os.path.join(scratch, "root"), kills, seed, backend)
    print(f"crash campaign ({backend}, seed {seed}): {result.kills} kills, "
          f"{result.layers_checked} layer checks, {result.repaired} repairs, "
          f"{len(result.violations)} violations, {time.monotonic() - started:.0f} s")
    for violation in result.violations[:20]:
        print(f"  {violation}")
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())
