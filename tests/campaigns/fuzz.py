"""Fuzzing campaign: apply_diff over generated and mutated tar streams may raise nothing but
DiffError, never touches a file outside the layer (a sentinel tree beside the root is checked
after every example), and leaves the layer unchanged when it refuses. Also the layers/ parser
and the mount-data builder.

Threads too: two appliers and a differ share one driver. Each applier applies archives that
remove nested directories (replaced by a file or a symlink, whited out below the top level,
made opaque), on the fast path and on the naive one, mixed with mutated archives; the
differ reads another layer's diff all along. Afterwards each applier's layer holds only its
own content, the differ's layer and the sentinel tree are unchanged, and no fixed archive
failed. (A directory fd closed under one thread and reused by another once let a layer's
archive write into another layer: issue 16.)

    python tests/campaigns/fuzz.py [EXAMPLES] [SEED]     # default 5000 1
"""

from __future__ import annotations

import io
import os
import random
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aufs
from aufs.errors import AufsError
from campaigns.archives import campaign_archive
from tarbuild import tree_snapshot

NAMES = st.lists(st.sampled_from(["a", "b", "..", ".", "", ".wh.a", ".wh..", ".wh..wh..opq",
                                  ".wh..wh.plnk", "d" * 120, "é", "\\x00", "c"]),
                 min_size=1, max_size=5).map("/".join)
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                         tarfile.CHRTYPE, tarfile.FIFOTYPE, b"S", b"V", b"x", b"Z"])
MEMBERS = st.lists(st.tuples(NAMES, KINDS, st.binary(max_size=600), NAMES,
                             st.integers(0, 0o7777), st.integers(-1, 2**40),
                             st.dictionaries(st.sampled_from(
                                 ["size", "path", "linkpath", "uid", "mtime", "GNU.sparse.major",
                                  "SCHILY.xattr.user.x", "SCHILY.xattr.trusted.overlay.opaque",
                                  "gid", "atime"]),
                                 st.one_of(st.text(max_size=30),
                                           st.integers(-1, 2**70).map(str)), max_size=3)),
                   max_size=8)


def build(members: list[tuple[str, bytes, bytes, str, int, int, dict[str, str]]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, link, mode, owner, pax in members:
            info = tarfile.TarInfo(name.replace("\\x00", "\0") or "x")
            info.type, info.mode, info.linkname = kind, mode, link
            info.uid = max(owner, 0) if owner < 2**21 else 0
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            info.pax_headers = dict(pax)
            try:
                tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
            except (ValueError, UnicodeError, tarfile.TarError):
                continue
    return out.getvalue()


BASE_ARCHIVES = [campaign_archive(index, files=12) for index in range(2)]
MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "repeat", "zero"]),
                               st.integers(0, 20_000), st.binary(min_size=1, max_size=40)),
                     min_size=1, max_size=4)


def mutate(data: bytes, steps: list[tuple[str, int, bytes]]) -> bytes:
    for action, position, payload in steps:
        if not data:
            return data
        position %= len(data)
        if action == "flip":
            data = data[:position] + bytes([data[position] ^ payload[0]]) + data[position + 1:]
        elif action == "cut":
            data = data[:position]
        elif action == "insert":
            data = data[:position] + payload + data[position:]
        elif action == "repeat":
            block = position - position % 512
            data = data[:block] + data[block:block + 512] * 2 + data[block + 512:]
        else:
            data = data[:position] + bytes(len(payload)) + data[position + len(payload):]
    return data


