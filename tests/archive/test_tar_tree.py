"""The native tree walker (csrc/tartree.c) writes the very bytes of its readable twin, the
Python walk_tree of aufs.archive.export, on generated trees of every kind of entry."""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aufs.archive import export
from aufs.archive.export import ExportOptions, walk_tree, write_tree
from aufs.archive.idmap import IdentityMapping, IDMap
from aufs.errors import DiffError
from aufs.store.atomic import remove_tree
from conftest import IS_ROOT, NATIVE

pytestmark = pytest.mark.skipif(NATIVE is None or export.native.IMPLEMENTATION != "native",
                                reason="the native walker is not built or not chosen")

names = st.one_of(
    st.text(alphabet=st.sampled_from("abz.-_é"), min_size=1, max_size=8),
    st.sampled_from([".wh.gone", ".wh..wh..opq", ".wh..wh.aufs", ".wh..wh.plnk", "b" * 120,
                     "c" * 99, "e" * 100, "d" * 101]),
).filter(lambda name: name not in (".", ".."))
owners = st.sampled_from([0, 1000, 65534, 2_097_151, 2_097_152, 4_000_000_000])
times = st.sampled_from([0, 1_700_000_000_123_456_789, -1_500_000_000, 8**11 + 5, -1])
xattrs = st.sampled_from([("user.note", b"hello"), ("user.empty", b""),
                          ("user.overlay.origin", b"x"), ("trusted.overlay.opaque", b"y"),
                          ("user.fuseoverlayfs.opaque", b"y"), ("trusted.note", b"\0\xff"),
                          ("user.big", b"v" * 3000), ("user.\udcff", b"ff"),
                          ("user.\ue000", b"private use"), ("user.\udce0x", b"cut")])
steps = st.lists(
    st.one_of(
        st.tuples(st.just("dir"), st.integers(0, 40), names),
        st.tuples(st.just("file"), st.integers(0, 40), names, st.integers(0, 3000)),
        st.tuples(st.just("hardlink"), st.integers(0, 40), names, st.integers(0, 40)),
        st.tuples(st.just("symlink"), st.integers(0, 40), names,
                  st.sampled_from(["t", "../up", "l" * 150, "é/x", ""])),
        st.tuples(st.just("node"), st.integers(0, 40), names,
                  st.sampled_from(["fifo", "socket", "whiteout", "null", "block"])),
        st.tuples(st.just("owner"), st.integers(0, 60), owners, owners),
        st.tuples(st.just("mtime"), st.integers(0, 60), times),
        st.tuples(st.just("xattr"), st.integers(0, 60), xattrs),
        st.tuples(st.just("mode"), st.integers(0, 60), st.sampled_from([0o4755, 0o1777, 0])),
    ),
    max_size=50,
)

NODES = {"fifo": (stat.S_IFIFO, 0), "socket": (stat.S_IFSOCK, 0),
         "whiteout": (stat.S_IFCHR, 0), "null": (stat.S_IFCHR, os.makedev(1, 3)),
         "block": (stat.S_IFBLK, os.makedev(7, 1_000_000))}


def build_tree(root: Path, plan: list[tuple[object, ...]]) -> None:
    dirs, files, made = [root], [], []
    for step in plan:
        kind, index = step[0], int(step[1])  # type: ignore[call-overload]
        if kind in ("owner", "mtime", "xattr", "mode"):
            if not made:
                continue
            path = made[index % len(made)]
            if kind == "owner":
                os.chown(path, int(step[2]), int(step[3]),  # type: ignore[call-overload]
                         follow_symlinks=False)
            elif kind == "mtime" and not path.is_symlink():
                os.utime(path, ns=(0, int(step[2])))  # type: ignore[call-overload]
            elif kind == "xattr" and not path.is_symlink() and path.is_dir() | path.is_file():
                key, value = step[2]  # type: ignore[misc]
                os.setxattr(path, key, value)
            elif kind == "mode" and not path.is_symlink():
                path.chmod(int(step[2]) | (0o700 if path.is_dir() else 0))  # type: ignore[call-overload]
            continue
        parent = dirs[index % len(dirs)]
        path = parent / str(step[2])
        if os.path.lexists(path) or len(os.fsencode(path.name)) > 255:
            continue
        if kind == "dir":
            path.mkdir()
            dirs.append(path)
        elif kind == "file":
            path.write_bytes(b"x" * int(step[3]))  # type: ignore[call-overload]
            files.append(path)
        elif kind == "hardlink":
            if not files:
                continue
            os.link(files[int(step[3]) % len(files)], path)  # type: ignore[call-overload]
        elif kind == "symlink":
            os.symlink(str(step[3]) or "x", path)
        elif kind == "node":
            node_type, device = NODES[str(step[3])]
            os.mknod(path, node_type | 0o644, device)
        made.append(path)


def tar_of(writer: object, root: Path, scratch: Path, options: ExportOptions) -> bytes:
    with tempfile.TemporaryFile(dir=scratch) as out:
        writer(root, out.fileno(), options)  # type: ignore[operator]
        out.seek(0)
        return out.read()


def outcome(writer: object, root: Path, scratch: Path, options: ExportOptions) -> object:
    """The tar, or the error that stopped it (a tar cut short is not compared)."""
    try:
        return tar_of(writer, root, scratch, options)
    except DiffError as error:
        return str(error)


# host 0 stays 0, 1000 becomes 5000, 65534 becomes 3,000,000 (a PAX uid); others are unmapped,
# among them gid 2,097,152, just past the end of a range
MAPPED = IdentityMapping(
    uids=IDMap.from_triples([(0, 0, 1), (5000, 1000, 100), (3_000_000, 65534, 1)]),
    gids=IDMap.from_triples([(0, 0, 2), (70_000, 2_097_151, 1)]))


