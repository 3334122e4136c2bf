"""Checking a store's invariants, and repairing what is safe to repair.

A healthy root: every layer in layers/ has its diff/ dir and an intact parent chain; nothing
is half done (no staging entry without a live owner, no `*-removing`, no migration under
way); no mount under mnt/ belongs to a layer that does not exist; no dir in diff/ or mnt/
lacks its layer; the whiteouts found agree with the format marker; each tar-split record is
readable and its files still rebuild the recorded diff_id. Upper parts add their own
checks and repairs (`aufs.images.fsck` adds the tags).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from aufs import _implementation as native
from aufs.archive import whiteouts
from aufs.archive.tarsplit import FILE_NAME as TAR_SPLIT_FILE
from aufs.archive.tarsplit import TarSplitMismatch, read_entries, replay
from aufs.errors import AufsError
from aufs.ids import REMOVING_SUFFIX, validate_layer_id
from aufs.store.atomic import atomic_remove, remove_tree
from aufs.store.layout import INCOMPLETE_SUFFIX, Store, short_link_name
from aufs.store.locking import LayerReferences, RootLock, lock_would_block
from aufs.store.treewalk import walk


@dataclass(frozen=True)
class Problem:
    code: str
    path: str
    message: str
    repair: str  # what --repair does, or what to do by hand
    safe: bool  # --repair does it: nothing that still holds data is lost
    subject: str = ""  # the layer id or tag the problem is about, when there is one

    def __str__(self) -> str:
        how = "repairable with --repair" if self.safe else "by hand"
        return f"{self.code}: {self.path}: {self.message} ({how}: {self.repair})"


Check = Callable[[Store, set[str]], list[Problem]]  # (store, layer ids) -> problems
Repair = Callable[[Store, Problem], None]

# The problems that make a layer unusable as recorded; repair(force=True) removes such a layer
# with every layer built on it.
BROKEN_LAYER = ("missing-diff", "missing-parent", "corrupt-layers-file", "inconsistent-chain")
FORCE_HINT = "fsck --repair --force removes it and the layers built on it"


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _mounts_under(directory: str) -> list[str]:
    """Mount points below directory, from /proc/self/mountinfo (octal escapes decoded)."""
    found = []
    prefix = directory.rstrip("/") + "/"
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            target = line.split()[4].decode("unicode_escape").encode("latin-1")
            path = os.fsdecode(target)
            if path.startswith(prefix):
                found.append(path)
    return found


def _aufs_whiteouts_in(branch: str) -> str | None:
    """A `.wh.` file below the branch's top (aufs metadata aside), if there is one."""
    for directory, dirnames, filenames in walk(branch):
        if directory == branch:
            dirnames[:] = [d for d in dirnames if not d.startswith(whiteouts.META_PREFIX)]
        for name in filenames:
            if name.startswith(whiteouts.PREFIX) and not (
                    directory == branch and name.startswith(whiteouts.META_PREFIX)):
                return os.path.join(directory, name)
    return None


