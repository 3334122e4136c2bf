"""mount, unmount, statfs magic and the mount-root test, against real tmpfs and overlay mounts."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import aufs
from aufs import FsMagic
from conftest import kernel_has_filesystem, requires_root

MS_BIND = 0x1000
MNT_DETACH = 0x2

pytestmark = requires_root


def test_fs_magic_table_is_dockers() -> None:
    assert len(FsMagic) == 21
    assert FsMagic.AUFS == 0x61756673
    assert FsMagic.BTRFS == 0x9123683E
    assert FsMagic.OVERLAY == 0x794C7630
    assert aufs.backing_fs_name(FsMagic.EXTFS) == "extfs"
    assert aufs.backing_fs_name(FsMagic.OVERLAY) == "overlayfs"
    assert aufs.backing_fs_name(0x1234) == "<unknown>"


def test_tmpfs_mount_magic_and_mountpoint(impl: ModuleType, tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    target.mkdir()
    assert not impl.is_mountpoint(target)
    impl.mount("tmpfs", target, "tmpfs", 0, "size=1m")
    try:
        (target / "inside").mkdir()
        assert impl.fs_magic(target) == FsMagic.TMPFS
        assert impl.is_mountpoint(target)
        # Docker's rule looks at f_type only, so a folder inside the mount also "is mounted";
        # is_mountpoint is the real test.
        assert impl.mounted(FsMagic.TMPFS, target / "inside")
        assert not impl.is_mountpoint(target / "inside")
        assert not impl.mounted(FsMagic.AUFS, target)
    finally:
        impl.unmount(target)
    assert not impl.is_mountpoint(target)
    assert impl.fs_magic(target) == aufs.fs_magic(tmp_path)


def test_bind_mount_on_same_filesystem_is_a_mountpoint(impl: ModuleType, tmp_path: Path) -> None:
    # st_dev is the same on both sides of a bind mount; only the mount-root test sees it.
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    impl.mount(source, target, None, MS_BIND, None)
    try:
        assert os.stat(target).st_dev == os.stat(tmp_path).st_dev
        assert impl.is_mountpoint(target)
    finally:
        impl.unmount(target, MNT_DETACH)


def test_symlink_to_mountpoint_is_not_one(impl: ModuleType, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("/proc")
    assert impl.is_mountpoint("/proc")
    assert not impl.is_mountpoint(link)


def test_errors_carry_errno_and_path(impl: ModuleType, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as caught:
        impl.mount("tmpfs", missing, "tmpfs", 0, "")
    assert caught.value.filename == missing
    with pytest.raises(OSError) as not_mounted:
        impl.unmount(tmp_path)
    assert not_mounted.value.errno == errno.EINVAL
    assert not_mounted.value.filename == tmp_path
    with pytest.raises(FileNotFoundError):
        impl.fs_magic(missing)
    with pytest.raises(FileNotFoundError):
        impl.is_mountpoint(missing)
    assert impl.mounted(FsMagic.TMPFS, missing) is False
    with pytest.raises(OSError) as unknown:
        impl.mount("none", tmp_path, "no-such-fs", 0, "")
    assert unknown.value.errno == errno.ENODEV
    with pytest.raises(ValueError):
        impl.fs_magic("/tm\0p")


@pytest.mark.skipif(not kernel_has_filesystem("overlay"), reason="kernel has no overlayfs")
def test_classic_overlay_mount(impl: ModuleType, tmp_path: Path) -> None:
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for directory in (lower, upper, work, merged):
        directory.mkdir()
    (lower / "from-lower").write_text("lower")
    impl.mount("overlay", merged, "overlay", 0,
               f"lowerdir={lower},upperdir={upper},workdir={work}")
    try:
        assert impl.fs_magic(merged) == FsMagic.OVERLAY
        assert impl.is_mountpoint(merged)
        (merged / "new").write_text("upper")
        assert (merged / "from-lower").read_text() == "lower"
    finally:
        impl.unmount(merged)
    assert (upper / "new").read_text() == "upper"


@pytest.mark.skipif(not kernel_has_filesystem("overlay"), reason="kernel has no overlayfs")
def test_fsmount_overlay_with_lowerdir_plus(impl: ModuleType, tmp_path: Path) -> None:
    # "lowerdir+" (Linux 6.7) adds one layer per fsconfig call, so no page limit applies.
    lowers = []
    for index in range(3):
        lower = tmp_path / f"lower{index}"
        lower.mkdir()
        (lower / f"file{index}").write_text(str(index))
        (lower / "shadowed").write_text(str(index))
        lowers.append(lower)
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for directory in (upper, work, merged):
        directory.mkdir()
    options = [("lowerdir+", str(lower)) for lower in lowers]
    options += [("upperdir", str(upper)), ("workdir", str(work))]
    try:
        impl.fsmount("overlay", merged, options, source="aufs-test")
    except OSError as error:
        if error.errno == errno.ENOSYS:
            pytest.skip("kernel lacks the new mount API")
        if "lowerdir+" in str(error):
            pytest.skip(f"kernel overlayfs predates lowerdir+ (Linux 6.7): {error}")
        raise
    try:
        assert impl.is_mountpoint(merged)
        assert sorted(os.listdir(merged)) == ["file0", "file1", "file2", "shadowed"]
        assert (merged / "shadowed").read_text() == "0"  # the first lowerdir+ is on top
    finally:
        impl.unmount(merged)


@pytest.mark.skipif(not kernel_has_filesystem("overlay"), reason="kernel has no overlayfs")
def test_fsmount_error_carries_kernel_message(impl: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(OSError) as caught:
        impl.fsmount("overlay", tmp_path, [("no-such-option", "x")])
    assert caught.value.errno == errno.EINVAL
    assert "no-such-option" in str(caught.value)
    assert caught.value.filename == tmp_path


# mount_from alone in a fresh interpreter (one thread: pytest may have started more), or with
# a second thread alive, which shares the working directory
_MOUNT_FROM = """
import json, os, sys, threading
from aufs import _fallback
impl = _fallback if sys.argv[1] == "fallback" else __import__("aufs._native").__dict__["_native"]
home, target, data, cwd, threads = sys.argv[2:7]
os.chdir(cwd)
release = threading.Event()
others = [threading.Thread(target=release.wait) for _ in range(int(threads))]
for other in others:
    other.start()
