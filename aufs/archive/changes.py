"""What a layer changed: Docker's Change list, computed two ways that agree.

- layered_changes walks only the layer's own branch and looks paths up in its parents'
  branches with union semantics (whiteouts and opaque dirs honoured). Docker's version looked
  in every parent branch blindly, and reported a nested `.wh..wh..opq` as a bogus Delete.
- tree_changes compares two mounted trees (Docker's naive ChangesDirs).

Both report every changed path, a Delete for the topmost deleted path only, and a Modify for
each directory above a change. Results are sorted by path.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aufs.archive import whiteouts

CAPABILITY_XATTR = "security.capability"


class ChangeKind(enum.IntEnum):
    MODIFY = 0
    ADD = 1
    DELETE = 2

    def __str__(self) -> str:
        return "CAD"[self.value]


@dataclass(frozen=True, order=True)
class Change:
    path: str  # rooted at "/", no trailing slash
    kind: ChangeKind

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


# ---- shared comparison ------------------------------------------------------------------------


def _capability(path: str) -> bytes | None:
    try:
        return os.getxattr(path, CAPABILITY_XATTR, follow_symlinks=False)
    except OSError:
        return None


def _same_time(a: int, b: int) -> bool:
    """Tar keeps whole seconds: equal, or the same second with one side truncated."""
    if a == b:
        return True
    second = 1_000_000_000
    return a // second == b // second and (a % second == 0 or b % second == 0)


def stat_differs(old: os.stat_result, new: os.stat_result) -> bool:
    """Docker's statDifferent: mode, owner, rdev; and size and mtime for non-directories."""
    if (old.st_mode, old.st_uid, old.st_gid, old.st_rdev) != (
            new.st_mode, new.st_uid, new.st_gid, new.st_rdev):
        return True
    if stat.S_ISDIR(new.st_mode):
        return False
    return old.st_size != new.st_size or not _same_time(old.st_mtime_ns, new.st_mtime_ns)


def _entry_differs(old_path: str, old: os.stat_result, new_path: str,
                   new: os.stat_result) -> bool:
    return stat_differs(old, new) or _capability(old_path) != _capability(new_path)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _join(relative: str, name: str) -> str:
    return f"{relative}/{name}" if relative else name


def _with_parent_modifies(changes: Iterable[Change]) -> list[Change]:
    """Adds a Modify for every directory above a change that is not itself changed."""
    by_path = {change.path: change for change in changes}
    for path in list(by_path):
        parent = os.path.dirname(path)
        while parent not in ("/", "") and parent not in by_path:
            by_path[parent] = Change(parent, ChangeKind.MODIFY)
            parent = os.path.dirname(parent)
    return sorted(by_path.values())


# ---- the layered way (fast path) ----------------------------------------------------------------


class ParentStack:
    """The union of a layer's parents (nearest first), looked up without mounting it."""

    def __init__(self, branches: Sequence[str]) -> None:
        self.branches = list(branches)

    @staticmethod
    def _is_whiteout(branch_dir: str, name: str) -> bool:
        if os.path.lexists(os.path.join(branch_dir, whiteouts.PREFIX + name)):
            return True
        info = _lstat(os.path.join(branch_dir, name))
        return info is not None and whiteouts.is_overlay_whiteout(info)

    @staticmethod
    def _is_opaque(branch_dir: str) -> bool:
        return (os.path.lexists(os.path.join(branch_dir, whiteouts.OPAQUE_MARKER))
                or whiteouts.is_opaque(branch_dir))

    def lookup(self, relative: str) -> tuple[str, os.stat_result] | None:
        """The (path, lstat) the parents' union shows at relative, or None."""
        parts = relative.split("/")
        for branch in self.branches:
            directory = branch
            hidden = False  # an opaque dir on the way hides the deeper branches below it
            for depth, name in enumerate(parts):
                if self._is_whiteout(directory, name):
                    return None
                hidden = hidden or (depth > 0 and self._is_opaque(directory))
                candidate = os.path.join(directory, name)
                info = _lstat(candidate)
                if info is None:
                    if hidden:
                        return None
                    break  # not in this branch: look deeper
                if depth == len(parts) - 1:
                    return candidate, info
                if not stat.S_ISDIR(info.st_mode):
                    return None  # a non-directory here hides everything below it
                directory = candidate
        return None

    def children(self, relative: str) -> list[str]:
        names: set[str] = set()
        for branch in self.branches:
            for name in _listdir(os.path.join(branch, relative)):
                if not name.startswith(whiteouts.PREFIX):
                    names.add(name)
        return sorted(name for name in names if self.lookup(_join(relative, name)) is not None)