class Arena:
    """A store with one layer holding known content, beside a sentinel tree."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.sentinel = base / "sentinel"
        (self.sentinel / "etc").mkdir(parents=True)
        (self.sentinel / "etc" / "passwd").write_text("root:x:0:0\n")
        os.symlink("/etc", self.sentinel / "link")
        self.driver = aufs.Driver(base / "store", backend=aufs.AufsBackend(
            aufs.RecordingMounter(), kernel=aufs.machine.Kernel(frozenset({"aufs"}), False),
            dirperm1=False, auplink=None))
        self.driver.create("layer")
        self.driver.apply_diff("layer", "", io.BytesIO(BASE_ARCHIVES[0]))
        self.outside = tree_snapshot(self.sentinel)
        self.examples = 0

    def check(self, data: bytes) -> None:
        branch = Path(self.driver.store.diff_path("layer"))
        before = tree_snapshot(branch)
        try:
            self.driver.apply_diff("layer", "", io.BytesIO(data))
        except aufs.DiffError:
            assert tree_snapshot(branch) == before, "a refused archive changed the layer"
        self.examples += 1
        assert tree_snapshot(self.sentinel) == self.outside, "something outside was touched"
        assert os.listdir(self.driver.store.staging_dir) == []


def fuzz_apply(arena: Arena, examples: int, seed: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(generated=MEMBERS, which=st.integers(0, 1), mutations=MUTATIONS,
           use_generated=st.booleans())
    def one(generated: list[tuple[str, bytes, bytes, str, int, int, dict[str, str]]],
            which: int, mutations: list[tuple[str, int, bytes]], use_generated: bool) -> None:
        data = build(generated) if use_generated else mutate(BASE_ARCHIVES[which], mutations)
        arena.check(data)

    random.seed(seed)
    one()


def removal_archive(owner: str) -> bytes:
    """A valid layer whose entries remove nested directories, with owner's mark in every
    file: whoever finds the mark elsewhere caught a write across layers."""
    mark = f"written by {owner}\n".encode()
    return build([
        ("d/", tarfile.DIRTYPE, b"", "", 0o755, 0, {}),
        ("d/e/", tarfile.DIRTYPE, b"", "", 0o755, 0, {}),
        ("d/e/x/", tarfile.DIRTYPE, b"", "", 0o755, 0, {}),
        ("d/e/x/inner", tarfile.REGTYPE, mark, "", 0o644, 0, {}),
        ("d/e/x", tarfile.REGTYPE, mark, "", 0o644, 0, {}),  # a nested dir becomes a file
        ("d/e/y/", tarfile.DIRTYPE, b"", "", 0o755, 0, {}),
        ("d/e/y/z/", tarfile.DIRTYPE, b"", "", 0o755, 0, {}),
        ("d/e/y", tarfile.SYMTYPE, b"", "x", 0o777, 0, {}),  # ... or a symlink
        ("usr/", tarfile.DIRTYPE, b"", "", 0o755, 0, {}),
        ("usr/share/", tarfile.DIRTYPE, b"", "", 0o755, 0, {}),
        ("usr/share/doc/", tarfile.DIRTYPE, b"", "", 0o755, 0, {}),
        ("usr/share/doc/readme", tarfile.REGTYPE, mark, "", 0o644, 0, {}),
        ("usr/share/.wh.doc", tarfile.REGTYPE, b"", "", 0o644, 0, {}),  # a whiteout below top
        ("usr/lib/", tarfile.DIRTYPE, b"", "", 0o755, 0, {}),
        ("usr/lib/old/", tarfile.DIRTYPE, b"", "", 0o755, 0, {}),
        ("usr/lib/.wh..wh..opq", tarfile.REGTYPE, b"", "", 0o644, 0, {}),
        ("usr/lib/new", tarfile.REGTYPE, mark, "", 0o644, 0, {}),
        ("mark", tarfile.REGTYPE, mark, "", 0o644, 0, {}),
    ])


def marks_in(branch: Path) -> set[bytes]:
    """The owner marks found in a layer's regular files."""
    found = set()
    for directory, _, filenames in os.walk(branch):
        for name in filenames:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and not os.path.islink(path):
                content = Path(path).read_bytes()
                if content.startswith(b"written by "):
                    found.add(content)
    return found


@dataclass
class RaceResult:
    applied: int = 0
    refused: int = 0
    diffs: int = 0
    violations: list[str] = field(default_factory=list)


