"""The lifecycle where we do better than Docker: errors instead of silent damage, busy
mounts kept intact, references across processes, nothing left behind by a failure."""

from __future__ import annotations

import errno
import io
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import aufs
import tarbuild
from aufs.store.layout import Store
from conftest import Harness

FAST = aufs.RetryPolicy(unmount_attempts=3, unmount_delay=0.01)


def test_create_existing_id_raises(driver: aufs.Driver) -> None:
    driver.create("1")
    with pytest.raises(aufs.LayerExistsError, match="'1' already exists"):
        driver.create("1")


def test_unknown_ids_raise_layer_not_found(driver: aufs.Driver) -> None:
    for call in (driver.get, driver.put, driver.remove, driver.get_metadata):
        with pytest.raises(aufs.LayerNotFoundError) as caught:
            call("nope")
        assert isinstance(caught.value, LookupError)


def test_storage_opt_is_refused_before_anything_is_created(driver: aufs.Driver) -> None:
    with pytest.raises(aufs.AufsError, match="--storage-opt is not supported"):
        driver.create("1", opts=aufs.CreateOpts(storage_opt={"size": "50M"}))
    assert not driver.exists("1")


def test_failed_create_leaves_nothing(driver: aufs.Driver, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    def disk_error(self: Store, layer_id: str, parents: list[str]) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(Store, "write_layer_file", disk_error)
    with pytest.raises(OSError, match="injected"):
        driver.create("1")
    monkeypatch.undo()
    for name in ("mnt", "diff", "layers", "work"):
        entries = os.listdir(os.path.join(driver.root, name)) if os.path.isdir(
            os.path.join(driver.root, name)) else []
        assert entries == [], f"{name}/ keeps {entries}"
    driver.create("1")  # and the id is free again
    assert driver.exists("1")


def test_layers_file_format_and_atomic_write(driver: aufs.Driver) -> None:
    driver.create("1")
    driver.create("2", "1")
    driver.create("3", "2")
    layers = Path(driver.root, "layers")
    assert (layers / "1").read_bytes() == b""
    assert (layers / "2").read_bytes() == b"1\n"
    assert (layers / "3").read_bytes() == b"2\n1\n"
    assert sorted(os.listdir(layers)) == ["1", "2", "3"]  # no temp file left in layers/
    assert driver.parent_ids("3") == ["2", "1"]


def test_failed_mount_does_not_leak_a_reference(driver: aufs.Driver, harness: Harness) -> None:
    driver.create("1")
    driver.create("2", "1")
    if harness.recorder is not None:
        harness.recorder.fail_with["mount"] = [errno.EINVAL]
    else:
        os.rename(driver.store.diff_path("1"), driver.store.diff_path("1") + "-gone")
    with pytest.raises(aufs.MountError) as caught:
        driver.get("2")
    assert caught.value.target == driver.store.mount_path("2")
    assert driver.status()[-1] == ("Layers Held", "0")
    if harness.recorder is None:
        os.rename(driver.store.diff_path("1") + "-gone", driver.store.diff_path("1"))
    path = driver.get("2")
    driver.put("2")  # one get, one put: back to unmounted
    assert not harness.is_mounted(path)


def test_reference_counts(driver: aufs.Driver, harness: Harness) -> None:
    driver.create("1")
    driver.create("2", "1")
    path = driver.get("2")
    assert driver.get("2") == path
    driver.put("2")
    assert harness.is_mounted(path)
    driver.put("2")
    assert not harness.is_mounted(path)
    with pytest.raises(aufs.UnbalancedPutError, match="without a matching get"):
        driver.put("2")


@pytest.mark.parametrize("by_hand", ["unmounted", "mount-dir-removed"])
def test_put_of_a_union_unmounted_by_hand_lets_go_quietly(driver: aufs.Driver,
                                                           harness: Harness,
                                                           by_hand: str) -> None:
    """put trusts that its get left the union mounted; umount2 still tells it otherwise."""
    driver.create("1")
    driver.create("2", "1")
    path = driver.get("2")
    if harness.recorder is not None:
        harness.recorder.unmount(path, 0)
    else:
        aufs.unmount(path)
    if by_hand == "mount-dir-removed":
        os.rmdir(path)
    driver.put("2")
    assert driver.status()[-1] == ("Layers Held", "0")
    assert not harness.is_mounted(path)
    if by_hand == "mount-dir-removed":
        os.mkdir(path)
    assert driver.get("2") == path and harness.is_mounted(path)  # and it mounts again
    driver.put("2")


def test_base_layer_get_put_and_remove_leaks_no_mount_dir(driver: aufs.Driver) -> None:
    driver.create("base")
    assert driver.get("base") == driver.store.diff_path("base")
    driver.put("base")
    driver.remove("base")
    for name in ("mnt", "diff", "layers"):
        assert not os.path.lexists(os.path.join(driver.root, name, "base"))


def test_remove_refuses_a_parent_of_other_layers(driver: aufs.Driver) -> None:
    driver.create("1")
    driver.create("2", "1")
    with pytest.raises(aufs.LayerInUseError, match="parent of 2"):
        driver.remove("1")
    assert driver.exists("1")


def test_get_metadata(driver: aufs.Driver) -> None:
    driver.create("1")
    driver.create("2", "1")
    metadata = driver.get_metadata("2")
    assert metadata["UpperDir"] == driver.store.diff_path("2")
    assert metadata["MergedDir"] == driver.store.mount_path("2")
    assert metadata["LowerDir"] == driver.store.diff_path("1")


def test_context_managers(harness: Harness, scratch: Path) -> None:
    with harness.driver(scratch / "aufs") as driver:
        driver.create("1")
        driver.create("2", "1")
        with driver.mounted("2") as path:
            assert harness.is_mounted(path)
        assert not harness.is_mounted(path)
        held = driver.get("2")
    assert not harness.is_mounted(held)  # cleanup on exit


# ---- busy mounts: Docker detached them and deleted the layer; we keep it -----------------------


def test_busy_mount_is_kept_then_removed_once_closed(
    driver: aufs.Driver, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.require_union()
    driver.create("1")
    driver.create("2", "1")
    path = driver.get("2")
    Path(path, "kept").write_text("data")
    holder = open(os.path.join(path, "kept"))  # noqa: SIM115 - held open on purpose
    try:
        with caplog.at_level(logging.DEBUG, logger="aufs"), pytest.raises(
            aufs.UnmountBusyError
        ) as caught:
            driver.remove("2")
        assert caught.value.target == path
        assert path in str(caught.value)
        retries = [r for r in caplog.records if "retrying" in r.getMessage()]
        assert [r.levelno for r in retries] == [logging.DEBUG] * 4
        assert "retrying 4/4" in retries[-1].getMessage()
        # the layer is intact and still mounted
        assert driver.exists("2")
        assert harness.is_mounted(path)
        assert Path(path, "kept").read_text() == "data"
        with pytest.raises(aufs.UnmountBusyError):
            driver.put("2")  # put keeps its reference when the unmount fails
    finally:
        holder.close()
    driver.remove("2")
    assert not driver.exists("2")
    assert not os.path.lexists(path)


def mounted_child_with_a_file(driver: aufs.Driver, harness: Harness) -> str:
    """Layer "2" on "1", mounted, holding "file"; unmount retries kept short."""
    harness.require_union()
    driver.create("1")
    driver.create("2", "1")
    driver.retry_policy = FAST
    path = driver.get("2")
    Path(path, "file").write_text("x")
    return path


def test_busy_mount_force_remove_detaches_lazily(driver: aufs.Driver, harness: Harness) -> None:
    path = mounted_child_with_a_file(driver, harness)
    with open(os.path.join(path, "file")) as holder:
        driver.remove("2", force=True)
        assert not driver.exists("2")
        assert holder.read() == "x"  # the user of the lazily detached mount keeps working


def test_cleanup_always_finishes(driver: aufs.Driver, harness: Harness) -> None:
    path = mounted_child_with_a_file(driver, harness)
    with open(os.path.join(path, "file")):
        driver.cleanup()
        assert not harness.is_mounted(path)


# ---- several processes on one root ------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import os, sys, aufs
    driver = aufs.Driver(sys.argv[1], backend=sys.argv[2])
    path = driver.get(sys.argv[3])
    print(path, flush=True)
    if sys.argv[4] == "crash":
        os._exit(0)          # dies holding the mount, without put
    sys.stdin.readline()     # hold the layer until told
    driver.put(sys.argv[3])
    print("released", flush=True)
""")


def start_holder(root: str, backend: str, layer: str, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", HOLDER, root, backend, layer, mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")


def test_another_process_keeps_its_mount(driver: aufs.Driver, harness: Harness) -> None:
    harness.require_union()
    driver.create("1")
    driver.create("2", "1")
    holder = start_holder(driver.root, driver.backend, "2", "hold")
    try:
        assert holder.stdout is not None and holder.stdin is not None
        path = holder.stdout.readline().strip()
        assert harness.is_mounted(path)
        assert driver.get("2") == path  # adopted, not mounted twice
        driver.put("2")
        assert harness.is_mounted(path), "our put must not unmount the other process's layer"
        with pytest.raises(aufs.LayerInUseError, match="another process"):
            driver.remove("2")
        driver.cleanup()
        assert harness.is_mounted(path), "cleanup must leave another process's mounts"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        assert not harness.is_mounted(path)
    finally:
        holder.kill()
        holder.wait()


def test_mount_left_by_a_crashed_process_is_adopted(driver: aufs.Driver, harness: Harness
                                                    ) -> None:
    harness.require_union()
    driver.create("1")
    driver.create("2", "1")
    holder = start_holder(driver.root, driver.backend, "2", "crash")
    assert holder.stdout is not None
    path = holder.stdout.readline().strip()
    holder.wait()
    assert harness.is_mounted(path)
    fresh = aufs.Driver(driver.root, backend=driver.backend)
    assert fresh.get("2") == path
    fresh.put("2")
    assert not harness.is_mounted(path)
    # Docker's "put without get" also releases such a mount
    holder = start_holder(driver.root, driver.backend, "2", "crash")
    assert holder.stdout is not None
    holder.stdout.readline()
    holder.wait()
    fresh.put("2")
    assert not harness.is_mounted(path)


# ---- races the concurrency campaign found (tests/campaigns/concurrency.py) --------------------


def test_remove_refuses_a_base_layer_another_process_holds(driver: aufs.Driver,
                                                          harness: Harness) -> None:
    harness.require_union()  # the holder is another process: it opens the real backend
    driver.create("base")
    holder = start_holder(driver.root, driver.backend, "base", "hold")
    try:
        assert holder.stdout is not None and holder.stdin is not None
        holder.stdout.readline()
        with pytest.raises(aufs.LayerInUseError, match="another process"):
            driver.remove("base")  # not mounted, but held: it used to be deleted under it
        assert driver.exists("base")
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
    finally:
        holder.kill()
        holder.wait()
    driver.remove("base")


def test_remove_waits_for_an_apply_under_way(driver: aufs.Driver) -> None:
    from aufs.store.locking import LayerReferences

    driver.create("target")
    guard = LayerReferences.lock_for_change(driver.store.layer_file("target"))
    try:
        with pytest.raises(aufs.LayerInUseError, match="being changed"):
            driver.remove("target")
    finally:
        os.close(guard)
    driver.remove("target")


def test_get_of_a_layer_whose_content_vanished(driver: aufs.Driver) -> None:
    import shutil

    driver.create("gone")
    shutil.rmtree(driver.store.diff_path("gone"))
    with pytest.raises(aufs.LayerNotFoundError, match="aufs fsck"):
        driver.get("gone")


def test_staging_in_use_survives_another_drivers_cleanup(harness: Harness, scratch: Path
                                                         ) -> None:
    first = harness.driver(scratch / "root")
    with first.store.staging("apply") as staging:
        Path(staging, "work").write_text("in progress")
        harness.driver(scratch / "root")  # a second opener cleans abandoned staging
        assert Path(staging, "work").read_text() == "in progress"
    assert os.listdir(first.store.staging_dir) == []


def test_apply_refuses_a_layer_another_process_holds(driver: aufs.Driver,
                                                     harness: Harness) -> None:
    """Found by the concurrency campaign: the apply's swap moved the layer's dir from under
    the holder's lock, so the layer could then be removed under its user."""
    harness.require_union()  # the holder is another process: it opens the real backend
    driver.create("base")
    holder = start_holder(driver.root, driver.backend, "base", "hold")
    try:
        assert holder.stdout is not None and holder.stdin is not None
        holder.stdout.readline()
        with pytest.raises(aufs.LayerInUseError, match="put it first"):
            driver.apply_diff("base", "", io.BytesIO(tarbuild.archive([
                tarbuild.member("f", data=b"x")])))
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
    finally:
        holder.kill()
        holder.wait()


def test_put_lets_go_of_a_layer_that_vanished(driver: aufs.Driver) -> None:
    driver.create("base")
    driver.get("base")
    os.unlink(driver.store.layer_file("base"))  # by hand, under a user
    with pytest.raises(aufs.LayerNotFoundError):
        driver.put("base")
    assert driver.status()[-1] == ("Layers Held", "0")
