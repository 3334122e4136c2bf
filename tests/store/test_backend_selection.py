"""backend="auto", the store's whiteout format, an existing Docker root, and overlay options
that keep a mounted layer's upper dir a valid diff."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

import aufs
from conftest import backend_unavailable

needs_overlay = pytest.mark.skipif(bool(backend_unavailable("overlay")),
                                   reason=str(backend_unavailable("overlay")))
needs_fuse = pytest.mark.skipif(bool(backend_unavailable("fuse-overlayfs")),
                                reason=str(backend_unavailable("fuse-overlayfs")))
HAS_AUFS = "aufs" in Path("/proc/filesystems").read_text()


@needs_overlay
def test_auto_on_a_new_root_takes_the_first_usable(scratch: Path) -> None:
    driver = aufs.Driver(scratch / "new")
    assert driver.backend == ("aufs" if HAS_AUFS else "overlay")
    assert driver.whiteout_format == driver.backend
    assert (scratch / "new" / "whiteout-format").read_text() == f"{driver.whiteout_format}\n"
    assert aufs.Driver(scratch / "new").backend == driver.backend


@needs_overlay
def test_an_overlay_store_stays_overlay(scratch: Path) -> None:
    aufs.Driver(scratch / "root", backend="overlay").create("1")
    assert aufs.Driver(scratch / "root").backend == "overlay"
    with pytest.raises(aufs.NotSupportedError, match="aufs cannot read"):
        aufs.Driver(scratch / "root", backend="aufs")


def make_docker_root(root: Path) -> None:
    """A root as Docker 20.10's aufs driver leaves it (reference notes §1.1): no marker, the
    kernel's .wh..wh.* entries in each branch, a whiteout and an opaque dir in the child."""
    for name in ("layers", "diff", "mnt"):
        (root / name).mkdir(parents=True, mode=0o710)
    base, child = "a" * 64, "b" * 64
    (root / "layers" / base).write_bytes(b"")
    (root / "layers" / child).write_bytes(f"{base}\n".encode())
    for layer in (base, child):
        (root / "diff" / layer).mkdir(mode=0o755)
        (root / "mnt" / layer).mkdir(mode=0o755)
        (root / "diff" / layer / ".wh..wh.aufs").touch()
        (root / "diff" / layer / ".wh..wh.plnk").mkdir()
        (root / "diff" / layer / ".wh..wh.orph").mkdir()
    lower = root / "diff" / base
    (lower / "etc").mkdir()
    (lower / "etc" / "hostname").write_text("base\n")
    (lower / "etc" / "gone").write_text("deleted by the child\n")
    (lower / "var" / "cache").mkdir(parents=True)
    (lower / "var" / "cache" / "old").write_text("hidden by the opaque dir\n")
    (lower / "bin").mkdir()
    os.symlink("busybox", lower / "bin" / "sh")
    upper = root / "diff" / child
    (upper / "etc").mkdir()
    (upper / "etc" / ".wh.gone").touch()
    (upper / "etc" / "hostname").write_text("child\n")
    (upper / "var" / "cache").mkdir(parents=True)
    (upper / "var" / "cache" / ".wh..wh..opq").touch()
    (upper / "var" / "cache" / "new").write_text("new\n")


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    entries = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory, name)
            info = path.lstat()
            content = path.read_text() if stat.S_ISREG(info.st_mode) else ""
            entries[str(path.relative_to(root))] = (info.st_mode, info.st_size, content)
    return entries


@needs_fuse
def test_existing_docker_root_opens_as_is_and_mounts_with_fuse(scratch: Path) -> None:
    root = scratch / "docker" / "aufs"
    make_docker_root(root)
    before = snapshot(root)
    driver = aufs.Driver(root)
    assert driver.backend == ("aufs" if HAS_AUFS else "fuse-overlayfs")
    assert driver.whiteout_format == "aufs"
    assert driver.status()[2] == ("Dirs", "2")
    assert snapshot(root) == before, "opening must not change a Docker root"
    if HAS_AUFS:
        pytest.skip("this kernel has aufs: the fuse-overlayfs path is not the one taken")
    with driver.mounted("b" * 64) as merged:
        seen = sorted(str(p.relative_to(merged)) for p in Path(merged).rglob("*"))
        assert seen == ["bin", "bin/sh", "etc", "etc/hostname", "var", "var/cache",
                        "var/cache/new"]
        assert Path(merged, "etc", "hostname").read_text() == "child\n"
        assert os.readlink(Path(merged, "bin", "sh")) == "busybox"
    driver.cleanup()
    after = snapshot(root)
    added = set(after) - set(before)
    assert f"work/{'b' * 64}" in added  # fuse-overlayfs needs a work dir beside diff/
    assert all(path.split("/")[0] == "work" for path in added)
    assert {path: after[path] for path in before} == before


