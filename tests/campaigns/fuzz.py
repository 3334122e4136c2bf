"""Fuzzing campaign: apply_diff over generated and mutated tar streams may raise nothing but
DiffError, never touches a file outside the layer (a sentinel tree beside the root is checked
after every example), and leaves the layer unchanged when it refuses. Also the layers/ parser
and the mount-data builder.

    python tests/campaigns/fuzz.py [EXAMPLES] [SEED]     # default 5000 1
"""

from __future__ import annotations

import io
import os
import random
import sys
import tarfile
import tempfile
import time
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
    fuzz_mount_data(examples // 5)
    print(f"fuzz campaign (seed {seed}): {arena.examples} archives applied or refused, "
          f"{examples // 5} layers files ({parsed} valid), {examples // 5} mount-data inputs, "
          f"0 violations, {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