@pytest.fixture(scope="module")
def tree_scratch(session_scratch: Path) -> Path:
    path = session_scratch / "tar-tree"
    path.mkdir()
    return path


@pytest.mark.skipif(not IS_ROOT, reason="devices, owners and trusted.* xattrs need root")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps, convert=st.booleans(), skip_metadata=st.booleans(), mapped=st.booleans())
def test_native_walker_writes_the_bytes_of_the_python_one(
        tree_scratch: Path, plan: list[tuple[object, ...]], convert: bool,
        skip_metadata: bool, mapped: bool) -> None:
    root = tree_scratch / "tree"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    build_tree(root, plan)
    options = ExportOptions(id_mapping=MAPPED if mapped else IdentityMapping(),
                            convert_whiteouts=convert, skip_aufs_metadata=skip_metadata)
    native = outcome(write_tree, root, tree_scratch, options)
    assert native == outcome(walk_tree, root, tree_scratch, options)


def test_xattrs_in_the_order_of_their_decoded_names(tmp_path: Path) -> None:
    """Python sorts the names it decoded (a byte that is not UTF-8 becomes U+DC80..U+DCFF):
    b"\\xff" comes before b"\\xee\\x80\\x80" (U+E000) there, after it in bytes."""
    tree = tmp_path / "tree"
    tree.mkdir()
    target = tree / "file"
    target.touch()
    try:
        for name in ("user.\ue000", "user.\udcff", "user.\udce0x", "user.a\u00e9"):
            os.setxattr(target, name, name.encode("utf-8", "surrogateescape"))
    except OSError:
        pytest.skip("this filesystem keeps no user.* xattrs")
    native = tar_of(write_tree, tree, tmp_path, ExportOptions())
    assert native == tar_of(walk_tree, tree, tmp_path, ExportOptions())
    assert native.index(b"user.\xff=") < native.index(b"user.\xee\x80\x80=")


def test_an_unmapped_owner_names_the_entry(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "dir" / "file").touch()
    options = ExportOptions(id_mapping=IdentityMapping(
        uids=IDMap.from_triples([(0, os.getuid(), 1)]),
        gids=IDMap.from_triples([(0, os.getgid() + 1, 1)])))
    with pytest.raises(DiffError, match=f"entry 'dir': host id {os.getgid()} is not mapped"):
        tar_of(write_tree, tree, tmp_path, options)


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
@pytest.mark.parametrize("owner", [(999, 0), (1000, 0), (1099, 1), (1100, 0), (0, 2),
                                   (65534, 2_097_151), (65534, 2_097_152)])
def test_owners_at_the_ends_of_the_ranges(tmp_path: Path, owner: tuple[int, int]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").touch()
    os.chown(tree / "file", *owner)
    options = ExportOptions(id_mapping=MAPPED)
    native = outcome(write_tree, tree, tmp_path, options)
    assert native == outcome(walk_tree, tree, tmp_path, options)


def test_deep_trees_reopen_their_shallow_levels(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Past OPEN_LEVELS, shallow directories are closed and opened again on the way up."""
    monkeypatch.setattr(export, "OPEN_LEVELS", 2)
    path = tmp_path / "tree"
    for depth in range(12):
        path = path / f"level{depth}"
        path.mkdir(parents=True)
        (path / "a").write_bytes(b"a" * depth)
        (path / "z").write_bytes(b"z")
    native = tar_of(write_tree, tmp_path / "tree", tmp_path, ExportOptions())
    assert native == tar_of(walk_tree, tmp_path / "tree", tmp_path, ExportOptions())
    assert native.count(b"level11/z\0") == 1


def test_a_tree_deeper_than_path_max_at_the_default_fd_budget(tmp_path: Path) -> None:
    """1,500 levels (a path over PATH_MAX), a file after each subdirectory: every level past
    OPEN_LEVELS is opened again on the way up; no fd is left open."""
    root = tmp_path / "tree"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):  # each level from the one above: the paths pass PATH_MAX
        os.mkdir("ab", dir_fd=fd)
        below = os.open("ab", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
        os.close(os.open("zz", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    try:
        fds = len(os.listdir("/proc/self/fd"))
        native = tar_of(write_tree, root, tmp_path, ExportOptions())
        assert len(os.listdir("/proc/self/fd")) == fds
        assert native == tar_of(walk_tree, root, tmp_path, ExportOptions())
        with tarfile.open(fileobj=io.BytesIO(native)) as archive:
            files = [name for name in archive.getnames() if name.endswith("/zz")]
        assert len(files) == 1500 and len(files[0]) > 4096  # the deepest first: "ab" < "zz"
    finally:
        remove_tree(str(root))  # not shutil.rmtree (pytest's clean-up): it recurses


def test_a_closed_reader_is_a_broken_pipe(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "file").write_bytes(b"x" * 100_000)
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    try:
        with pytest.raises(BrokenPipeError):
            write_tree(tmp_path / "tree", write_fd, ExportOptions())  # type: ignore[arg-type]
    finally:
        os.close(write_fd)


def test_an_unreadable_file_names_the_entry(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "dir" / "secret").write_bytes(b"x")
    (tree / "dir" / "secret").chmod(0)
    if os.access(tree / "dir" / "secret", os.R_OK):
        pytest.skip("root reads any file")
    with tempfile.TemporaryFile() as out, pytest.raises(PermissionError, match="dir/secret"):
        write_tree(str(tree), out.fileno(), ExportOptions())

