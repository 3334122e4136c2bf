"""Untrusted archives: nothing outside the layer is created, changed or deleted, every refusal
is a DiffError naming the entry, and a failed apply leaves the layer exactly as it was."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

import aufs
from aufs.archive import beneath
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