@needs_overlay
def test_kernel_overlay_refuses_an_aufs_store_and_names_the_way_out(scratch: Path) -> None:
    root = scratch / "docker" / "aufs"
    make_docker_root(root)
    with pytest.raises(aufs.NotSupportedError) as caught:
        aufs.Driver(root, backend="overlay")
    assert "fuse-overlayfs" in str(caught.value)
    assert "aufs migrate --to overlay" in str(caught.value)


def test_auto_with_nothing_usable_lists_every_reason(scratch: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root = scratch / "docker" / "aufs"
    make_docker_root(root)
    monkeypatch.setenv("PATH", "/nonexistent")  # hides the fuse-overlayfs binary
    if HAS_AUFS:
        pytest.skip("this kernel has aufs")
    with pytest.raises(aufs.NotSupportedError) as caught:
        aufs.Driver(root)
    message = str(caught.value)
    assert "aufs: AUFS was not found in /proc/filesystems" in message
    assert "fuse-overlayfs: fuse-overlayfs is not installed" in message


def test_unknown_backend_and_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown backend 'zfs'"):
        aufs.Driver(tmp_path / "r", backend="zfs")
    with pytest.raises(ValueError, match="':'"):
        aufs.Driver(tmp_path / "a:b")
    with pytest.raises(ValueError, match="options"):
        aufs.Driver(tmp_path / "r", options=["aufs.mountopt=x"])


@needs_overlay
def test_renaming_a_lower_dir_keeps_the_upper_a_valid_diff(scratch: Path) -> None:
    driver = aufs.Driver(scratch / "root", backend="overlay")
    driver.create("base")
    tree = Path(driver.store.diff_path("base"), "old")
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_text("content")
    driver.create("child", "base")
    with driver.mounted("child") as merged:
        # redirect_dir=off: the kernel refuses the rename (EXDEV), mv copies the tree up
        with pytest.raises(OSError) as caught:
            os.rename(Path(merged, "old"), Path(merged, "new"))
        assert caught.value.errno == 18  # EXDEV
        shutil.move(Path(merged, "old"), Path(merged, "new"))
        assert Path(merged, "new", "sub", "file").read_text() == "content"
    upper = Path(driver.store.diff_path("child"))
    assert (upper / "new" / "sub" / "file").read_text() == "content"
    whiteout = (upper / "old").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    for path in [upper, *upper.rglob("*")]:
        assert not [name for name in os.listxattr(path, follow_symlinks=False)
                    if name.startswith("trusted.overlay.redirect")]
    driver.cleanup()


@needs_overlay
def test_classic_lowerdir_fallback_for_kernels_before_6_7(scratch: Path) -> None:
    """Before Linux 6.7 there is no lowerdir+: one page of `lowerdir=` data. Short links
    (l/<26 chars>, relative to the root) fit Docker-length chains far beyond the 44 layers
    of full paths; past a page the error says why."""
    backend = aufs.OverlayBackend(lowerdir_append=False)
    driver = aufs.Driver(scratch / "classic", backend=backend)
    parent = ""
    for index in range(150):
        layer = f"{index:03d}" + "f" * 61  # Docker-length ids
        driver.create(layer, parent)
        Path(driver.store.diff_path(layer), f"file{index}").touch()
        parent = layer
    deep = "100" + "f" * 61  # 100 parents: over a page as full paths, under it as links
    with driver.mounted(deep) as path:
        assert len(os.listdir(path)) == 101
    with pytest.raises(aufs.MountError, match="lowerdir\\+") as caught:
        driver.get(parent)
    assert caught.value.data.startswith("lowerdir=")
    driver.cleanup()