def race_appliers_and_differ(driver: aufs.Driver, sentinel: Path, rounds: int,
                             seed: int) -> RaceResult:
    """Two threads apply to their own layers while a third reads a victim layer's diff, all
    on one driver; bounded by rounds, not by time."""
    result = RaceResult()
    appliers = ["attacker-1", "attacker-2"]
    driver.create("victim")
    driver.apply_diff("victim", "", io.BytesIO(BASE_ARCHIVES[1]))
    victim = Path(driver.store.diff_path("victim"))
    victim_before = tree_snapshot(victim)
    sentinel_before = tree_snapshot(sentinel)
    for name in appliers:
        # the victim is their lower layer too; the fast and the naive path each get a layer
        # of their own (an AUFS layer that holds a whiteout beside its own target, as the
        # fast path leaves it, is not one a union can take)
        driver.create(name, "victim")
        driver.create(f"{name}-naive", "victim")
    finished = threading.Event()
    lock = threading.Lock()

    def report(message: str) -> None:
        with lock:
            result.violations.append(message)

    def applier(name: str, index: int) -> None:
        rng = random.Random(seed * 10 + index)
        own = removal_archive(name)
        try:
            for round_number in range(rounds):
                naive = round_number % 2 == 1
                try:
                    if naive:  # not the layer's parent: Docker's naive path
                        driver.apply_diff(f"{name}-naive", "", io.BytesIO(own))
                    else:
                        driver.apply_diff(name, "victim", io.BytesIO(own))
                except Exception as error:  # every failure is a finding
                    report(f"{name}: a valid archive failed ({'naive' if naive else 'fast'} "
                           f"path): {type(error).__name__}: {error}")
                    continue
                with lock:
                    result.applied += 1
                steps = [(rng.choice(["flip", "cut", "insert", "repeat", "zero"]),
                          rng.randrange(20_000), rng.randbytes(rng.randint(1, 40)))]
                try:
                    driver.apply_diff(name, "victim", io.BytesIO(mutate(own, steps)))
                    with lock:
                        result.applied += 1
                except aufs.DiffError:
                    with lock:
                        result.refused += 1
                except Exception as error:
                    report(f"{name}: a mutated archive raised {type(error).__name__}: {error}")
        finally:
            if index == 0:
                finished.set()

    def differ() -> None:
        expected = None
        for _ in range(rounds * 20):
            try:
                with driver.diff("victim") as stream:
                    data = stream.read()
            except Exception as error:
                report(f"diff of the victim failed: {type(error).__name__}: {error}")
                return
            if expected is None:
                expected = data
            elif data != expected:
                report("the victim's diff changed while other layers were applied")
            with lock:
                result.diffs += 1
            if finished.is_set():
                return

    threads = [threading.Thread(target=applier, args=(name, index))
               for index, name in enumerate(appliers)]
    threads.append(threading.Thread(target=differ))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if tree_snapshot(victim) != victim_before:
        result.violations.append("the victim layer changed")
    if tree_snapshot(sentinel) != sentinel_before:
        result.violations.append("something outside the store was touched")
    for name in appliers:
        for layer in (name, f"{name}-naive"):
            foreign = {mark for mark in marks_in(Path(driver.store.diff_path(layer)))
                       if mark != f"written by {name}\n".encode()}
            if foreign:
                result.violations.append(f"{layer} holds another layer's content: {foreign}")
    if marks_in(victim):
        result.violations.append("the victim holds an applier's content")
    if os.listdir(driver.store.staging_dir):
        result.violations.append("staging was left behind")
    return result


def fuzz_layers_parser(root: Path, examples: int) -> int:
    store = aufs.store.layout.Store(str(root))
    (root / "layers").mkdir(parents=True, exist_ok=True)
    count = 0

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(content=st.binary(max_size=300))
    def one(content: bytes) -> None:
        nonlocal count
        (root / "layers" / "probe").write_bytes(content)
        try:
            parents = store.parent_ids("probe")
        except AufsError:
            return
        for parent in parents:
            aufs.ids.validate_layer_id(parent)
        count += 1

    one()
    return count


def fuzz_mount_data(examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None)
    @given(rw=st.text(max_size=200), layers=st.lists(st.text(max_size=300), max_size=40),
           label=st.text(max_size=100), page=st.integers(-5, 5000), dirperm1=st.booleans())
    def one(rw: str, layers: list[str], label: str, page: int, dirperm1: bool) -> None:
        try:
            chunks = aufs.aufs_mount_data(rw, layers, label, dirperm1=dirperm1, page_size=page)
        except ValueError:
            return
        assert all(len(chunk.encode("utf-8", "surrogateescape")) < page for chunk in chunks)

    one()


def main() -> int:
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        arena = Arena(Path(scratch) / "apply")
        fuzz_apply(arena, examples, seed)
        parsed = fuzz_layers_parser(Path(scratch) / "parser", examples // 5)
        race = race_appliers_and_differ(arena.driver, arena.sentinel, max(examples // 100, 5),
                                        seed)
    if race.violations:
        print("\n".join(race.violations))
        return 1
    fuzz_mount_data(examples // 5)
    print(f"fuzz campaign (seed {seed}): {arena.examples} archives applied or refused, "
          f"{examples // 5} layers files ({parsed} valid), {examples // 5} mount-data inputs, "
          f"threads: {race.applied} applied and {race.refused} refused beside "
          f"{race.diffs} diffs, 0 violations, {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
