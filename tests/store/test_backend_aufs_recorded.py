"""The aufs backend, whose kernel module this machine lacks: every mount(2) it would make is
recorded and checked exactly, along with Docker's detection rules and unmount policy."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import aufs
from aufs.machine import Kernel
from aufs.store.backends.aufs import probe_dirperm1
from aufs.store.mounters import MountCall
from conftest import IS_ROOT, tmpfs_mount

WITH_AUFS = Kernel(frozenset({"aufs", "ext4"}), False)
XINO = ",dio,xino=/dev/shm/aufs.xino"


def make(root: Path, recorder: aufs.RecordingMounter, **kwargs: object) -> aufs.Driver:
    options = {"kernel": WITH_AUFS, "dirperm1": False, "auplink": None, **kwargs}
    return aufs.Driver(root, backend=aufs.AufsBackend(recorder, **options))  # type: ignore[arg-type]


def test_get_and_put_make_exactly_dockers_calls(tmp_path: Path) -> None:
    recorder = aufs.RecordingMounter()
    driver = make(tmp_path / "r", recorder)
    root = driver.root
    for layer, parent in (("1", ""), ("2", "1"), ("3", "2")):
        driver.create(layer, parent)
    assert driver.get("1") == f"{root}/diff/1"
    assert recorder.calls == []  # a base layer is not mounted
    assert driver.get("3", "system_u:object_r:svirt_sandbox_file_t:s0:c1,c2") == f"{root}/mnt/3"
    driver.put("3")
    assert recorder.calls == [
        MountCall("mount", "none", f"{root}/mnt/3", "aufs", 0,
                  f"br:{root}/diff/3=rw:{root}/diff/2=ro+wh:{root}/diff/1=ro+wh{XINO}"
                  ',context="system_u:object_r:svirt_sandbox_file_t:s0:c1,c2"'),
        MountCall("unmount", None, f"{root}/mnt/3", None, 0, None),
    ]


def test_remount_failure_rolls_back_and_names_the_data(tmp_path: Path) -> None:
    recorder = aufs.RecordingMounter()
    driver = make(tmp_path / "r", recorder)
    parent = ""
    for index in range(60):
        driver.create(f"layer{index}-{'x' * 100}", parent)
        parent = f"layer{index}-{'x' * 100}"
    original = recorder.mount
    seen: list[int] = []

    def failing_remount(source: str | None, target: str, fstype: str | None, flags: int,
                        data: str | None) -> None:
        seen.append(flags)
        if flags:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM), target)
        original(source, target, fstype, flags, data)

    recorder.mount = failing_remount  # type: ignore[method-assign]
    with pytest.raises(aufs.MountError) as caught:
        driver.get(parent)
    assert seen == [0, 0x20]
    assert caught.value.errno == errno.ENOMEM
    assert caught.value.data.startswith("append:")
    assert recorder.calls[-1] == MountCall("unmount", None, driver.store.mount_path(parent),
                                           None, 2, None)  # lazy detach of the half mount
    assert driver.status()[-1] == ("Layers Held", "0")


def test_busy_unmount_retries_then_keeps_the_mount(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    recorder = aufs.RecordingMounter()
    driver = make(tmp_path / "r", recorder)
    driver.retry_policy = aufs.RetryPolicy(unmount_delay=0.001)
    driver.create("1")
    driver.create("2", "1")
    path = driver.get("2")
    recorder.fail_with["unmount"] = [errno.EBUSY] * 5
    with caplog.at_level(logging.DEBUG, logger="aufs"), pytest.raises(aufs.UnmountBusyError):
        driver.put("2")
    unmounts = [call.flags for call in recorder.calls if call.operation == "unmount"]
    assert unmounts == [0, 0, 0, 0, 0]
    assert [r.getMessage().split("(")[-1] for r in caplog.records if "retrying" in
            r.getMessage()] == ["retrying 1/4)", "retrying 2/4)", "retrying 3/4)",
                                "retrying 4/4)"]
    assert recorder.is_mounted(path)
    recorder.fail_with["unmount"] = [errno.EBUSY] * 5
    driver.remove("2", force=True)
    unmounts = [call.flags for call in recorder.calls if call.operation == "unmount"]
    assert unmounts[5:] == [0, 0, 0, 0, 0, 2]  # then MNT_DETACH
    assert not driver.exists("2")


def test_unmount_einval_means_not_mounted(tmp_path: Path) -> None:
    recorder = aufs.RecordingMounter()
    driver = make(tmp_path / "r", recorder)
    driver.create("1")
    driver.create("2", "1")
    driver.get("2")
    recorder.fail_with["unmount"] = [errno.EINVAL]
    driver.put("2")  # EINVAL: already gone, not an error
    assert [c.operation for c in recorder.calls] == ["mount", "unmount"]


def test_dirperm1_probe_runs_once_per_process(tmp_path: Path) -> None:
    recorder = aufs.RecordingMounter()
    first = make(tmp_path / "a", recorder, dirperm1=None)
    second = make(tmp_path / "b", recorder, dirperm1=None)
    assert first.status()[3] == ("Dirperm1 Supported", "true")
    assert second.status()[3] == ("Dirperm1 Supported", "true")
    probes = [c for c in recorder.calls if c.operation == "mount"]
    assert len(probes) == 1
    assert probes[0].fstype == "aufs" and probes[0].flags == 0
    assert str(probes[0].data).endswith(",dirperm1,xino=/dev/shm/aufs.xino")
    assert str(probes[0].data).startswith("br:") and "=rw" not in str(probes[0].data)
    assert recorder.calls[1].operation == "unmount" and recorder.calls[1].flags == 2
    second.create("1")
    second.create("2", "1")
    second.get("2")
    assert recorder.calls[-1].data == (
        f"br:{second.root}/diff/2=rw:{second.root}/diff/1=ro+wh{XINO},dirperm1")


def test_dirperm1_probe_failure_means_false() -> None:
    recorder = aufs.RecordingMounter(fail_with={"mount": [errno.EINVAL]})
    assert probe_dirperm1(recorder) is False
    assert probe_dirperm1(recorder) is False
    assert len(recorder.calls) == 1


def fake_auplink(tmp_path: Path, exit_codes: list[int]) -> tuple[str, Path]:
    """An auplink that exits with the given codes in turn and logs its arguments."""
    log = tmp_path / "auplink.log"
    codes = tmp_path / "codes"
    codes.write_text("\n".join(map(str, exit_codes)) + "\n")
    script = tmp_path / "auplink"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f"code=$(head -n1 {codes}); sed -i 1d {codes}\n"
        'echo "flush said $code" >&2\n'
        'exit "${code:-0}"\n'
    )
    script.chmod(0o755)
    return str(script), log


@pytest.mark.parametrize(
    ("exit_codes", "runs", "warned"),
    [([0], 1, False), ([22, 22, 0], 3, False), ([1], 1, True), ([22] * 10, 6, True)],
)
def test_auplink_flush_retries_only_exit_22(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, exit_codes: list[int], runs: int,
    warned: bool,
) -> None:
    auplink, log = fake_auplink(tmp_path, exit_codes)
    recorder = aufs.RecordingMounter()
    driver = make(tmp_path / "r", recorder, auplink=auplink)
    driver.create("1")
    driver.create("2", "1")
    path = driver.get("2")
    with caplog.at_level(logging.DEBUG, logger="aufs"):
        driver.put("2")
    assert log.read_text().splitlines() == [f"{path} flush"] * runs
    assert any(r.levelno == logging.WARNING and "auplink flush failed" in r.getMessage()
               for r in caplog.records) == warned
    assert not recorder.is_mounted(path)  # a failed flush never stops the unmount


# ---- Docker's feature detection ---------------------------------------------------------------


def test_aufs_missing_from_proc_filesystems(tmp_path: Path) -> None:
    backend = aufs.AufsBackend(aufs.RecordingMounter(), kernel=Kernel(frozenset({"ext4"}), False))
    with pytest.raises(aufs.NotSupportedError,
                       match="driver not supported: AUFS was not found in /proc/filesystems"):
        aufs.Driver(tmp_path / "r", backend=backend)
    assert not (tmp_path / "r").exists()  # refused before anything is created


def test_aufs_refused_in_a_user_namespace(tmp_path: Path) -> None:
    backend = aufs.AufsBackend(aufs.RecordingMounter(), kernel=Kernel(frozenset({"aufs"}), True))
    with pytest.raises(aufs.NotSupportedError, match="non-init user namespace"):
        aufs.Driver(tmp_path / "r", backend=backend)


def test_explicit_aufs_on_this_kernel_says_why(tmp_path: Path) -> None:
    if "aufs" in Path("/proc/filesystems").read_text():
        pytest.skip("this kernel has aufs")
    with pytest.raises(aufs.NotSupportedError, match="AUFS was not found"):
        aufs.Driver(tmp_path / "r", backend="aufs")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount a btrfs image")
@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None,
                    reason="mkfs.btrfs is not installed (apt-get install btrfs-progs)")
def test_aufs_refused_over_btrfs(scratch: Path) -> None:
    image = scratch / "btrfs.img"
    with open(image, "wb") as handle:
        handle.truncate(128 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    target = scratch / "btrfs"
    target.mkdir()
    try:
        aufs.mount(loop, target, "btrfs", 0, "")
        try:
            backend = aufs.AufsBackend(aufs.RecordingMounter(), kernel=WITH_AUFS)
            with pytest.raises(aufs.IncompatibleFSError) as caught:
                aufs.Driver(target / "aufs", backend=backend)
            assert str(caught.value) == (
                "backing file system is unsupported for this graph driver: "
                "aufs is not supported over btrfs")
            assert isinstance(caught.value, aufs.NotSupportedError)
        finally:
            aufs.unmount(target)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount")
def test_aufs_accepted_over_tmpfs_and_status_names_it(scratch: Path) -> None:
    with tmpfs_mount(scratch / "t", "1m") as mounted:
        driver = aufs.Driver(mounted / "aufs",
                             backend=aufs.AufsBackend(aufs.RecordingMounter(), kernel=WITH_AUFS,
                                                      dirperm1=False))
        assert driver.status()[1] == ("Backing Filesystem", "tmpfs")
        assert driver.backend == "aufs" and driver.whiteout_format == "aufs"


# ---- the real kernel's limits (tests/store/test_backend_aufs_kernel.py found them) ------------


def short_chain(driver: aufs.Driver, length: int) -> str:
    parent = ""
    for index in range(length):
        driver.create(f"l{index}", parent)
        parent = f"l{index}"
    return parent


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A root with short paths (/tmp/aXXXXXXXX/r): Docker's byte rule alone fits 127 there."""
    base = tempfile.mkdtemp(prefix="a", dir="/tmp")
    yield Path(base)
    shutil.rmtree(base)