def check(root: str, extra_checks: Sequence[Check] = ()) -> list[Problem]:
    """Every problem found in the store at root, by the store's checks and extra_checks."""
    store = Store(os.path.abspath(root))
    problems: list[Problem] = []
    add = problems.append
    ids = set()
    for name in _listdir(store.layers_dir):
        path = store.layer_file(name)
        if os.path.isdir(path):
            continue
        try:
            validate_layer_id(name)
        except AufsError:
            add(Problem("bad-layer-name", path, "a file in layers/ that is no layer id",
                        "move it out of layers/", False))
            continue
        ids.add(name)
    chains: dict[str, list[str]] = {}
    for layer in sorted(ids):
        try:
            chains[layer] = store.parent_ids(layer)
        except AufsError as error:
            add(Problem("corrupt-layers-file", store.layer_file(layer), str(error),
                        f"restore the file from a backup, or {FORCE_HINT}", False, layer))
    has_children = {parents[0] for parents in chains.values() if parents}
    for layer in chains:
        if (layer.endswith(INCOMPLETE_SUFFIX) and layer not in has_children
                and not LayerReferences.changing(store.layer_file(layer))
                and not LayerReferences.held_elsewhere(store.diff_path(layer))):
            add(Problem("incomplete-layer", store.layer_file(layer), "an import or pull "
                        "stopped while filling it", "delete it (a new run fetches it again)",
                        True))
    for layer, parents in chains.items():
        if not os.path.isdir(store.diff_path(layer)):
            if layer in has_children:
                add(Problem("missing-diff", store.diff_path(layer), "the layer's content is "
                            "gone and other layers build on it", FORCE_HINT, False, layer))
            else:
                add(Problem("missing-diff", store.diff_path(layer), "the layer's content is "
                            "gone", "remove the layer's metadata (its content is already lost)",
                            True, layer))
        missing = [parent for parent in parents if parent not in ids]
        if missing:
            add(Problem("missing-parent", store.layer_file(layer),
                        f"ancestor {missing[0]} does not exist",
                        f"restore that layer, or {FORCE_HINT}", False, layer))
        elif parents and parents[0] in chains and [parents[0], *chains[parents[0]]] != parents:
            add(Problem("inconsistent-chain", store.layer_file(layer),
                        "its ancestors differ from its parent's own chain",
                        f"restore the layers file from a backup, or {FORCE_HINT}", False,
                        layer))

    for directory in (store.diff_dir, store.mnt_dir, store.work_dir, store.layerdb_dir):
        for name in _listdir(directory):
            path = os.path.join(directory, name)
            if name.endswith(REMOVING_SUFFIX):
                add(Problem("stale-removing", path, "a removal that did not finish",
                            "delete it", True))
            elif name not in ids and os.path.isdir(path):
                add(Problem("orphan-dir", path, "no layer owns this dir (an interrupted "
                            "create or remove)", "delete it", True))
    problems.extend(_check_short_links(store, ids))
    for name in _listdir(store.staging_dir):
        path = os.path.join(store.staging_dir, name)
        if os.path.isdir(path) and not lock_would_block(path, exclusive=True):
            add(Problem("abandoned-staging", path, "work left by an interrupted apply or "
                        "migration", "delete it (the layer it was for is unchanged)", True))
    for target in _mounts_under(store.mnt_dir):
        layer = os.path.relpath(target, store.mnt_dir).split("/")[0]
        if layer not in ids:
            add(Problem("orphan-mount", target, "a mount for a layer that does not exist",
                        "unmount it (lazily)", True))

    marker = None
    try:
        marker = store.read_format()
    except AufsError as error:
        add(Problem("bad-format-marker", os.path.join(store.root, "whiteout-format"),
                    str(error), "write aufs or overlay into it", False))
    heading = None
    try:
        with open(os.path.join(store.root, "migration.json")) as handle:
            heading = json.load(handle).get("to")
    except FileNotFoundError:
        pass
    except ValueError:
        add(Problem("bad-migration-state", os.path.join(store.root, "migration.json"),
                    "unreadable", "delete it, then run `aufs migrate` again", False))
    if heading:
        add(Problem("migration-in-progress", store.root, f"half way to {heading} whiteouts",
                    f"finish it (aufs migrate --to {heading})", True))
    elif marker == "overlay":
        for layer in sorted(ids):
            found = _aufs_whiteouts_in(store.diff_path(layer))
            if found:
                add(Problem("format-mismatch", found, "an AUFS whiteout in an overlay-format "
                            "store (overlayfs shows it as a file)",
                            "convert that layer's whiteouts to overlay", True))
    for layer in store.recorded_ids():
        if layer in ids and os.path.isdir(store.diff_path(layer)):
            problem = _check_record(store, layer)
            if problem is not None:
                add(problem)
    for more in extra_checks:
        problems.extend(more(store, ids))
    return problems


