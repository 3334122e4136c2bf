"""Faults real hosts produce: a full disk, files changed by hand, a read-only root, a put
without a get. Each gives a clear error and loses no other layer's data."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest

import aufs
from aufs.cli.samples import shipped_sample_path
from aufs.images import Catalog, import_images
from aufs.store import fsck
from conftest import FIXTURES, IS_ROOT, Harness, tmpfs_mount
from tarbuild import archive, member, tree_snapshot

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the fault tests mount filesystems")


def big_archive(megabytes: int) -> bytes:
    return archive([member(f"blob{index}", data=os.urandom(1 << 20))
                    for index in range(megabytes)])


def test_apply_until_enospc_leaves_the_layer_and_store_intact(harness: Harness,
                                                              tmp_path: Path) -> None:
    with tmpfs_mount(tmp_path / "small", "8m") as small:
        driver = harness.driver(small / "store")
        driver.create("keep")
        driver.apply_diff("keep", "", io.BytesIO(archive([member("data", data=b"precious")])))
        driver.create("full")
        driver.apply_diff("full", "", io.BytesIO(archive([member("before", data=b"x")])))
        before = tree_snapshot(small / "store" / "diff")
        with pytest.raises(OSError) as caught:
            driver.apply_diff("full", "", io.BytesIO(big_archive(12)))
        assert caught.value.errno == errno.ENOSPC
        assert "while unpacking entry 'blob" in str(caught.value)
        assert tree_snapshot(small / "store" / "diff") == before
        assert fsck.check(str(small / "store")) == []
        driver.cleanup()


def test_import_until_enospc_stores_nothing(tmp_path: Path) -> None:
    with tmpfs_mount(tmp_path / "small", "1m") as small:
        driver = Harness("aufs-recorded").driver(small / "store")
        layout = tmp_path / "layout"
        import shutil

        shutil.copytree(FIXTURES / "oci-sample", layout)
        with pytest.raises(OSError) as caught:  # the base layer is bigger than the disk
            import_images(driver, Catalog(driver.store), f"{layout}:latest")
        assert caught.value.errno == errno.ENOSPC
        assert driver.layer_ids() == []
        assert fsck.check(str(small / "store")) == []
        import_images(driver, Catalog(driver.store), shipped_sample_path())  # still usable


def test_layers_file_truncated_by_hand(driver: aufs.Driver) -> None:
    driver.create("a")
    driver.create("b", "a")
    driver.create("c", "b")
    layers = Path(driver.store.layer_file("c"))
    layers.write_bytes(layers.read_bytes()[:2])  # "b\na\n" -> "b\n": a lost line
    problems = fsck.check(driver.root)
    assert [p.code for p in problems] == ["inconsistent-chain"]
    assert not problems[0].safe
    assert driver.exists("a") and driver.exists("b")
    with open(layers, "wb") as handle:
        handle.write(b"b\n../../etc\n")
    with pytest.raises(aufs.AufsError, match="line 2 is not a layer id"):
        driver.get("c")
    assert [p.code for p in fsck.check(driver.root)] == ["corrupt-layers-file"]


def test_diff_dir_deleted_by_hand(driver: aufs.Driver) -> None:
    driver.create("base")
    driver.create("child", "base")
    driver.create("lonely")
    import shutil

    shutil.rmtree(driver.store.diff_path("lonely"))
    shutil.rmtree(driver.store.diff_path("base"))
    problems = {Path(p.path).name: p for p in fsck.check(driver.root)}
    assert problems["lonely"].code == "missing-diff" and problems["lonely"].safe
    assert problems["base"].code == "missing-diff" and not problems["base"].safe
    repaired, remaining = fsck.repair(driver.root)
    assert [p.code for p in repaired] == ["missing-diff"]
    assert not driver.exists("lonely")
    assert [p.code for p in remaining] == ["missing-diff"]  # base: its child still needs it
    assert driver.exists("child")


def test_put_without_get(driver: aufs.Driver) -> None:
    driver.create("1")
    with pytest.raises(aufs.UnbalancedPutError, match="without a matching get"):
        driver.put("1")


def test_read_only_root(harness: Harness, tmp_path: Path) -> None:
    root = tmp_path / "store"
    writable = harness.driver(root)
    writable.create("kept")
    writable.apply_diff("kept", "", io.BytesIO(archive([member("f", data=b"data")])))
    view = tmp_path / "readonly"
    view.mkdir()
    aufs.mount(root, view, None, 0x1000, None)  # MS_BIND
    try:
        aufs.mount(None, view, None, 0x1000 | 0x20 | 0x1, None)  # remount the bind read-only
        driver = harness.driver(view)
        assert driver.exists("kept")
        assert driver.get("kept") == str(view / "diff" / "kept")  # base layers need no mount
        driver.put("kept")
        with pytest.raises(OSError) as caught:
            driver.create("new")
        assert caught.value.errno == errno.EROFS
        with pytest.raises(OSError) as applied:
            driver.apply_diff("kept", "", io.BytesIO(archive([member("g", data=b"x")])))
        assert applied.value.errno == errno.EROFS
    finally:
        aufs.unmount(view, 0x2)
    assert (root / "diff" / "kept" / "f").read_bytes() == b"data"
    assert fsck.check(str(root)) == []
