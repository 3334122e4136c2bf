"""Concurrency campaign: threads in one process and several processes call get, put, create,
remove and diff on overlapping layer ids for a bounded time. Afterwards: no mount is left
under the root, fsck is clean, every layer holds empty or whole content, and every error
was an expected aufs error.

    python tests/campaigns/concurrency.py [SECONDS] [THREADS] [PROCESSES] [BACKEND]
    # default 30 4 3 fuse-overlayfs
"""

from __future__ import annotations

import collections
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aufs
from aufs.images import fsck
from campaigns.archives import campaign_archive
from campaigns.crash import archive_signature

POOL = [f"p{index}" for index in range(8)]
ARCHIVE = campaign_archive(0, files=40)


@dataclass
class Tally:
    operations: int = 0
    expected_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: list[str] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)
    final_states: collections.Counter[str] = field(default_factory=collections.Counter)


def worker(root: str, seed: int, seconds: float, backend: str, tally: Tally) -> None:
    rng = random.Random(seed)
    driver = aufs.Driver(root, backend=backend)
    held: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        layer = rng.choice(POOL)
        action = rng.choice(["get", "put", "create", "create", "remove", "diff"])
        try:
            if action == "get":
                driver.get(layer)
                held.append(layer)
            elif action == "put" and held:
                driver.put(held.pop(rng.randrange(len(held))))
            elif action == "create":
                parent = rng.choice(["", *POOL])
                if parent == layer:
                    parent = ""
                driver.create(layer, parent)
                driver.apply_diff(layer, parent, io.BytesIO(ARCHIVE))
            elif action == "remove":
                driver.remove(layer)
            elif action == "diff":
                with driver.diff(layer) as stream:
                    stream.read()
            tally.operations += 1
        except aufs.AufsError as error:
            tally.expected_errors[type(error).__name__] += 1
            tally.examples.setdefault(type(error).__name__, f"{action} {layer}: {error}")
        except Exception as error:
            where = traceback.extract_tb(error.__traceback__)[-1]
            tally.unexpected.append(f"{action} {layer}: {type(error).__name__}: {error} "
                                    f"(at {os.path.basename(where.filename)}:{where.lineno})")
    for layer in held:
        try:
            driver.put(layer)
        except aufs.AufsError as error:
            tally.expected_errors[type(error).__name__] += 1
            tally.examples.setdefault(f"final put: {type(error).__name__}", f"{layer}: {error}")
    if driver.status()[-1] != ("Layers Held", "0"):
        tally.unexpected.append(f"a worker still holds references after putting all it got: "
                                f"{driver._references.held()} ({tally.examples})")


def run_process(root: str, seed: int, seconds: float, threads: int, backend: str) -> Tally:
    """Runs `threads` workers in this process and returns their total."""
    tallies = [Tally() for _ in range(threads)]
    workers = [threading.Thread(target=worker, args=(root, seed * 100 + index, seconds,
                                                     backend, tallies[index]))
               for index in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    total = Tally()
    for tally in tallies:
        total.operations += tally.operations
        total.expected_errors.update(tally.expected_errors)
        total.unexpected += tally.unexpected
        total.examples.update(tally.examples)
    return total


def reference_signature(backend: str) -> object:
    """What a layer holding the whole archive diffs to (symlink modes and whiteouts as the
    store keeps them), from a store of its own."""
    with tempfile.TemporaryDirectory() as scratch:
        driver = aufs.Driver(os.path.join(scratch, "reference"), backend=backend)
        driver.create("whole")
        driver.apply_diff("whole", "", io.BytesIO(ARCHIVE))
        with driver.diff("whole") as stream:
            return archive_signature(stream.read())


def mounts_under(root: str) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo if line.split()[4].startswith(root + "/")]


def run_campaign(root: str, seconds: float, threads: int, processes: int, backend: str
                 ) -> tuple[Tally, list[str]]:
    aufs.Driver(root, backend=backend)  # create the root once
    children = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", root,
                                  str(1000 + index), str(seconds), str(threads), backend],
                                 stdout=subprocess.PIPE, text=True)
                for index in range(processes)]
    total = run_process(root, 1, seconds, threads, backend)
    for child in children:
        output, _ = child.communicate()
        if child.returncode != 0:
            total.unexpected.append(f"a worker process exited with {child.returncode}")
            continue
        report = json.loads(output)
        total.operations += report["operations"]
        total.expected_errors.update(report["expected_errors"])
        total.unexpected += report["unexpected"]
        total.examples.update(report["examples"])
    violations = list(total.unexpected)
    driver = aufs.Driver(root, backend=backend)
    driver.cleanup()
    leaked = mounts_under(root)
    if leaked:
        violations.append(f"{len(leaked)} mounts left under the root: {leaked[:3]}")
    problems = fsck.check(root)
    violations += [f"fsck: {problem}" for problem in problems]
    whole = reference_signature(backend)
    empty = archive_signature(bytes(1024))
    # Another worker may remove a layer and create it again under another parent between
    # a create and its apply_diff. The apply then takes Docker's naive path through the
    # union, where a whiteout of a name no layer holds deletes nothing and leaves no mark:
    # the archive's only whiteout (.wh.gone) names such a name, so this state is whole too.
    naive = [entry for entry in whole if entry[1] != b"whiteout"]  # type: ignore[attr-defined]
    states = {"whole": whole, "whole, its no-op whiteout dropped": naive, "empty": empty}
    for layer in driver.layer_ids():
        parents = driver.parent_ids(layer)
        with driver.diff(layer, parents[0] if parents else "") as stream:
            found = archive_signature(stream.read())
        state = next((name for name, signature in states.items() if found == signature), "")
        total.final_states[state or "neither"] += 1
        if not state:
            extra = sorted(set(found) - set(whole))[:2]  # type: ignore[call-overload]
            lacking = sorted(set(whole) - set(found))[:2]  # type: ignore[call-overload]
            violations.append(f"layer {layer} holds neither nothing nor the whole archive: "
                              f"{len(found)} entries, extra {extra}, lacking {lacking}")
    if driver.status()[-1] != ("Layers Held", "0"):
        violations.append(f"references left after cleanup: {driver.status()[-1]}")
    return total, violations


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        root, seed, seconds, threads, backend = sys.argv[2:7]
        tally = run_process(root, int(seed), float(seconds), int(threads), backend)
        print(json.dumps({"operations": tally.operations,
                          "expected_errors": dict(tally.expected_errors),
                          "unexpected": tally.unexpected, "examples": tally.examples}))
        return 0
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 30
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    processes = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    backend = sys.argv[4] if len(sys.argv) > 4 else "fuse-overlayfs"
    with tempfile.TemporaryDirectory() as scratch:
        total, violations = run_campaign(os.path.join(scratch, "root"), seconds, threads,
                                         processes, backend)
    errors = ", ".join(f"{name} {count}" for name, count in total.expected_errors.most_common())
    print(f"concurrency campaign ({backend}, {seconds:.0f} s, {threads} threads x "
          f"{processes + 1} processes): {total.operations} operations, expected errors: "
          f"{errors or 'none'}; {len(violations)} violations")
    states = ", ".join(f"{name} {count}" for name, count in total.final_states.most_common())
    print(f"  layers at the end: {states or 'none'}")
    for violation in violations[:20]:
        print(f"  {violation}")
    for kind, example in sorted(total.examples.items()):
        print(f"  e.g. {kind}: {example}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