def _check_record(store: Store, layer: str) -> Problem | None:
    """Reads the layer's tar-split and rebuilds its tar (hashing only) from the files."""
    from aufs.store.diffs import FileGetter

    path = store.record_path(layer)
    try:
        record = store.read_record(layer)
        if record is None:
            return Problem("bad-tar-split", path, "a tar-split record without its diff_id",
                           "delete it (diff then writes a fresh tar)", True, layer)
        with gzip.open(record.tar_split, "rb") as journal, \
                FileGetter(store.diff_path(layer)) as files:
            digest = replay(read_entries(journal), files)  # type: ignore[arg-type]
    except TarSplitMismatch as error:
        return _mismatch(path, str(error))
    except (OSError, EOFError, AufsError, ValueError, zlib.error) as error:
        if isinstance(error, OSError) and error.errno == errno.ENOENT \
                and not str(error.filename or "").endswith(TAR_SPLIT_FILE):
            return _mismatch(path, f"a file it names is gone ({error})")
        return Problem("bad-tar-split", path, f"unreadable: {error}",
                       "delete it (diff then writes a fresh tar)", True, layer)
    if digest != record.diff_id:
        return _mismatch(path, f"the files rebuild {digest}, not the recorded {record.diff_id}")
    return None


def _mismatch(path: str, why: str) -> Problem:
    return Problem("tar-split-mismatch", path, f"the layer no longer rebuilds its original tar "
                   f"({why}); its diff is a fresh tar with another digest",
                   "delete the record (or re-pull the image to get the original back)", True,
                   os.path.basename(path))


def _check_short_links(store: Store, ids: set[str]) -> list[Problem]:
    """Each entry in l/ is a layer's short link pointing at its diff dir. A missing one is
    no problem: the next mount makes it."""
    problems = []
    owners = {short_link_name(layer): layer for layer in ids}
    for name in _listdir(store.link_dir):
        path = os.path.join(store.link_dir, name)
        layer = owners.get(name)
        if layer is None:
            problems.append(Problem("orphan-short-link", path, "a short link that belongs to "
                                    "no layer (an interrupted remove)", "delete it", True))
        elif not store.short_link_ok(layer):
            problems.append(Problem("bad-short-link", path, f"should be a symlink to "
                                    f"{store.short_link_target(layer)}", "make it again", True,
                                    subject=layer))
    return problems


def repair(root: str, extra_checks: Sequence[Check] = (),
           extra_repairs: Mapping[str, Repair] | None = None, *, force: bool = False,
           ) -> tuple[list[Problem], list[Problem]]:
    """Repairs every safe problem, holding the root lock (so no create or apply runs at the
    same time in another process); returns (repaired, still there). extra_repairs mends the
    problems of extra_checks, by problem code.

    Without force, a layer whose own content is on disk is never deleted. force=True also
    removes each broken layer (see BROKEN_LAYER) and every layer built on it, then repairs
    what that leaves (the tags of extra_checks that named them, say): each layer removed is a
    "removed-layer" problem in the repaired list. A layer that is mounted, held by a process
    or being changed is kept, with the broken layers below it, and is a "broken-layer-in-use"
    problem in the list of those still there."""
    store = Store(os.path.abspath(root))
    repaired: list[Problem] = []
    kept: list[Problem] = []
    lock = RootLock(store.layers_dir) if os.path.isdir(store.layers_dir) else None
    with lock.hold() if lock is not None else contextlib.nullcontext():
        repaired += _repair_safe(store, check(root, extra_checks), extra_repairs)
        if force:
            removed, kept = _remove_broken_layers(store, check(root, extra_checks))
            repaired += removed
            if removed:
                repaired += _repair_safe(store, check(root, extra_checks), extra_repairs)
    if lock is not None:
        lock.close()
    return repaired, check(root, extra_checks) + kept


def _repair_safe(store: Store, problems: list[Problem],
                 extra_repairs: Mapping[str, Repair] | None) -> list[Problem]:
    repaired = []
    for problem in problems:
        if problem.safe:
            mend = (extra_repairs or {}).get(problem.code, _repair_one)
            mend(store, problem)
            repaired.append(problem)
    return repaired


def _chains(store: Store) -> dict[str, list[str]]:
    """Every layer's ancestors; a layer whose layers file cannot be read has none here."""
    chains = {}
    for layer in store.ids():
        try:
            chains[layer] = store.parent_ids(layer)
        except AufsError:
            chains[layer] = []
    return chains


def _why_in_use(store: Store, layer: str, mounted: set[str]) -> str | None:
    if layer in mounted:
        return "mounted"
    if LayerReferences.held_elsewhere(store.diff_path(layer)):
        return "held by a process"
    if LayerReferences.changing(store.layer_file(layer)):
        return "being changed (an apply is under way)"
    return None