def layered_changes(branch: str, parent_branches: Sequence[str]) -> list[Change]:
    """The changes of one branch over its parents, reading both whiteout formats."""
    parents = ParentStack(parent_branches)
    changes: list[Change] = []
    if not os.path.isdir(branch):
        return []
    # (path, hidden): hidden when this dir or one above it is opaque in the branch, so the
    # parents' entries below it are not seen through it
    pending: list[tuple[str, bool]] = [("", False)]
    while pending:
        relative, hidden = pending.pop()
        directory = os.path.join(branch, relative)
        hidden = hidden or ParentStack._is_opaque(directory)
        names = _listdir(directory)
        present = set()
        for name in names:
            child = _join(relative, name)
            path = os.path.join(directory, name)
            info = _lstat(path)
            if info is None:
                continue
            if name.startswith(whiteouts.META_PREFIX):
                continue  # the opaque marker, or aufs metadata (pruned, never walked)
            if name.startswith(whiteouts.PREFIX) or whiteouts.is_overlay_whiteout(info):
                if whiteouts.is_overlay_whiteout(info) and name.startswith(whiteouts.PREFIX):
                    continue  # fuse-overlayfs hides its own metadata names this way
                target_name = name.removeprefix(whiteouts.PREFIX)
                if target_name != name and os.path.lexists(os.path.join(directory, target_name)):
                    continue  # recreated in this very branch: the entry itself is the change
                target = _join(relative, target_name)
                if parents.lookup(target) is not None:
                    changes.append(Change("/" + target, ChangeKind.DELETE))
                continue
            present.add(name)
            lower = parents.lookup(child)
            if lower is None:
                changes.append(Change("/" + child, ChangeKind.ADD))
            elif _entry_differs(lower[0], lower[1], path, info):
                changes.append(Change("/" + child, ChangeKind.MODIFY))
            if stat.S_ISDIR(info.st_mode):
                pending.append((child, hidden))
        if hidden:
            for name in parents.children(relative):
                if name not in present:
                    changes.append(Change("/" + _join(relative, name), ChangeKind.DELETE))
    return _with_parent_modifies(changes)


# ---- comparing two trees (naive path) ------------------------------------------------------------


def tree_changes(new_root: str, old_root: str | None) -> list[Change]:
    """Docker's ChangesDirs: every difference between two trees (old_root None: empty)."""
    changes: list[Change] = []
    pending: list[tuple[str, bool]] = [("", old_root is not None)]
    while pending:
        relative, compare = pending.pop()
        new_dir = os.path.join(new_root, relative)
        new_names = _listdir(new_dir)
        old_names = set(_listdir(os.path.join(old_root, relative))) if compare and old_root \
            else set()
        for name in new_names:
            child = _join(relative, name)
            new_path = os.path.join(new_dir, name)
            new = _lstat(new_path)
            if new is None:
                continue
            old = None
            if name in old_names:
                assert old_root is not None
                old_path = os.path.join(old_root, child)
                old = _lstat(old_path)
            if old is None:
                changes.append(Change("/" + child, ChangeKind.ADD))
                if stat.S_ISDIR(new.st_mode):
                    pending.append((child, False))
                continue
            if (old.st_dev, old.st_ino) == (new.st_dev, new.st_ino) and not stat.S_ISDIR(
                    new.st_mode):
                continue  # the very same file: unchanged
            if _entry_differs(old_path, old, new_path, new):
                changes.append(Change("/" + child, ChangeKind.MODIFY))
            if stat.S_ISDIR(new.st_mode):
                pending.append((child, stat.S_ISDIR(old.st_mode)))
        for name in old_names.difference(new_names):
            changes.append(Change("/" + _join(relative, name), ChangeKind.DELETE))
    return _with_parent_modifies(changes)


def changes_size(root: str, changes: Iterable[Change]) -> int:
    """Docker's ChangesSize: bytes of the added and modified non-directories, each inode once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for change in changes:
        if change.kind is ChangeKind.DELETE:
            continue
        try:
            info = os.lstat(os.path.join(root, change.path.lstrip("/")))
        except OSError as error:
            if error.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
            continue
        if stat.S_ISDIR(info.st_mode):
            continue
        if info.st_nlink > 1:
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
        total += info.st_size
    return total
