"""Untrusted archives: nothing outside the layer is created, changed or deleted, every refusal
is a DiffError naming the entry, and a failed apply leaves the layer exactly as it was."""

from __future__ import annotations

import io
import os
import stat
import sys
import tarfile
import types
from pathlib import Path

import pytest
from campaigns import fuzz

import aufs
from aufs.archive import beneath, extract
from conftest import IS_ROOT, Harness, holds_user_xattrs
from tarbuild import archive, directory, member, tree_snapshot


@pytest.fixture
def host(scratch: Path) -> Path:
    """A sentinel tree beside the store, which no archive may touch."""
    sentinel = scratch / "sentinel"
    (sentinel / "etc").mkdir(parents=True)
    (sentinel / "etc" / "passwd").write_text("root:x:0:0\n")
    (sentinel / "secret").write_text("do not touch\n")
    return scratch


@pytest.fixture
def layer(harness: Harness, host: Path) -> tuple[aufs.Driver, str]:
    driver = harness.driver(host / "store")
    driver.create("base")
    driver.apply_diff("base", "", io.BytesIO(archive([
        directory("keep"), member("keep/file", data=b"original")])))
    return driver, "base"


def apply_expecting_error(driver: aufs.Driver, layer_id: str, host: Path, data: bytes,
                          match: str, **kwargs: bool) -> aufs.DiffError:
    before = tree_snapshot(host, skip=[host / "store" / "staging"])
    with pytest.raises(aufs.DiffError, match=match) as caught:
        driver.apply_diff(layer_id, "", io.BytesIO(data), **kwargs)
    after = tree_snapshot(host, skip=[host / "store" / "staging"])
    assert after == before, "a refused archive changed something"
    assert os.listdir(host / "store" / "staging") == []
    return caught.value


SENTINEL = "sentinel/secret"


def test_dot_dot_names(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    error = apply_expecting_error(driver, layer_id, host, archive([
        member("ok", data=b"fine"), member("../../sentinel/pwned", data=b"x")]), "climbs out")
    assert "'../../sentinel/pwned'" in str(error)


def test_absolute_names(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, archive([
        member(f"{host}/sentinel/pwned", data=b"x")]), "absolute name")


def test_symlink_out_then_write_through_it(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, archive([
        member("evil", tarfile.SYMTYPE, linkname=str(host / "sentinel")),
        member("evil/secret", data=b"overwritten")]), "'evil/secret'")


def test_relative_symlink_out_is_clamped_inside(layer: tuple[aufs.Driver, str], host: Path
                                                ) -> None:
    # Documented safe result: ".." cannot climb above the layer, so this lands inside it.
    driver, layer_id = layer
    before = tree_snapshot(host / "sentinel")
    driver.apply_diff(layer_id, "", io.BytesIO(archive([
        member("up", tarfile.SYMTYPE, linkname="../../../../.."),
        member("up/landed", data=b"inside")])))
    assert Path(driver.store.diff_path(layer_id), "landed").read_bytes() == b"inside"
    assert tree_snapshot(host / "sentinel") == before


def test_absolute_symlink_then_file_below_it(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, archive([
        member("etc", tarfile.SYMTYPE, linkname="/etc"),
        member("etc/passwd", data=b"evil::0:0\n")]), "'etc/passwd'")


@pytest.mark.parametrize("target", ["/etc/shadow", "../x", "../../sentinel/secret"])
def test_hardlinks_pointing_out(layer: tuple[aufs.Driver, str], host: Path, target: str) -> None:
    driver, layer_id = layer
    error = apply_expecting_error(driver, layer_id, host, archive([
        member("h", tarfile.LNKTYPE, linkname=target)]), "hardlink target")
    assert "'h'" in str(error)


def test_hardlink_to_a_symlink_links_the_symlink(layer: tuple[aufs.Driver, str], host: Path
                                                 ) -> None:
    driver, layer_id = layer
    before = tree_snapshot(host / "sentinel")
    driver.apply_diff(layer_id, "", io.BytesIO(archive([
        member("lnk", tarfile.SYMTYPE, linkname=str(host / SENTINEL)),
        member("h", tarfile.LNKTYPE, linkname="lnk")])))
    branch = Path(driver.store.diff_path(layer_id))
    assert os.path.samestat(os.lstat(branch / "h"), os.lstat(branch / "lnk"))
    assert stat.S_ISLNK(os.lstat(branch / "h").st_mode)
    assert tree_snapshot(host / "sentinel") == before


def test_hardlink_to_missing_or_to_a_directory(layer: tuple[aufs.Driver, str], host: Path
                                               ) -> None:
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, archive([
        member("h", tarfile.LNKTYPE, linkname="nothing-here")]), "not in the layer")
    apply_expecting_error(driver, layer_id, host, archive([
        member("h", tarfile.LNKTYPE, linkname="keep")]), "'h'")


