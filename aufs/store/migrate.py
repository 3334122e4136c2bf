"""Converting a store's whiteout format in place: AUFS (`.wh.` files) <-> overlay (0/0
devices and trusted.overlay.opaque), so an old Docker AUFS store can mount on kernel
overlayfs without FUSE.

One layer at a time: the branch is cloned (hardlinks), converted in the clone, and swapped in
with RENAME_EXCHANGE; ROOT/migration.json records the layers done. An interrupted migration
resumes where it stopped; until it finishes, Driver refuses to open the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from aufs.archive import whiteouts
from aufs.archive.staging import clone_tree, exchange
from aufs.errors import AufsError
from aufs.store.atomic import atomic_write, remove_tree
from aufs.store.layout import FORMAT_MARKER, WHITEOUT_FORMATS, Store
from aufs.store.treewalk import walk

log = logging.getLogger(__name__)

MIGRATION_FILE = "migration.json"


class MigrationError(AufsError):
    """The store cannot be migrated now."""


@dataclass(frozen=True)
class MigrationResult:
    target: str
    converted: tuple[str, ...]
    already_done: tuple[str, ...]


def migration_in_progress(store: Store) -> str | None:
    """The format a half-done migration is heading to, or None."""
    try:
        with open(os.path.join(store.root, MIGRATION_FILE)) as handle:
            return str(json.load(handle)["to"])
    except FileNotFoundError:
        return None


def to_overlay(branch: str) -> None:
    """AUFS whiteouts in a branch become overlay ones; aufs' own metadata goes."""
    for directory, dirnames, filenames in walk(branch):
        top = directory == branch
        for name in list(dirnames):
            if top and name.startswith(whiteouts.META_PREFIX):
                remove_tree(os.path.join(directory, name))
                dirnames.remove(name)
        for name in filenames:
            path = os.path.join(directory, name)
            if name == whiteouts.OPAQUE_MARKER:
                os.setxattr(directory, whiteouts.OVERLAY_OPAQUE_XATTR, b"y")
                os.unlink(path)
            elif name.startswith(whiteouts.META_PREFIX):
                os.unlink(path)
            elif name.startswith(whiteouts.PREFIX):
                target = os.path.join(directory, name[len(whiteouts.PREFIX):])
                info = os.lstat(path)
                os.unlink(path)
                if not os.path.lexists(target):
                    os.mknod(target, stat.S_IFCHR, 0)
                    os.chown(target, info.st_uid, info.st_gid, follow_symlinks=False)


def to_aufs(branch: str) -> None:
    """Overlay whiteouts in a branch become AUFS ones."""
    for directory, _dirnames, filenames in walk(branch):
        if whiteouts.is_opaque(directory):
            for attribute in (whiteouts.OVERLAY_OPAQUE_XATTR, whiteouts.FUSE_OPAQUE_XATTR):
                with contextlib.suppress(OSError):  # absent
                    os.removexattr(directory, attribute)
            marker = os.path.join(directory, whiteouts.OPAQUE_MARKER)
            if not os.path.lexists(marker):
                os.close(os.open(marker, os.O_CREAT | os.O_WRONLY, 0o600))
        for name in filenames:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if whiteouts.is_overlay_whiteout(info):
                os.unlink(path)
                if not name.startswith(whiteouts.PREFIX):
                    marker = os.path.join(directory, whiteouts.PREFIX + name)
                    os.close(os.open(marker, os.O_CREAT | os.O_WRONLY, 0o600))
                    os.chown(marker, info.st_uid, info.st_gid)


def migrate(store: Store, target: str,
            progress: Callable[[str, int], None] | None = None) -> MigrationResult:
    """Converts every layer of an unmounted store to `target` whiteouts; resumable."""
    if target not in WHITEOUT_FORMATS:
        raise ValueError(f"unknown whiteout format {target!r}; choose aufs or overlay")
    current = store.read_format() or "aufs"
    heading = migration_in_progress(store)
    if heading is not None and heading != target:
        raise MigrationError(f"a migration to {heading} is half done; finish it with "
                             f"`aufs migrate --to {heading}` first")
    if heading is None and current == target:
        return MigrationResult(target, (), tuple(store.ids()))
    mounted = [name for name in _listdir(store.mnt_dir)
               if os.path.ismount(os.path.join(store.mnt_dir, name))]
    if mounted:
        raise MigrationError(f"layers are mounted ({', '.join(sorted(mounted)[:3])}...): "
                             "unmount them (aufs umount, or Driver.cleanup()) first")
    state_path = os.path.join(store.root, MIGRATION_FILE)
    done: list[str] = []
    if heading is not None:
        with open(state_path) as handle:
            done = list(json.load(handle).get("done", []))
    os.makedirs(store.staging_dir, mode=0o700, exist_ok=True)
    _save_state(store, state_path, target, done)
    convert = to_overlay if target == "overlay" else to_aufs
    converted = []
    for layer in store.ids():
        if layer in done:
            continue
        branch = store.diff_path(layer)
        with store.staging("migrate") as staging:
            clone = os.path.join(staging, "tree")
            clone_tree(branch, clone)
            convert(clone)
            exchange(clone, branch)
        # its tar-split names AUFS whiteout files that are gone now: it can never replay
        # again, so it goes (diff writes a fresh tar; fsck has nothing to report)
        store.remove_record(layer)
        done.append(layer)
        converted.append(layer)
        _save_state(store, state_path, target, done)
        log.info("migrated %s to %s whiteouts", layer, target)
        if progress is not None:
            progress("layer", 1)
    atomic_write(os.path.join(store.root, FORMAT_MARKER), f"{target}\n".encode(),
                 temp_dir=store.staging_dir)
    os.unlink(state_path)
    store.forget_chain()  # every branch was swapped
    return MigrationResult(target, tuple(converted),
                           tuple(layer for layer in done if layer not in converted))


def _save_state(store: Store, path: str, target: str, done: list[str]) -> None:
    atomic_write(path, json.dumps({"to": target, "done": done}).encode(),
                 temp_dir=store.staging_dir)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