def test_no_mount_call_carries_more_than_64_branches(short_root: Path) -> None:
    """aufs parses one call into a page of 85 options: short paths used to put all 127
    branches in the first call (E2BIG, or a kernel oops on Linux 6.1 + aufs6.1)."""
    recorder = aufs.RecordingMounter()
    driver = make(short_root / "r", recorder)
    top = short_chain(driver, 127)
    driver.get(top)
    calls = recorder.mount_calls()
    counts = [str(call.data).count("=r") for call in calls]
    assert counts == [64, 63]
    assert [call.flags for call in calls] == [0, 0x20]
    assert str(calls[0].data).endswith(f"/diff/l63=ro+wh{XINO}")
    assert str(calls[1].data).startswith(f"append:{driver.root}/diff/l62=ro+wh,")
    assert str(calls[1].data).endswith(f"append:{driver.root}/diff/l0=ro+wh,")


def test_a_chain_past_127_branches_is_refused_before_any_mount(short_root: Path) -> None:
    recorder = aufs.RecordingMounter()
    driver = make(short_root / "r", recorder)
    top = short_chain(driver, 128)
    with pytest.raises(aufs.MountError) as caught:
        driver.get(top)
    assert str(caught.value).endswith(
        "layer l127 needs 128 aufs branches (itself and 127 parents), but aufs mounts at most "
        "127 (CONFIG_AUFS_BRANCH_MAX_127); mount this store with backend='fuse-overlayfs' (no "
        "branch limit), or convert it with `aufs migrate --to overlay` for backend='overlay' "
        "(up to 500 layers)")
    assert caught.value.errno == errno.ENOSPC
    assert recorder.calls == []
    assert driver.status()[-1] == ("Layers Held", "0")
    wider = aufs.Driver(driver.root, backend=aufs.AufsBackend(
        recorder, kernel=WITH_AUFS, dirperm1=False, auplink=None, branch_max=511))
    wider.get(top)  # a kernel built with CONFIG_AUFS_BRANCH_MAX_511
    assert [str(c.data).count("=r") for c in recorder.mount_calls()] == [64, 64]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount")
def test_a_stale_mount_root_is_still_known_mounted(scratch: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """aufs answers ESTALE on the root of a mount whose branch was deleted under it (fsck's
    broken-layer-in-use case): put must still see the mount, by the mount table."""
    from aufs.store import mounters

    def stale(path: str) -> bool:
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), path)

    with tmpfs_mount(scratch / "m", "1m") as mounted:
        monkeypatch.setattr(mounters.native, "is_mountpoint", stale)
        assert mounters.SYSCALLS.is_mounted(str(mounted))
        (scratch / "plain").mkdir()
        assert not mounters.SYSCALLS.is_mounted(str(scratch / "plain"))