def test_root_turned_into_a_symlink(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, archive([
        member(".", tarfile.SYMTYPE, linkname=str(host / "sentinel"))]), "layer root")


def test_parent_dir_replaced_by_a_symlink(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, archive([
        directory("a"), member("a", tarfile.SYMTYPE, linkname=str(host / "sentinel")),
        member("a/secret", data=b"overwritten")]), "'a/secret'")


def test_without_openat2_a_symlink_is_refused_not_followed(
        layer: tuple[aufs.Driver, str], host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels before 5.6: directories are opened one component at a time, O_NOFOLLOW."""
    monkeypatch.setattr(beneath, "_has_openat2", False)
    driver, layer_id = layer
    driver.apply_diff(layer_id, "", io.BytesIO(archive([
        directory("a"), directory("a/b"), member("a/b/c", data=b"deep")])))
    assert Path(driver.store.diff_path(layer_id), "a/b/c").read_bytes() == b"deep"
    apply_expecting_error(driver, layer_id, host, archive([
        member("evil", tarfile.SYMTYPE, linkname=str(host / "sentinel")),
        member("evil/secret", data=b"overwritten")]), "'evil/secret'")
    assert beneath._has_openat2 is False  # the stepwise path is the one that ran


@pytest.mark.parametrize("name", [".wh..", ".wh...", ".wh.", "dir/.wh.."])
def test_whiteouts_naming_nothing(layer: tuple[aufs.Driver, str], host: Path, name: str) -> None:
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, archive([member(name)]), "names no entry")


def test_whiteout_under_a_symlinked_dir(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    before = tree_snapshot(host / "sentinel")
    try:
        driver.apply_diff(layer_id, "", io.BytesIO(archive([
            member("link", tarfile.SYMTYPE, linkname=str(host / "sentinel")),
            member("link/.wh.secret")])))
    except aufs.DiffError as error:
        assert "'link/.wh.secret'" in str(error)
    assert tree_snapshot(host / "sentinel") == before


def test_aufs_metadata_names_are_refused(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, archive([
        directory("d"), member("d/.wh..wh..opqX")]), "metadata")


@pytest.mark.skipif(not IS_ROOT, reason="creating device nodes needs CAP_MKNOD")
def test_device_nodes(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    null = archive([member("dev-null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)])
    driver.apply_diff(layer_id, "", io.BytesIO(null))
    info = os.lstat(Path(driver.store.diff_path(layer_id), "dev-null"))
    assert stat.S_ISCHR(info.st_mode) and os.major(info.st_rdev) == 1
    assert stat.S_IMODE(info.st_mode) == 0o666
    apply_expecting_error(driver, layer_id, host, archive([
        member("sda", tarfile.BLKTYPE, devmajor=8, devminor=0)]), "allow_devices=False",
        allow_devices=False)


def test_pax_size_contradicting_the_header(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, archive([
        member("liar", data=b"x" * 100, pax={"size": "5"})]), "contradicts")


def test_truncated_inside_data_and_inside_a_header(layer: tuple[aufs.Driver, str], host: Path
                                                   ) -> None:
    driver, layer_id = layer
    whole = archive([member("a", data=b"a" * 600), member("b", data=b"b" * 600)])
    apply_expecting_error(driver, layer_id, host, whole[:512 * 3 + 10], "ends inside")
    apply_expecting_error(driver, layer_id, host, whole[:512 * 3 + 200 + 512], "ends inside")


def test_missing_trailer_is_accepted_like_go(layer: tuple[aufs.Driver, str]) -> None:
    driver, layer_id = layer
    whole = archive([member("a", data=b"a" * 600)], tarfile.GNU_FORMAT)
    without_padding = whole[:512 + 600]  # umoci 0.4.7's layers end like this
    driver.apply_diff(layer_id, "", io.BytesIO(without_padding))
    assert Path(driver.store.diff_path(layer_id), "a").read_bytes() == b"a" * 600


def test_garbage_after_the_end_is_ignored(layer: tuple[aufs.Driver, str]) -> None:
    driver, layer_id = layer
    data = archive([member("a", data=b"ok")]) + b"\xde\xad" * 5000
    driver.apply_diff(layer_id, "", io.BytesIO(data))
    assert Path(driver.store.diff_path(layer_id), "a").read_bytes() == b"ok"


def test_not_a_tar_at_all(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, b"\x1f\x8b\x08" + bytes(600), "checksum")


def test_huge_pax_header(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, archive([
        member("big", pax={"comment": "x" * (2 << 20)})]), "extended header")


def test_ten_gigabyte_sparse_claim_stays_sparse(layer: tuple[aufs.Driver, str], tmp_path: Path
                                                ) -> None:
    # Documented safe result: holes stay holes, so the claim costs only the stored bytes.
    driver, layer_id = layer
    source = tmp_path / "sparse"
    with open(source, "wb") as handle:
        handle.truncate(10 << 30)
        handle.seek(5 << 30)
        handle.write(b"middle")
    tar_path = tmp_path / "sparse.tar"
    import subprocess

    subprocess.run(["tar", "--sparse", "--format=posix", "-cf", str(tar_path), "-C",
                    str(tmp_path), "sparse"], check=True)
    assert tar_path.stat().st_size < 1 << 20
    with open(tar_path, "rb") as stream:
        driver.apply_diff(layer_id, "", stream)
    extracted = Path(driver.store.diff_path(layer_id), "sparse")
    info = extracted.stat()
    assert info.st_size == 10 << 30
    assert info.st_blocks * 512 < 1 << 20
    with open(extracted, "rb") as handle:
        handle.seek(5 << 30)
        assert handle.read(6) == b"middle"


def test_path_longer_than_path_max(layer: tuple[aufs.Driver, str], host: Path) -> None:
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, archive([
        member("/".join(["d" * 200] * 25) + "/file", data=b"deep")]), "PATH_MAX")


def test_overlay_internal_xattrs_are_never_applied(layer: tuple[aufs.Driver, str]) -> None:
    driver, layer_id = layer
    driver.apply_diff(layer_id, "", io.BytesIO(archive([
        member("f", data=b"x", pax={"SCHILY.xattr.trusted.overlay.redirect": "/etc",
                                    "SCHILY.xattr.user.kept": "yes"})])))
    path = Path(driver.store.diff_path(layer_id), "f")
    names = os.listxattr(path)
    assert "trusted.overlay.redirect" not in names
    if holds_user_xattrs(path.parent):
        assert os.getxattr(path, "user.kept") == b"yes"


def test_failed_apply_keeps_the_layer_exactly(layer: tuple[aufs.Driver, str], host: Path
                                              ) -> None:
    driver, layer_id = layer
    branch = Path(driver.store.diff_path(layer_id))
    before = tree_snapshot(branch)
    apply_expecting_error(driver, layer_id, host, archive([
        member("keep/file", data=b"changed"), member("new", data=b"n"),
        member("../escape", data=b"x")]), "climbs out")
    assert tree_snapshot(branch) == before
    assert (branch / "keep" / "file").read_bytes() == b"original"


@pytest.mark.parametrize("pax", [{"uid": str(2**40)}, {"gid": "4294967295"},
                                 {"mtime": str(10**20)}])
def test_numbers_out_of_range_are_refused(layer: tuple[aufs.Driver, str], host: Path,
                                          pax: dict[str, str]) -> None:
    """Found by the fuzz campaign: these leaked OverflowError instead of DiffError."""
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, archive([member("f", data=b"x", pax=pax)]),
                          "out of range")


def test_negative_base256_owner_is_refused(layer: tuple[aufs.Driver, str], host: Path) -> None:
    data = bytearray(archive([member("f", data=b"x")], tarfile.GNU_FORMAT))
    data[116:124] = b"\xff" * 8  # gid -1 in GNU base-256
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[:512])
    driver, layer_id = layer
    apply_expecting_error(driver, layer_id, host, bytes(data), "gid -1 is out of range")


# ---- issue 16: removals, the directory cache, depth, threads --------------------------------


def diff_names(driver: aufs.Driver, layer_id: str) -> set[str]:
    with driver.diff(layer_id) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        return {info.name for info in tar}


@pytest.mark.parametrize("replacement", [member("d/e/x", data=b"now a file"),
                                         member("d/e/x", tarfile.SYMTYPE, linkname="elsewhere")],
                         ids=["file", "symlink"])
def test_nested_dir_replaced_by_a_file_or_a_symlink(
        layer: tuple[aufs.Driver, str], host: Path,
        replacement: tuple[tarfile.TarInfo, bytes]) -> None:
    """The removal once closed the parent's cached fd, then used it: EBADF (issue 16)."""
    driver, layer_id = layer
    before = tree_snapshot(host / "sentinel")
    driver.apply_diff(layer_id, "", io.BytesIO(archive([
        directory("d"), directory("d/e"), directory("d/e/x"),
        member("d/e/x/inner", data=b"inner")])))
    driver.apply_diff(layer_id, "", io.BytesIO(archive([
        replacement, member("d/e/after", data=b"after")])))
    branch = Path(driver.store.diff_path(layer_id))
    info = os.lstat(branch / "d/e/x")
    if replacement[0].issym():
        assert stat.S_ISLNK(info.st_mode) and os.readlink(branch / "d/e/x") == "elsewhere"
    else:
        assert (branch / "d/e/x").read_bytes() == b"now a file"
    assert (branch / "d/e/after").read_bytes() == b"after"
    assert tree_snapshot(host / "sentinel") == before


def test_whiteout_of_a_nested_dir(layer: tuple[aufs.Driver, str]) -> None:
    """On an overlay-format store the whiteout replaces the dir with a 0/0 device."""
    driver, layer_id = layer
    driver.apply_diff(layer_id, "", io.BytesIO(archive([
        directory("d"), directory("d/e"), directory("d/e/x"),
        member("d/e/x/inner", data=b"inner")])))
    driver.apply_diff(layer_id, "", io.BytesIO(archive([
        member("d/e/.wh.x"), member("d/e/kept", data=b"kept")])))
    branch = Path(driver.store.diff_path(layer_id))
    assert (branch / "d/e/kept").read_bytes() == b"kept"
    if driver.whiteout_format == "overlay":
        info = os.lstat(branch / "d/e/x")
        assert stat.S_ISCHR(info.st_mode) and info.st_rdev == 0
        names = diff_names(driver, layer_id)
        assert "d/e/.wh.x" in names and "d/e/x/inner" not in names
    else:
        assert (branch / "d/e/.wh.x").is_file()  # AUFS format keeps whiteouts as files


NAIVE_BEFORE = [directory("usr"), directory("usr/share"), directory("usr/share/doc"),
                member("usr/share/doc/readme", data=b"r"), member("usr/share/man", data=b"m"),
                directory("usr/lib"), directory("usr/lib/old"),
                member("usr/lib/old/so", data=b"s")]
NAIVE_LAYER = [member("usr/share/.wh.doc"), directory("usr/lib"),
               member("usr/lib/.wh..wh..opq"), member("usr/lib/new", data=b"n")]


def check_naive_result(branch: Path) -> None:
    assert not (branch / "usr/share/doc").exists()
    assert (branch / "usr/share/man").read_bytes() == b"m"
    assert sorted(os.listdir(branch / "usr/lib")) == ["new"]
    assert not [name for _, dirs, files in os.walk(branch) for name in dirs + files
                if name.startswith(".wh.")]


def test_apply_mode_whiteout_and_opaque_below_the_top_level(tmp_path: Path) -> None:
    """The naive path's extraction (whiteouts delete): every whiteout below the top level
    once failed with EBADF (issue 16)."""
    extract.extract(io.BytesIO(archive(NAIVE_BEFORE)), str(tmp_path),
                    extract.ExtractOptions(extract.WhiteoutMode.LITERAL))
    extract.extract(io.BytesIO(archive(NAIVE_LAYER)), str(tmp_path),
                    extract.ExtractOptions(extract.WhiteoutMode.APPLY))
    check_naive_result(tmp_path)


def test_naive_path_whiteout_and_opaque_below_the_top_level(
        harness: Harness, layer: tuple[aufs.Driver, str]) -> None:
    """The same through the driver: a child layer applied without its parent."""
    harness.require_union()
    driver, layer_id = layer
    driver.create("child", layer_id)
    driver.apply_diff("child", layer_id, io.BytesIO(archive(NAIVE_BEFORE)))
    driver.apply_diff("child", "", io.BytesIO(archive(NAIVE_LAYER)))  # naive: not its parent
    with driver.mounted("child") as union:
        check_naive_result(Path(union))


def test_symlink_replaced_by_a_directory_is_entered(layer: tuple[aufs.Driver, str]) -> None:
    """Like GNU tar: once `a` is a directory, `a/g` lands in it, not in the old symlink's
    target (the directory cache kept `a` -> `t`)."""
    driver, layer_id = layer
    driver.apply_diff(layer_id, "", io.BytesIO(archive([
        directory("t"), member("a", tarfile.SYMTYPE, linkname="t"), member("a/f", data=b"f"),
        directory("a"), member("a/g", data=b"g")])))
    branch = Path(driver.store.diff_path(layer_id))
    assert stat.S_ISDIR(os.lstat(branch / "a").st_mode)
    assert os.listdir(branch / "a") == ["g"]
    assert sorted(os.listdir(branch / "t")) == ["f"]


def test_a_parent_fd_outlives_the_removal_below_it(tmp_path: Path) -> None:
    """The fd ownership rule: an fd open_dir gave stays open, on the same directory, until
    settle(); then what was retired is closed and nothing leaks."""
    (tmp_path / "d" / "e" / "x" / "y").mkdir(parents=True)
    (tmp_path / "s").mkdir()
    (tmp_path / "link").symlink_to("s")
    open_before = len(os.listdir("/proc/self/fd"))
    with beneath.BeneathRoot(str(tmp_path)) as tree:
        parent = tree.open_dir("d/e")
        below = tree.open_dir("d/e/x/y")
        through_link = tree.open_dir("link")
        assert tree.remove(parent, "d/e/x")
        assert os.path.samestat(os.fstat(parent), os.stat(tmp_path / "d/e"))
        os.mkdir("x", dir_fd=parent)  # the parent fd is still the parent
        os.fstat(below)  # retired, not closed: its number cannot be reused meanwhile
        assert tree.open_dir("d/e/x") != below
        assert tree.remove(tree.fd, "link")
        os.mkdir(tmp_path / "link")
        assert os.path.samestat(os.fstat(tree.open_dir("link")), os.stat(tmp_path / "link"))
        os.fstat(through_link)
        tree.settle()
        with pytest.raises(OSError):
            os.fstat(below)  # closed now (nothing else opened a file meanwhile)
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_a_thousand_components(layer: tuple[aufs.Driver, str]) -> None:
    """A 2,001-byte name of 1,000 directories once raised RecursionError: nothing on the way
    (create, replace, diff, changes, remove) may recurse on the depth."""
    driver, layer_id = layer
    deep = "/".join(["a"] * 1000)
    driver.apply_diff(layer_id, "", io.BytesIO(archive([member(deep + "/f", data=b"deep")])))
    branch = Path(driver.store.diff_path(layer_id))
    assert Path(branch, deep, "f").read_bytes() == b"deep"
    assert deep + "/f" in diff_names(driver, layer_id)
    assert aufs.Change("/" + deep + "/f", aufs.ChangeKind.ADD) in driver.changes(layer_id)
    driver.create("second")
    driver.apply_diff("second", "", io.BytesIO(archive([member(deep + "/g", data=b"g")])))
    driver.apply_diff("second", "", io.BytesIO(archive([member("a", data=b"flat now")])))
    assert Path(driver.store.diff_path("second"), "a").read_bytes() == b"flat now"
    driver.remove(layer_id)
    assert not branch.exists()


def test_a_thousand_components_within_a_small_fd_limit(tmp_path: Path) -> None:
    """Python starts with a soft limit of 1,024 open files (the AUFS guest's kernel gives
    1,024 soft, 4,096 hard), and a tree walk keeps a directory fd or two per level: the
    driver lifts the soft limit to the hard one, as Go does for dockerd, and diff keeps at
    most export.OPEN_LEVELS levels open."""
    import resource
    import subprocess

    script = f"""
import io, sys
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
import aufs
from tarbuild import archive, member
deep = "/".join(["a"] * 1000)
driver = aufs.Driver({str(tmp_path / "store")!r})
driver.create("deep")
driver.apply_diff("deep", "", io.BytesIO(archive([member(deep + "/f", data=b"x")])))
# a second archive unpacks into a clone of the layer: a walk of the whole depth
driver.apply_diff("deep", "", io.BytesIO(archive([member(deep + "/g", data=b"y")])))
with driver.diff("deep") as stream:
    data = stream.read()
assert (deep + "/f").encode() in data
driver.remove("deep")  # pytest's own clean-up of tmp dirs recurses on the depth
print("ok")
"""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_a_thousand_components_with_whiteouts(tmp_path: Path) -> None:
    """The naive path's opaque prune and whiteouts walk the depth without recursion."""
    deep = "/".join(["a"] * 1000)
    extract.extract(io.BytesIO(archive([member(deep + "/f", data=b"f")])), str(tmp_path),
                    extract.ExtractOptions(extract.WhiteoutMode.LITERAL))
    extract.extract(io.BytesIO(archive([member(deep + "/g", data=b"g"),
                                        member("a/.wh..wh..opq")])), str(tmp_path),
                    extract.ExtractOptions(extract.WhiteoutMode.APPLY))
    assert os.listdir(Path(tmp_path, deep)) == ["g"]
    extract.extract(io.BytesIO(archive([member(".wh.a")])), str(tmp_path),
                    extract.ExtractOptions(extract.WhiteoutMode.APPLY))
    assert os.listdir(tmp_path) == []


def test_two_appliers_and_a_differ_stay_in_their_layers(harness: Harness, host: Path) -> None:
    """Two threads apply removal-heavy archives (fast and naive paths) to their own layers
    while a third reads another layer's diff, on one driver. A reused fd number once let one
    layer's archive delete and write inside another, committed layer (issue 16)."""
    driver = harness.driver(host / "store")
    try:
        result = fuzz.race_appliers_and_differ(driver, host / "sentinel", rounds=6, seed=1)
    finally:
        driver.cleanup()
    assert result.violations == []
    assert result.applied >= 12 and result.diffs >= 1


# ---- issue 16: sparse maps and header types -------------------------------------------------


def sparse_1_0(name: str, segments: list[tuple[int, int]], realsize: int,
               count: int | None = None, data: bytes | None = None) -> bytes:
    """A GNU sparse 1.0 member (tar --sparse --format=posix): the map opens the data."""
    numbers = [len(segments) if count is None else count]
    for offset, length in segments:
        numbers += [offset, length]
    sparse_map = b"".join(b"%d\n" % number for number in numbers)
    sparse_map += bytes(-len(sparse_map) % 512)
    stored = data if data is not None else b"x" * sum(length for _, length in segments)
    return archive([member("GNUSparseFile.0/" + name, data=sparse_map + stored, pax={
        "GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(realsize)})])


def archive_lines_run(data: bytes, target: Path) -> int:
    """Unpacks data and counts the Python lines run in aufs/archive/ meanwhile: a measure
    of work that does not depend on the machine's speed."""
    lines = 0

    def local(frame: object, event: str, argument: object) -> object:
        nonlocal lines
        if event == "line":
            lines += 1
        return local

    def calls(frame: types.FrameType, event: str, argument: object) -> object:
        return local if "/aufs/archive/" in frame.f_code.co_filename else None

    sys.settrace(calls)
    try:
        extract.extract(io.BytesIO(data), str(target),
                        extract.ExtractOptions(extract.WhiteoutMode.LITERAL))
    finally:
        sys.settrace(None)
    return lines


def test_sparse_map_is_parsed_once(tmp_path: Path) -> None:
    """The GNU 1.0 map was parsed again after every block: ten 1 MiB maps took 194 s. The
    work must grow with the map's size, not with its square: 4 times the segments, at most
    6 times the lines of Python (it was 16 times)."""
    work = []
    for count in (5_000, 20_000):
        segments = [(2 * index, 1) for index in range(count)]
        target = tmp_path / str(count)
        target.mkdir()
        work.append(archive_lines_run(sparse_1_0("f", segments, 2 * count), target))
        content = (target / "f").read_bytes()
        assert len(content) == 2 * count and content[::2] == b"x" * count
        assert not content[1::2].strip(b"\0")
    assert work[1] < 6 * work[0], f"{work[0]} then {work[1]} lines of Python"


@pytest.mark.parametrize("count, segments, match", [
    (10**12, [(0, 1)], "map of 1000000000000 segments is longer than 513 bytes"),
    (None, [(10**15 + index, 1) for index in range(70_000)], "map longer than 1048576 bytes"),
])
def test_sparse_map_size_is_capped(layer: tuple[aufs.Driver, str], host: Path,
                                   count: int | None, segments: list[tuple[int, int]],
                                   match: str) -> None:
    driver, layer_id = layer
    error = apply_expecting_error(driver, layer_id, host, sparse_1_0(
        "f", segments, 10**16, count=count, data=b"x"), match)
    assert "entry 'f'" in str(error)


def test_sparse_typeflag_with_ustar_magic(layer: tuple[aufs.Driver, str], host: Path) -> None:
    """Typeflag S in a ustar header with byte 482 set once raised a bare AssertionError
    (AttributeError under python -O)."""
    from aufs.archive.format import TarHeader, build_header

    block = bytearray(build_header(TarHeader(name="sparse", typeflag=b"S", size=0)))
    block[482] = 1
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    driver, layer_id = layer
    error = apply_expecting_error(driver, layer_id, host, bytes(block) + bytes(1024),
                                  "without the GNU magic")
    assert "sparse" in str(error)