def _leaves_first(layers: list[str], chains: dict[str, list[str]]) -> list[str]:
    """layers ordered so that none comes before a layer that names it as an ancestor (by
    what each layers file says, consistent or not)."""
    order: list[str] = []
    left = set(layers)
    while left:
        named = {parent for layer in left for parent in chains.get(layer, []) if parent != layer}
        leaves = sorted(left - named) or sorted(left)  # a loop of corrupt files: any order
        order += leaves
        left -= set(leaves)
    return order


def _remove_broken_layers(store: Store, problems: list[Problem]
                          ) -> tuple[list[Problem], list[Problem]]:
    """Removes each broken layer and everything built on it, leaves first, except what is in
    use and the layers below it; returns (removed, kept), one problem per layer."""
    broken: dict[str, str] = {}
    for problem in problems:
        if problem.code in BROKEN_LAYER and problem.subject:
            broken.setdefault(problem.subject, problem.message)
    if not broken:
        return [], []
    chains = _chains(store)
    doomed = dict(broken)  # layer -> why it goes
    for layer, parents in chains.items():
        below = [parent for parent in parents if parent in broken]
        if layer not in doomed and below:
            doomed[layer] = f"built on broken layer {below[0]}"
    mounted = {os.path.relpath(target, store.mnt_dir).split("/")[0]
               for target in _mounts_under(store.mnt_dir)}
    keep: dict[str, str] = {}
    for layer in doomed:
        why = _why_in_use(store, layer, mounted)
        if why is None:
            continue
        keep[layer] = f"{why}; {doomed[layer]}"
        for parent in chains.get(layer, []):
            if parent in doomed:
                keep.setdefault(parent, f"kept: {layer} builds on it and is {why}; "
                                        f"{doomed[parent]}")
    removed = []
    for layer in _leaves_first([layer for layer in doomed if layer not in keep], chains):
        store.remove_layer_file(layer)
        store.remove_layer_dirs(layer)
        removed.append(Problem("removed-layer", store.layer_file(layer), doomed[layer],
                               "removed with its content (--force)", False, layer))
    kept = [Problem("broken-layer-in-use", store.layer_file(layer), why,
                    "unmount it or stop what holds it, then run fsck --repair --force again",
                    False, layer)
            for layer, why in sorted(keep.items())]
    return removed, kept


def _repair_one(store: Store, problem: Problem) -> None:
    from aufs.archive.staging import clone_tree, exchange
    from aufs.store.migrate import migrate, to_overlay

    if problem.code == "orphan-mount":
        native.unmount(problem.path, native.MNT_DETACH)
    elif problem.code in ("stale-removing", "abandoned-staging", "orphan-short-link"):
        remove_tree(problem.path)
    elif problem.code == "bad-short-link":
        layer = problem.subject
        if os.path.isdir(problem.path) and not os.path.islink(problem.path):
            remove_tree(problem.path)
        store.ensure_short_link(layer)
    elif problem.code == "orphan-dir":
        if os.path.ismount(problem.path):
            native.unmount(problem.path, native.MNT_DETACH)
        atomic_remove(problem.path)
    elif problem.code == "incomplete-layer":
        layer = os.path.basename(problem.path)
        store.remove_layer_file(layer)
        store.remove_layer_dirs(layer)
    elif problem.code == "missing-diff":
        layer = os.path.basename(problem.path)
        store.remove_layer_file(layer)
        for path in (store.mount_path(layer), store.work_path(layer), store.record_path(layer)):
            if os.path.isdir(path) and not os.path.ismount(path):
                atomic_remove(path)
    elif problem.code in ("bad-tar-split", "tar-split-mismatch"):
        store.remove_record(os.path.basename(problem.path))
    elif problem.code == "migration-in-progress":
        with open(os.path.join(store.root, "migration.json")) as handle:
            migrate(store, json.load(handle)["to"])
    elif problem.code == "format-mismatch":
        layer = os.path.relpath(problem.path, store.diff_dir).split("/")[0]
        with store.staging("fsck") as staging:
            clone = os.path.join(staging, "tree")
            clone_tree(store.diff_path(layer), clone)
            to_overlay(clone)
            exchange(clone, store.diff_path(layer))
    else:
        raise AufsError(f"fsck has no repair for {problem.code}")