outcome = {"threads": os.stat("/proc/self/task").st_nlink - 2}
try:
    outcome["refused"] = impl.mount_from(home, "overlay", target, "overlay", 0, data)
except OSError as error:
    outcome.update(errno=error.errno, filename=error.filename)
outcome["cwd"] = os.getcwd()
release.set()
print(json.dumps(outcome))
"""


def mount_from_in_child(impl: ModuleType, home: Path, target: Path, data: str, cwd: Path,
                        threads: int) -> dict[str, Any]:
    """What mount_from did in a fresh interpreter with `threads` more threads alive."""
    found = subprocess.run(
        [sys.executable, "-c", _MOUNT_FROM, impl.IMPLEMENTATION, str(home), str(target), data,
         str(cwd), str(threads)], capture_output=True, text=True, check=True)
    outcome = dict(json.loads(found.stdout))
    assert outcome.pop("threads") == 1 + threads
    return outcome


@pytest.mark.skipif(not kernel_has_filesystem("overlay"), reason="kernel has no overlayfs")
@pytest.mark.parametrize("threads", [0, 1], ids=["alone", "beside-a-thread"])
def test_mount_from_resolves_relative_lowers_and_leaves_the_cwd(
        impl: ModuleType, tmp_path: Path, threads: int) -> None:
    home, elsewhere, merged = tmp_path / "home", tmp_path / "elsewhere", tmp_path / "merged"
    for directory in (home / "l" / "a", home / "l" / "b", home / "upper", home / "work",
                      elsewhere, merged):
        directory.mkdir(parents=True)
    (home / "l" / "a" / "top").write_text("a")
    (home / "l" / "b" / "bottom").write_text("b")
    data = "lowerdir=l/a:l/b,upperdir=upper,workdir=work"
    outcome = mount_from_in_child(impl, home, merged, data, elsewhere, threads)
    try:
        assert outcome == {"refused": 0, "cwd": str(elsewhere)}
        assert impl.is_mountpoint(merged)
        assert sorted(os.listdir(merged)) == ["bottom", "top"]
    finally:
        if impl.is_mountpoint(merged):
            impl.unmount(merged)


@pytest.mark.skipif(not kernel_has_filesystem("overlay"), reason="kernel has no overlayfs")
@pytest.mark.parametrize("threads", [0, 1], ids=["alone", "beside-a-thread"])
def test_mount_from_failures_name_the_step_and_leave_the_cwd(
        impl: ModuleType, tmp_path: Path, threads: int) -> None:
    merged = tmp_path / "merged"
    merged.mkdir()
    missing_home = mount_from_in_child(impl, tmp_path / "gone", merged, "lowerdir=x", tmp_path,
                                       threads)
    assert missing_home == {"errno": errno.ENOENT, "filename": str(tmp_path / "gone"),
                            "cwd": str(tmp_path)}
    missing_lower = mount_from_in_child(impl, tmp_path, merged, "lowerdir=no/such:dir",
                                        tmp_path, threads)
    assert missing_lower == {"errno": errno.ENOENT, "filename": str(merged),
                             "cwd": str(tmp_path)}
    assert not impl.is_mountpoint(merged)


def test_mount_from_beside_other_threads_never_moves_their_cwd(impl: ModuleType,
                                                               tmp_path: Path) -> None:
    """A thread that reads the working directory all along never sees it move."""
    before = os.getcwd()
    seen: set[str] = set()
    release = threading.Event()

    def watch() -> None:
        while not release.is_set():
            seen.add(os.getcwd())

    other = threading.Thread(target=watch)
    other.start()
    try:
        for index in range(20):
            target = tmp_path / f"mnt{index}"
            target.mkdir()
            assert impl.mount_from(tmp_path, "tmpfs", target.name, "tmpfs", 0, "size=1m") == 0
            assert impl.is_mountpoint(target)  # the relative target was resolved from tmp_path
            impl.unmount(target)
    finally:
        release.set()
        other.join()
    assert seen == {before} and os.getcwd() == before


def test_mount_from_serves_many_threads_at_once(impl: ModuleType, tmp_path: Path) -> None:
    """Eight threads mount at the same time, each from its own directory: every mount lands
    where its own directory says."""
    homes = [tmp_path / f"home{index}" for index in range(8)]
    errors: list[BaseException] = []

    def mount_some(home: Path) -> None:
        try:
            for round_number in range(10):
                (home / f"mnt{round_number}").mkdir(parents=True)
                impl.mount_from(home, "tmpfs", f"mnt{round_number}", "tmpfs", 0, "size=1m")
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=mount_some, args=(home,)) for home in homes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        for home in homes:
            assert all(impl.is_mountpoint(home / f"mnt{index}") for index in range(10))
    finally:
        for home in homes:
            for index in range(10):
                if impl.is_mountpoint(home / f"mnt{index}"):
                    impl.unmount(home / f"mnt{index}")


_FORKED_MOUNT_FROM = """
import os, sys, threading
from aufs import _fallback
impl = _fallback if sys.argv[1] == "fallback" else __import__("aufs._native").__dict__["_native"]
home = sys.argv[2]
release = threading.Event()
threading.Thread(target=release.wait, daemon=True).start()  # the worker serves the parent
assert impl.mount_from(home, "tmpfs", "parent", "tmpfs", 0, "size=1m") == 0
pid = os.fork()
if pid == 0:  # one thread here, then two: in place, then on a worker of the child's own
    code = impl.mount_from(home, "tmpfs", "alone", "tmpfs", 0, "size=1m")
    threading.Thread(target=release.wait, daemon=True).start()
    code += impl.mount_from(home, "tmpfs", "beside", "tmpfs", 0, "size=1m")
    os._exit(code)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_mounts_from_a_directory_of_its_own_accord(impl: ModuleType,
                                                                  tmp_path: Path) -> None:
    """The parent's worker thread does not cross fork: the child must not wait for it."""
    for name in ("parent", "alone", "beside"):
        (tmp_path / name).mkdir()
    try:
        found = subprocess.run([sys.executable, "-c", _FORKED_MOUNT_FROM, impl.IMPLEMENTATION,
                                str(tmp_path)], capture_output=True, text=True, check=True,
                               timeout=60)
        assert found.stdout.strip() == "0"
        assert all(impl.is_mountpoint(tmp_path / name) for name in ("parent", "alone", "beside"))
    finally:
        for name in ("parent", "alone", "beside"):
            if impl.is_mountpoint(tmp_path / name):
                impl.unmount(tmp_path / name)
