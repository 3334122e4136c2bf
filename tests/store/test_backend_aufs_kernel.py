"""The aufs backend on a real aufs (the kernel in tests/guest): what the kernel does with our
mount data, and the fixes for where it disagreed. CI runs these with `pytest -m aufs_kernel`
inside tests/guest/run; on kernels without aufs they are skipped.

The whole driver suite also runs on this backend (the "aufs" harness in conftest.py)."""

from __future__ import annotations

import errno
import glob
import io
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import aufs
import tarbuild
from aufs.store.backends.aufs import AUFS_BRANCH_MAX
from conftest import backend_unavailable, requires_aufs
from dockerroot import build_docker_root
from tarbuild import tree_snapshot

pytestmark = [requires_aufs, pytest.mark.aufs_kernel]

AUFS_METADATA = (".wh..wh.aufs", ".wh..wh.plnk", ".wh..wh.orph")


def mount_options(target: str) -> tuple[str, str]:
    """(mount options, super options) of the mount at target, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            if fields[4] == target:
                after = fields[fields.index("-") + 1:]
                return fields[5], after[2]
    raise AssertionError(f"{target} is not mounted")


def sysfs(target: str) -> str:
    """/sys/fs/aufs/si_<id> of the aufs mounted at target."""
    _, options = mount_options(target)
    si = next(option.split("=", 1)[1] for option in options.split(",")
              if option.startswith("si="))
    return f"/sys/fs/aufs/si_{si}"


def branches(target: str) -> list[str]:
    """The branches of the aufs mounted at target, as aufs lists them: "path=perm", top first."""
    directory = sysfs(target)
    count = len(glob.glob(f"{directory}/br[0-9]*"))
    return [Path(directory, f"br{index}").read_text().strip() for index in range(count)]


def chain(driver: aufs.Driver, length: int, prefix: str = "l") -> list[str]:
    """length layers, each on the previous one; returns their ids, base first."""
    ids, parent = [], ""
    for index in range(length):
        layer = f"{prefix}{index}"
        driver.create(layer, parent)
        Path(driver.store.diff_path(layer), f"f{index}").write_text(str(index))
        ids.append(layer)
        parent = layer
    return ids


@pytest.fixture
def real(scratch: Path) -> Iterator[aufs.Driver]:
    driver = aufs.Driver(scratch / "r", backend="aufs")
    yield driver
    driver.cleanup()


# ---- the mount data the kernel takes ------------------------------------------------------------


def test_first_mount_and_appends_make_the_branches_in_order(real: aufs.Driver) -> None:
    """Docker-length paths: one br: mount and append: remounts (test_23's 40/38/38/9)."""
    long = "x" * 60
    ids = chain(real, 126, prefix=long)
    path = real.get(ids[-1])
    seen = branches(path)
    expected = [real.store.diff_path(ids[-1]) + "=rw"] + [
        real.store.diff_path(layer) + "=ro+wh" for layer in reversed(ids[:-1])]
    assert seen == expected
    assert sorted(os.listdir(path)) == sorted(f"f{index}" for index in range(126))
    real.put(ids[-1])


def test_short_paths_never_overflow_one_mount_call(real: aufs.Driver) -> None:
    """Disagreement: Docker sizes each mount(2) call in bytes, but aufs parses one call into a
    page of 85 options: with short paths a 127-branch chain went in one call, and the kernel
    answered E2BIG or oopsed. Now no call carries more than 64 branches."""
    ids = chain(real, AUFS_BRANCH_MAX)
    path = real.get(ids[-1])
    assert len(branches(path)) == AUFS_BRANCH_MAX
    assert Path(path, "f0").read_text() == "0"
    assert len(os.listdir(path)) == AUFS_BRANCH_MAX
    real.put(ids[-1])


def test_a_chain_past_the_branch_limit_says_which_backends_can_mount_it(real: aufs.Driver
                                                                       ) -> None:
    ids = chain(real, AUFS_BRANCH_MAX + 1)
    with pytest.raises(aufs.MountError) as caught:
        real.get(ids[-1])
    message = str(caught.value)
    assert "at most 127" in message and "128 aufs branches" in message
    assert "fuse-overlayfs" in message and "overlay" in message and "500" in message
    assert caught.value.errno == errno.ENOSPC
    assert not aufs.is_mountpoint(real.store.mount_path(ids[-1]))
    assert real.status()[-1] == ("Layers Held", "0")


def test_the_kernel_refuses_the_128th_branch() -> None:
    """What the limit check stands in for: aufs itself stops at 127 with ENOSPC."""
    with pytest.raises(OSError) as caught:
        _mount_by_appends(AUFS_BRANCH_MAX + 1)
    assert caught.value.errno == errno.ENOSPC


def _mount_by_appends(count: int) -> None:
    base = Path("/dev/shm/aufs-limit")
    base.mkdir(exist_ok=True)
    aufs.mount("tmpfs", base, "tmpfs", 0, "size=1m")
    try:
        for index in range(count):
            (base / str(index)).mkdir()
        (base / "m").mkdir()
        aufs.mount("none", base / "m", "aufs", 0, f"br:{base}/0=rw,xino=/dev/shm/aufs.xino")
        try:
            for index in range(1, count):
                aufs.mount("none", base / "m", "aufs", 0x20, f"append:{base}/{index}=ro+wh")
        finally:
            aufs.unmount(base / "m", 2)
    finally:
        aufs.unmount(base, 2)
        base.rmdir()


def test_dirperm1_is_detected_and_used(real: aufs.Driver) -> None:
    assert real.status()[3] == ("Dirperm1 Supported", "true")
    ids = chain(real, 2)
    path = real.get(ids[-1])
    _, super_options = mount_options(path)
    assert "dirperm1" in super_options.split(",")
    real.put(ids[-1])


def test_xino_lives_in_dev_shm_and_parallel_mounts_share_it(real: aufs.Driver) -> None:
    ids = chain(real, 1)
    for index in range(8):
        real.create(f"c{index}", ids[0])
    failures: list[BaseException] = []

    def get_put(layer: str) -> None:
        try:
            for _ in range(3):
                real.get(layer)
                real.put(layer)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=get_put, args=(f"c{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    path = real.get("c0")
    assert Path(sysfs(path), "xi_path").read_text().strip() == "/dev/shm/aufs.xino"
    assert not os.path.exists(os.path.join(real.store.diff_path("c0"), ".aufs.xino"))
    real.put("c0")


# ---- what aufs leaves in a branch, and what the diffs make of it -------------------------------


def test_diff_changes_and_size_skip_what_aufs_leaves_in_the_branch(real: aufs.Driver) -> None:
    real.create("base")
    real.apply_diff("base", "", io.BytesIO(tarbuild.archive([
        tarbuild.member("kept", data=b"k"), tarbuild.member("gone", data=b"g")])))
    real.create("top", "base")
    with real.mounted("top") as path:
        Path(path, "new").write_bytes(b"12345")
        os.remove(os.path.join(path, "gone"))
        os.link(os.path.join(path, "kept"), os.path.join(path, "kept-link"))  # a pseudo-link
    branch = Path(real.store.diff_path("top"))
    left = sorted(name for name in os.listdir(branch) if name.startswith(".wh..wh."))
    assert left == sorted(AUFS_METADATA), "aufs leaves its metadata in the rw branch"
    # without an auplink flush, "kept" stays a pseudo-link: its copy-up lives in .wh..wh.plnk
    # (the same inode as kept-link), and only kept-link has a name in the branch
    assert os.stat(branch / "kept-link").st_nlink == 2
    with real.diff("top", "base") as stream:
        names = tarbuild_names(stream.read())
    assert sorted(names) == [".wh.gone", "kept-link", "new"]
    changes = sorted(str(change) for change in real.changes("top", "base"))
    assert changes == ["A /kept-link", "A /new", "D /gone"]
    assert real.diff_size("top", "base") == 5 + 1  # new and kept-link; the plnk copy not again


def tarbuild_names(data: bytes) -> list[str]:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


def test_rename_inside_a_mounted_layer(real: aufs.Driver) -> None:
    """aufs copies a renamed lower file up and whites out its old name; a lower directory
    cannot be renamed without dirren (EXDEV), so tools copy it."""
    real.create("base")
    real.apply_diff("base", "", io.BytesIO(tarbuild.archive([
        tarbuild.member("old", data=b"content"), tarbuild.directory("dir"),
        tarbuild.member("dir/inner", data=b"i")])))
    real.create("top", "base")
    with real.mounted("top") as path:
        os.rename(os.path.join(path, "old"), os.path.join(path, "new"))
        with pytest.raises(OSError) as caught:
            os.rename(os.path.join(path, "dir"), os.path.join(path, "moved"))
        assert caught.value.errno == errno.EXDEV
        assert sorted(os.listdir(path)) == ["dir", "new"]
    branch = Path(real.store.diff_path("top"))
    assert (branch / "new").read_bytes() == b"content"
    assert (branch / ".wh.old").is_file()
    with real.diff("top", "base") as stream:
        assert sorted(tarbuild_names(stream.read())) == [".wh.old", "new"]
    assert {str(c) for c in real.changes("top", "base")} == {"A /new", "D /old"}


# ---- unmounting ----------------------------------------------------------------------------------


def test_busy_unmount_keeps_the_layer_then_force_detaches(
        real: aufs.Driver, caplog: pytest.LogCaptureFixture) -> None:
    real.retry_policy = aufs.RetryPolicy(unmount_attempts=3, unmount_delay=0.01)
    ids = chain(real, 2)
    path = real.get(ids[-1])
    with open(os.path.join(path, "f0")) as holder:
        with caplog.at_level(logging.DEBUG, logger="aufs"), pytest.raises(
                aufs.UnmountBusyError) as caught:
            real.put(ids[-1])
        assert caught.value.errno == errno.EBUSY and caught.value.target == path
        assert aufs.is_mountpoint(path)
        real.remove(ids[-1], force=True)
        assert not real.exists(ids[-1])
        assert not os.path.lexists(path)  # detached, and its mount point removed
        assert holder.read() == "0"  # the lazily detached mount still serves its user


def test_auplink_flush_runs_from_path_before_the_unmount(
        real: aufs.Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 12 packages no auplink: the flush is optional; a stub on PATH records it."""
    log = tmp_path / "auplink.log"
    stub = tmp_path / "bin" / "auplink"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@ $(grep -c " $1 aufs " /proc/mounts)" >> {log}\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")
    driver = aufs.Driver(real.root, backend=aufs.AufsBackend())
    ids = chain(driver, 2)
    path = driver.get(ids[-1])
    driver.put(ids[-1])
    assert log.read_text().splitlines() == [f"{path} flush 1"]  # flushed while still mounted
    assert not aufs.is_mountpoint(path)


# ---- a root Docker made -------------------------------------------------------------------------


@pytest.mark.skipif(bool(backend_unavailable("fuse-overlayfs")),
                    reason=str(backend_unavailable("fuse-overlayfs")))
def test_a_docker_made_root_shows_the_same_trees_as_through_fuse_overlayfs(scratch: Path
                                                                          ) -> None:
    """Docker 20.10's aufs root (built from the fixtures as the rescue tests do): every layer
    mounts on the real aufs and merges to the tree fuse-overlayfs shows."""
    docker_root = build_docker_root(scratch / "docker")
    trees: dict[str, dict[str, dict[str, tuple[object, ...]]]] = {}
    for backend in ("aufs", "fuse-overlayfs"):
        driver = aufs.Driver(docker_root / "aufs", backend=backend)
        assert driver.backend == backend
        trees[backend] = {}
        try:
            for layer in driver.layer_ids():
                with driver.mounted(layer) as path:
                    trees[backend][layer] = comparable(tree_snapshot(Path(path)))
        finally:
            driver.cleanup()
    assert len(trees["aufs"]) == len(list((docker_root / "aufs" / "layers").iterdir())) >= 4
    assert any(len(tree) > 3 for tree in trees["aufs"].values())
    assert trees["aufs"] == trees["fuse-overlayfs"]


def comparable(snapshot: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    """The snapshot with each hardlink group named by its first member in sorted order (the
    walk order of two filesystems may differ)."""
    members: dict[object, list[str]] = {}
    for name, entry in snapshot.items():
        if entry[-1] is not None:
            members.setdefault(entry[-1], []).append(name)
    return {name: (*entry[:-1], min(members[entry[-1]]) if entry[-1] is not None else None)
            for name, entry in snapshot.items()}
