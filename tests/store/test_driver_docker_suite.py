"""Docker's aufs_test.go and the lifecycle part of its graphtest suite, on every backend.

Numbers in the test names follow reference/moby-aufs-notes.md §2 and §4. The diff tests of
that list (GetDiff, Changes, DiffSize, ChildDiffSize, ApplyDiff) live in test_diff_suite.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import aufs
from aufs.store.backends.aufs import AUFS_BRANCH_MAX
from conftest import IS_ROOT, Harness, backend_unavailable, tmpfs_mount


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---- aufs_test.go ---------------------------------------------------------------------------


def test_01_new_driver(driver: aufs.Driver) -> None:
    assert driver is not None
    assert driver.backend in ("aufs", "overlay", "fuse-overlayfs")


def test_02_string_is_aufs(driver: aufs.Driver) -> None:
    assert str(driver) == "aufs"


def test_03_create_dir_structure(driver: aufs.Driver) -> None:
    for name in ("mnt", "layers", "diff"):
        info = os.stat(os.path.join(driver.root, name))
        assert stat.S_ISDIR(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o710
    assert stat.S_IMODE(os.stat(driver.root).st_mode) == 0o710


def test_04_new_driver_from_existing_dir(harness: Harness, scratch: Path) -> None:
    first = harness.driver(scratch / "aufs")
    first.create("1")
    second = harness.driver(scratch / "aufs")
    assert second.exists("1")
    assert second.backend == first.backend


def test_05_create_new_dir(driver: aufs.Driver) -> None:
    driver.create("1")


def test_06_create_new_dir_structure(driver: aufs.Driver) -> None:
    driver.create("1")
    for name in ("mnt", "diff", "layers"):
        assert os.path.lexists(os.path.join(driver.root, name, "1"))
    assert stat.S_IMODE(os.stat(os.path.join(driver.root, "diff", "1")).st_mode) == 0o755
    assert os.path.getsize(os.path.join(driver.root, "layers", "1")) == 0


def test_07_remove_image(driver: aufs.Driver) -> None:
    driver.create("1")
    driver.remove("1")
    for name in ("mnt", "diff", "layers", "work"):
        assert not os.path.lexists(os.path.join(driver.root, name, "1"))
        assert not os.path.lexists(os.path.join(driver.root, name, "1-removing"))


def test_08_get_without_parent(driver: aufs.Driver) -> None:
    driver.create("1")
    assert driver.get("1") == os.path.join(driver.root, "diff", "1")
    driver.put("1")


def test_09_cleanup_with_no_dirs(driver: aufs.Driver) -> None:
    driver.cleanup()


def test_10_cleanup_with_dir(driver: aufs.Driver) -> None:
    driver.create("1")
    driver.cleanup()


def test_11_mounted_false_response(driver: aufs.Driver, harness: Harness) -> None:
    driver.create("1")
    assert harness.is_mounted(os.path.join(driver.root, "diff", "1")) is False


def test_12_mounted_true_response(driver: aufs.Driver, harness: Harness) -> None:
    driver.create("1")
    driver.create("2", "1")
    path = driver.get("2")
    assert harness.is_mounted(path) is True


def test_13_mount_with_parent(driver: aufs.Driver) -> None:
    driver.create("1")
    driver.create("2", "1")
    assert driver.get("2") == os.path.join(driver.root, "mnt", "2")


def test_14_remove_mounted_dir(driver: aufs.Driver, harness: Harness) -> None:
    driver.create("1")
    driver.create("2", "1")
    path = driver.get("2")
    assert harness.is_mounted(path)
    driver.remove("2")  # Docker allows it while this process holds the layer
    assert not harness.is_mounted(path)
    assert not driver.exists("2")


def test_15_create_with_invalid_parent(driver: aufs.Driver) -> None:
    with pytest.raises(aufs.LayerNotFoundError):
        driver.create("1", "docker")
    # better than Docker: nothing is left behind
    assert not driver.exists("1")
    for name in ("mnt", "diff", "layers"):
        assert not os.path.lexists(os.path.join(driver.root, name, "1"))


def test_20_exists(driver: aufs.Driver) -> None:
    driver.create("1")
    assert driver.exists("none") is False
    assert driver.exists("1") is True


def test_21_status(driver: aufs.Driver) -> None:
    driver.create("1")
    status = driver.status()
    assert [key for key, _ in status[:4]] == [
        "Root Dir", "Backing Filesystem", "Dirs", "Dirperm1 Supported"]
    assert status[0] == ("Root Dir", driver.root)
    assert status[1][1] == "tmpfs" if IS_ROOT else status[1][1] != ""
    assert status[2] == ("Dirs", "1")
    assert status[3][1] in ("true", "false")


def mount_more_than_42_layers(harness: Harness, root: str) -> tuple[aufs.Driver, str, int]:
    """TestMountMoreThan42Layers' helper: 126 layers, every tenth one deletes a file of its
    parent, nothing is put. Returns the driver, the top layer and the expected entry count."""
    driver = harness.driver(root)
    expected, last = 0, ""
    for index in range(1, 127):
        expected += 1
        parent = "" if index == 1 else sha(str(index - 1))
        current = sha(str(index))
        driver.create_read_write(current, parent)
        point = driver.get(current)
        if harness.real_union:
            Path(point, current).touch()
            if index % 10 == 0:
                os.remove(os.path.join(point, parent))
                expected -= 1
        last = current
    return driver, last, expected


@pytest.fixture
def aufs_tests_dir() -> Iterator[Path]:
    """Docker's own test directory, /tmp/aufs-tests, on a private tmpfs; one test run at a
    time has it (the path is fixed, and two runs on one machine would unmount each other's)."""
    base = Path("/tmp/aufs-tests")
    if not IS_ROOT:
        pytest.skip("needs root to mount a tmpfs on /tmp/aufs-tests")
    with open("/tmp/aufs-tests.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with tmpfs_mount(base, "1g") as mounted:
            yield mounted
        base.rmdir()


def test_23_mount_more_than_42_layers(harness: Harness, aufs_tests_dir: Path) -> None:
    driver, top, expected = mount_more_than_42_layers(harness, str(aufs_tests_dir / "aufs"))
    try:
        point = driver.get(top)
        if harness.recorder is not None:
            calls = [c for c in harness.recorder.calls if c.target == point]
            assert [c.operation for c in calls] == ["mount"] * 4
            assert [c.flags for c in calls] == [0, 0x20, 0x20, 0x20]  # MS_REMOUNT
            assert [str(c.data).count("=ro+wh") for c in calls] == [40, 38, 38, 9]
            return
        assert expected == 114
        assert len(os.listdir(point)) == 114
    finally:
        driver.cleanup()


def test_24_mount_more_than_42_layers_matching_path_length(
    harness: Harness, aufs_tests_dir: Path
) -> None:
    zeroes = "0"
    while True:
        mount_path = f"/tmp/aufs-tests/{zeroes}/aufs"
        path_length = 77 + len(mount_path)
        if 4095 % path_length == 0 or 4095 % path_length > path_length - 2:
            break
        zeroes += "0"
    assert zeroes == "0000000"
    driver, top, expected = mount_more_than_42_layers(harness, mount_path)
    try:
        point = driver.get(top)
        if harness.recorder is not None:
            calls = [c for c in harness.recorder.calls if c.target == point]
            assert [str(c.data).count("=ro+wh") for c in calls] == [37, 36, 36, 16]
            return
        assert len(os.listdir(point)) == expected == 114
    finally:
        driver.cleanup()


def test_25_concurrent_access(driver: aufs.Driver) -> None:
    """BenchmarkConcurrentAccess as a test: many creates on one parent, then threads that
    get and put each layer at once."""
    rng = random.Random(25)
    ids = [f"{rng.getrandbits(256):064x}" for _ in range(64)]
    driver.create(ids[0])
    driver.create(ids[1], ids[0])
    failures: list[BaseException] = []

    def run(function: object, layer_id: str) -> None:
        try:
            function(layer_id)  # type: ignore[operator]
        except BaseException as error:
            failures.append(error)

    def create(layer_id: str) -> None:
        driver.create(layer_id, ids[1])

    def get_put(layer_id: str) -> None:
        for _ in range(3):
            driver.get(layer_id)
            driver.put(layer_id)

    for step in (create, get_put):
        threads = [threading.Thread(target=run, args=(step, i)) for i in ids[2:]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
    for layer_id in ids[2:]:
        driver.remove(layer_id)
    assert sorted(driver.layer_ids()) == sorted(ids[:2])


def test_26_init_stale_cleanup(harness: Harness, scratch: Path) -> None:
    root = scratch / "aufs"
    for name in ("diff", "mnt"):
        (root / name / "123-removing" / "deep").mkdir(parents=True)
    (root / "layers").mkdir()
    harness.driver(root)
    assert not (root / "diff" / "123-removing").exists()
    assert not (root / "mnt" / "123-removing").exists()


# ---- graphtest: the lifecycle tests ----------------------------------------------------------


def create_base(driver: aufs.Driver, name: str) -> None:
    old_umask = os.umask(0)
    try:
        driver.create_read_write(name, "")
        with driver.mounted(name) as path:
            subdir = os.path.join(path, "a subdir")
            os.mkdir(subdir, 0o705 | stat.S_ISVTX)
            os.lchown(subdir, 1, 2)
            file_path = os.path.join(path, "a file")
            fd = os.open(file_path, os.O_CREAT | os.O_WRONLY, 0o222 | stat.S_ISUID)
            os.write(fd, b"Some data")
            os.close(fd)
    finally:
        os.umask(old_umask)


def verify_base(driver: aufs.Driver, name: str) -> None:
    with driver.mounted(name) as path:
        subdir = os.lstat(os.path.join(path, "a subdir"))
        assert stat.S_ISDIR(subdir.st_mode)
        assert stat.S_IMODE(subdir.st_mode) == 0o705 | stat.S_ISVTX
        assert (subdir.st_uid, subdir.st_gid) == (1, 2)
        file_info = os.lstat(os.path.join(path, "a file"))
        assert stat.S_ISREG(file_info.st_mode)
        assert stat.S_IMODE(file_info.st_mode) == 0o222 | stat.S_ISUID
        assert (file_info.st_uid, file_info.st_gid) == (0, 0)
        assert sorted(os.listdir(path)) == ["a file", "a subdir"]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to chown and mount")
def test_graph_create_empty(driver: aufs.Driver) -> None:
    driver.create("empty", "")
    assert driver.exists("empty")
    with driver.mounted("empty") as path:
        info = os.stat(path)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o755
        assert (info.st_uid, info.st_gid) == (0, 0)
        assert os.listdir(path) == []
    driver.remove("empty")
    # better than Docker: removing a base layer that was once mounted leaks no mnt/<id>
    assert not os.path.lexists(os.path.join(driver.root, "mnt", "empty"))


@pytest.mark.skipif(not IS_ROOT, reason="needs root to chown")
def test_graph_create_base(driver: aufs.Driver) -> None:
    create_base(driver, "Base")
    verify_base(driver, "Base")
    driver.remove("Base")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to chown")
def test_graph_create_snap(driver: aufs.Driver, harness: Harness) -> None:
    harness.require_union()
    create_base(driver, "Base")
    driver.create("Snap", "Base")
    verify_base(driver, "Snap")
    driver.remove("Snap")
    driver.remove("Base")


def add_many_layers(driver: aufs.Driver, base: str, count: int) -> str:
    last = base
    for index in range(1, count + 1):
        layer = uuid.uuid4().hex
        driver.create(layer, last)
        with driver.mounted(layer) as path:
            Path(path, "top-id").write_text(layer)
            Path(path, f"layer-{index}").mkdir()
            Path(path, f"layer-{index}", "layer-id").write_text(layer)
            Path(path, f"layer-{index}", "parent-id").write_text(last)
        last = layer
    return last


def check_many_layers(driver: aufs.Driver, top: str, count: int) -> None:
    with driver.mounted(top) as path:
        assert Path(path, "top-id").read_text() == top
        expected = top
        for index in range(count, 0, -1):
            assert Path(path, f"layer-{index}", "layer-id").read_text() == expected
            expected = Path(path, f"layer-{index}", "parent-id").read_text()
        assert Path(path, "testfile.txt").read_text() == "test content"


def test_graph_deep_layer_read(driver: aufs.Driver, harness: Harness) -> None:
    harness.require_union()
    # Docker's callers: overlay 50, fuse 128; aufs mounts at most 127 branches (base + 126)
    count = {"overlay": 50, "aufs": AUFS_BRANCH_MAX - 1}.get(harness.name, 128)
    driver.create("base", "")
    with driver.mounted("base") as path:
        Path(path, "testfile.txt").write_text("test content")
    top = add_many_layers(driver, "base", count)
    check_many_layers(driver, top, count)


@pytest.mark.skipif(bool(backend_unavailable("overlay")),
                    reason=str(backend_unavailable("overlay")))
def test_500_layer_chain_on_overlay(scratch: Path) -> None:
    """Kernel overlayfs' own limit is 500 lower layers; lowerdir+ reaches it."""
    driver = aufs.Driver(scratch / "aufs", backend="overlay")
    try:
        parent = ""
        for index in range(500):
            layer = f"layer{index:03d}"
            driver.create(layer, parent)
            Path(driver.store.diff_path(layer), f"file{index:03d}").write_text(str(index))
            parent = layer
        path = driver.get(parent)
        assert len(os.listdir(path)) == 500
        assert Path(path, "file000").read_text() == "0"
        driver.put(parent)
        assert not aufs.is_mountpoint(path)
    finally:
        driver.cleanup()
