"""The store's own walks (fsck's whiteout check, migrate's conversions) on layers deeper than
Python's recursion limit, which os.walk on Python 3.11 cannot take."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from aufs.archive import whiteouts
from aufs.store import fsck, migrate
from aufs.store.atomic import remove_tree
from aufs.store.treewalk import walk
from conftest import IS_ROOT

DEPTH = 1500


@pytest.fixture
def deep(tmp_path: Path) -> Iterator[Path]:
    """A branch DEPTH directories deep, with an AUFS whiteout at the bottom."""
    branch = tmp_path / "branch"
    branch.mkdir()
    bottom = str(branch)
    for _ in range(DEPTH):
        bottom += "/a"
        os.mkdir(bottom)
    Path(bottom, whiteouts.PREFIX + "gone").touch()
    yield Path(bottom)
    remove_tree(str(branch))  # not shutil.rmtree (pytest's clean-up): it recurses


def test_walk_lists_as_os_walk_does(tmp_path: Path) -> None:
    for directory in ("a/b/c", "a/d", "e"):
        (tmp_path / directory).mkdir(parents=True)
    for name in ("f", "a/g", "a/b/h", "a/b/c/i"):
        (tmp_path / name).write_text(name)
    (tmp_path / "a/link").symlink_to("d")
    (tmp_path / "dangling").symlink_to("nowhere")

    def listing(walker: Iterator[tuple[str, list[str], list[str]]]) -> list[tuple[str, ...]]:
        return [(directory, *sorted(dirnames), "|", *sorted(filenames))
                for directory, dirnames, filenames in walker]

    assert sorted(listing(walk(str(tmp_path)))) == sorted(listing(os.walk(tmp_path)))
    pruned = []
    for directory, dirnames, _ in walk(str(tmp_path)):
        pruned.append(directory)
        if directory == str(tmp_path):
            dirnames.remove("a")
    assert pruned == [str(tmp_path), str(tmp_path / "e")]


def test_fsck_finds_an_aufs_whiteout_at_the_bottom(deep: Path, tmp_path: Path) -> None:
    found = fsck._aufs_whiteouts_in(str(tmp_path / "branch"))
    assert found == str(deep / (whiteouts.PREFIX + "gone"))


@pytest.mark.skipif(not IS_ROOT, reason="overlay whiteouts are device nodes: mknod needs root")
def test_migrate_converts_at_the_bottom_and_back(deep: Path, tmp_path: Path) -> None:
    migrate.to_overlay(str(tmp_path / "branch"))
    info = os.lstat(deep / "gone")
    assert stat.S_ISCHR(info.st_mode) and info.st_rdev == 0
    assert not (deep / (whiteouts.PREFIX + "gone")).exists()
    migrate.to_aufs(str(tmp_path / "branch"))
    assert os.listdir(deep) == [whiteouts.PREFIX + "gone"]
