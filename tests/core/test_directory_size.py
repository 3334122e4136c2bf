"""The directory-size walker against a plain reference walk, on generated and hostile trees."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import IS_ROOT, tmpfs_mount


def reference_size(root: Path) -> int:
    """Docker's directory.Size, written plainly: lstat everything, skip dirs and empty files,
    count each (st_dev, st_ino) once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISDIR(info.st_mode) or info.st_size == 0:
                continue
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            total += info.st_size
    return total


# A tree is built by a list of steps, each naming earlier entries by index.
names = st.text(alphabet=st.sampled_from("abcxyz.-_é"), min_size=1, max_size=12).filter(
    lambda name: name not in (".", "..")
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("dir"), st.integers(0, 50), names),
        st.tuples(st.just("file"), st.integers(0, 50), names, st.integers(0, 5000)),
        st.tuples(st.just("hardlink"), st.integers(0, 50), names, st.integers(0, 50)),
        st.tuples(st.just("symlink"), st.integers(0, 50), names, st.integers(0, 50)),
        st.tuples(st.just("unreadable"), st.integers(0, 50)),
    ),
    max_size=60,
)


def build_tree(root: Path, plan: list[tuple[object, ...]]) -> None:
    dirs, files = [root], []
    for step in plan:
        kind = step[0]
        parent = dirs[int(step[1]) % len(dirs)]  # type: ignore[call-overload]
        if kind == "unreadable":
            if parent != root:
                parent.chmod(0)
            continue
        path = parent / str(step[2])
        if os.path.lexists(path):
            continue
        if kind == "dir":
            path.mkdir()
            dirs.append(path)
        elif kind == "file":
            path.write_bytes(b"x" * int(step[3]))  # type: ignore[call-overload]
            files.append(path)
        elif kind == "hardlink" and files:
            os.link(files[int(step[3]) % len(files)], path)  # type: ignore[call-overload]
            files.append(path)
        elif kind == "symlink":
            targets = dirs + files
            os.symlink(targets[int(step[3]) % len(targets)], path)  # type: ignore[call-overload]


def remove_tree(root: Path) -> None:
    for directory, dirnames, _ in os.walk(root):
        for name in dirnames:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755)
    shutil.rmtree(root)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=steps, threads=st.sampled_from([0, 1, 2, 3]))
def test_matches_reference_walk(
    impl: ModuleType, session_scratch: Path, plan: list[tuple[object, ...]], threads: int
) -> None:
    root = session_scratch / uuid.uuid4().hex
    root.mkdir()
    try:
        build_tree(root, plan)
        assert impl.directory_size(root, threads=threads) == reference_size(root)
    finally:
        remove_tree(root)


def test_dockers_small_cases(impl: ModuleType, scratch: Path) -> None:
    assert impl.directory_size(scratch) == 0
    (scratch / "empty").touch()
    assert impl.directory_size(scratch) == 0
    (scratch / "nested" / "deeper").mkdir(parents=True)
    assert impl.directory_size(scratch) == 0
    (scratch / "nested" / "five").write_bytes(b"12345")
    assert impl.directory_size(scratch) == 5
    (scratch / "six").write_bytes(b"1")
    assert impl.directory_size(scratch) == 6


def test_hardlinks_count_once_and_symlinks_count_themselves(
    impl: ModuleType, scratch: Path
) -> None:
    (scratch / "a").mkdir()
    (scratch / "b").mkdir()
    (scratch / "a" / "data").write_bytes(b"d" * 1000)
    os.link(scratch / "a" / "data", scratch / "b" / "same")
    os.link(scratch / "a" / "data", scratch / "a" / "again")
    os.symlink("a", scratch / "to-dir")  # 1 byte of target, never followed
    os.symlink("/nowhere/at/all", scratch / "dangling")
    assert impl.directory_size(scratch) == 1000 + 1 + len("/nowhere/at/all")


def test_root_that_is_not_a_directory(impl: ModuleType, scratch: Path) -> None:
    (scratch / "file").write_bytes(b"abc")
    os.symlink("file", scratch / "link")
    assert impl.directory_size(scratch / "file") == 3
    assert impl.directory_size(scratch / "link") == 4


def test_missing_root_raises_file_not_found(impl: ModuleType, scratch: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        impl.directory_size(scratch / "missing")
    assert caught.value.filename == str(scratch / "missing")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount two tmpfs instances")
def test_same_inode_number_on_two_filesystems(impl: ModuleType, scratch: Path) -> None:
    # Two fresh tmpfs hand out the same inode numbers; keying on st_ino alone (Docker) would
    # count the second filesystem's linked file as a duplicate.
    with tmpfs_mount(scratch / "one", "1m") as one, tmpfs_mount(scratch / "two", "1m") as two:
        for mount, size in ((one, 100), (two, 300)):
            (mount / "data").write_bytes(b"z" * size)
            os.link(mount / "data", mount / "link")
        assert os.lstat(one / "data").st_ino == os.lstat(two / "data").st_ino
        assert impl.directory_size(scratch) == 400


def test_path_longer_than_path_max(impl: ModuleType, scratch: Path) -> None:
    component = "d" * 200
    fd = os.open(scratch, os.O_RDONLY)
    try:
        for _ in range(30):  # 30 * 201 bytes: past PATH_MAX (4096)
            os.mkdir(component, dir_fd=fd)
            inner = os.open(component, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with os.fdopen(os.open("deep-file", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
            f.write(b"q" * 77)
    finally:
        os.close(fd)
    assert impl.directory_size(scratch) == 77


def test_entries_vanishing_during_the_walk(impl: ModuleType, scratch: Path) -> None:
    files = []
    for d in range(40):
        (scratch / f"d{d}" / "sub").mkdir(parents=True)
        for f in range(100):
            path = scratch / f"d{d}" / ("sub" if f % 2 else "") / f"f{f}"
            path.write_bytes(b"v" * 10)
            files.append(path)
    full = impl.directory_size(scratch)
    assert full == 40 * 100 * 10

    stop = threading.Event()

    def remove_everything() -> None:
        for path in files:
            path.unlink()
        for d in range(40):
            shutil.rmtree(scratch / f"d{d}")
        stop.set()

    remover = threading.Thread(target=remove_everything)
    remover.start()
    sizes = []
    while not stop.is_set():
        sizes.append(impl.directory_size(scratch))
    remover.join()
    assert all(0 <= size <= full and size % 10 == 0 for size in sizes)
    assert impl.directory_size(scratch) == 0


def run_as_nobody(function: Callable[[], str]) -> str:
    """Runs function in a forked child that dropped to uid/gid 65534; returns what it returned."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(writer, function().encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        output = pipe.read().decode()
    os.waitpid(pid, 0)
    return output


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run the walk as another user")
def test_unreadable_directory_raises_permission_error(impl: ModuleType) -> None:
    with tempfile.TemporaryDirectory() as base:
        os.chmod(base, 0o755)  # pytest's tmp_path is 0700: the other user could not reach it
        with tmpfs_mount(Path(base) / "tree", "1m") as tree:
            (tree / "open" / "closed").mkdir(parents=True)
            (tree / "open" / "closed" / "secret").write_bytes(b"s" * 10)
            (tree / "open" / "closed").chmod(0)

            def walk() -> str:
                try:
                    return f"no error: {impl.directory_size(tree)}"
                except PermissionError as error:
                    return str(error.filename)

            assert run_as_nobody(walk) == str(tree / "open" / "closed")
            assert impl.directory_size(tree) == 10  # root reads it
