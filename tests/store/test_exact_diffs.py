"""Exact diffs: a layer applied with record gives back its original tar, byte for byte, and
a layer changed since falls back to a fresh tar, with a warning."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import time

import pytest

import aufs
from tarbuild import archive, directory, member


def odd_archive() -> bytes:
    """A tar that aufs's own writer would never produce: GNU headers, unsorted entries,
    odd modes, a long name and GNU tar's record padding after the end blocks."""
    return archive([
        member("zeta", data=b"last letter first\n", mode=0o600, mtime=1_234_567_890),
        directory("usr/"),
        directory("usr/lib/", mode=0o750),
        member("usr/lib/" + "x" * 150, data=os.urandom(3000)),
        member("usr/lib/empty", data=b""),
        member("usr/link", tarfile.SYMTYPE, linkname="lib/empty"),
        member("usr/hard", tarfile.LNKTYPE, linkname="zeta"),
        member(".wh.gone", data=b""),
    ], tarfile.GNU_FORMAT) + bytes(9216)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def diff_bytes(driver: aufs.Driver, layer: str, parent: str = "") -> bytes:
    with driver.diff(layer, parent) as stream:
        return stream.read()


@pytest.mark.parametrize("record", [True, "given"])
def test_a_recorded_layer_diffs_to_its_original_tar(driver: aufs.Driver, record: object
                                                    ) -> None:
    assert driver.reproduces_exact_diffs
    base = archive([directory("etc/"), member("etc/os", data=b"base\n")])
    top = odd_archive()
    driver.create("base")
    driver.apply_diff("base", "", io.BytesIO(base),
                      record=digest(base) if record == "given" else True)
    driver.create("top", "base")
    driver.apply_diff("top", "base", io.BytesIO(top),
                      record=digest(top) if record == "given" else True)
    assert diff_bytes(driver, "base") == base
    assert diff_bytes(driver, "top", "base") == top
    assert driver.verified_diff_id("top") == digest(top)
    # against another parent, or without a record, the diff is written afresh
    assert diff_bytes(driver, "top") != top
    driver.create("plain", "base")
    driver.apply_diff("plain", "base", io.BytesIO(top))
    assert diff_bytes(driver, "plain", "base") != top
    assert driver.verified_diff_id("plain") is None


def test_a_changed_layer_gets_a_fresh_tar_and_a_warning(driver: aufs.Driver,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    data = odd_archive()
    driver.create("layer")
    driver.apply_diff("layer", "", io.BytesIO(data), record=True)
    time.sleep(0.02)  # past the filesystem clock's tick, so the ctime check sees it too
    path = os.path.join(driver.store.diff_path("layer"), "zeta")
    with open(path, "r+b") as handle:  # same size: only the content hash can tell
        handle.write(b"L")
    with caplog.at_level(logging.WARNING):
        fresh = diff_bytes(driver, "layer")
    assert fresh != data
    assert any("changed since it was applied" in r.getMessage() for r in caplog.records)
    with tarfile.open(fileobj=io.BytesIO(fresh)) as tar:
        assert tar.extractfile("zeta").read().startswith(b"Last")  # type: ignore[union-attr]
    assert driver.verified_diff_id("layer") is None


def test_a_change_the_ctimes_miss_is_caught_by_the_crcs(driver: aufs.Driver,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """The check before a replay compares each file's CRC-64 with the record's, so a change
    that no ctime shows (here: the record made to look newer than the change) still gets a
    fresh tar and a warning, never a replay whose digest is wrong."""
    data = odd_archive()
    driver.create("layer")
    driver.apply_diff("layer", "", io.BytesIO(data), record=True)
    branch = driver.store.diff_path("layer")
    with open(os.path.join(branch, "usr", "lib", "x" * 150), "r+b") as handle:
        handle.seek(1500)
        byte = handle.read(1)[0]
        handle.seek(1500)
        handle.write(bytes([byte ^ 0xFF]))  # same size; never the byte it was (its data is
        # random: a fixed byte was already there once in 256 runs)
    record = driver.store.read_record("layer")
    later = time.time_ns() + 10**10
    os.utime(record.tar_split, ns=(later, later))
    os.utime(branch, ns=(later - 10**9, later - 10**9))
    assert driver.verified_diff_id("layer") is None
    with caplog.at_level(logging.WARNING):
        fresh = diff_bytes(driver, "layer")
    assert fresh != data
    assert any("CRC-64 differs" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("change", ["content", "added", "removed", "chmod", "longer"])
def test_every_kind_of_change_is_noticed(driver: aufs.Driver, change: str) -> None:
    data = odd_archive()
    driver.create("layer")
    driver.apply_diff("layer", "", io.BytesIO(data), record=True)
    branch = driver.store.diff_path("layer")
    time.sleep(0.02)
    if change == "content":
        with open(os.path.join(branch, "usr", "lib", "empty"), "wb") as handle:
            handle.write(b"now full")
    elif change == "added":
        with open(os.path.join(branch, "usr", "new"), "wb"):
            pass
    elif change == "removed":
        os.unlink(os.path.join(branch, "usr", "link"))
    elif change == "chmod":
        os.chmod(os.path.join(branch, "usr", "lib"), 0o700)
    else:
        with open(os.path.join(branch, "zeta"), "ab") as handle:
            handle.write(b"more")
    assert driver.verified_diff_id("layer") is None
    assert diff_bytes(driver, "layer") != data


def test_the_record_follows_the_layer(driver: aufs.Driver) -> None:
    data = odd_archive()
    driver.create("temp")
    driver.apply_diff("temp", "", io.BytesIO(data), record=True)
    driver.rename("temp", "final")
    assert diff_bytes(driver, "final") == data
    assert not os.path.exists(driver.store.record_path("temp"))
    # a second apply changes the layer: its record goes
    driver.apply_diff("final", "", io.BytesIO(archive([member("more", data=b"1")])),
                      record=True)
    assert driver.store.read_record("final") is None
    driver.remove("final")
    assert not os.path.exists(driver.store.record_path("final"))


def test_fsck_checks_each_record(driver: aufs.Driver) -> None:
    from aufs.store import fsck

    for name in ("good", "changed", "corrupt", "gone"):
        driver.create(name)
        driver.apply_diff(name, "", io.BytesIO(odd_archive()), record=True)
    assert fsck.check(driver.root) == []
    with open(os.path.join(driver.store.diff_path("changed"), "zeta"), "r+b") as handle:
        handle.write(b"L")
    with open(os.path.join(driver.store.record_path("corrupt"), "tar-split.json.gz"),
              "wb") as handle:
        handle.write(b"\x1f\x8b not really gzip")
    os.unlink(os.path.join(driver.store.diff_path("gone"), "usr", "lib", "x" * 150))
    os.makedirs(driver.store.record_path("no-such-layer"))
    problems = {(os.path.basename(p.path), p.code) for p in fsck.check(driver.root)}
    assert problems == {("changed", "tar-split-mismatch"), ("corrupt", "bad-tar-split"),
                        ("gone", "tar-split-mismatch"), ("no-such-layer", "orphan-dir")}
    repaired, remaining = fsck.repair(driver.root)
    assert len(repaired) == 4 and remaining == []
    assert driver.store.read_record("good") is not None
    assert driver.store.read_record("changed") is None


def test_a_migration_drops_the_records_it_makes_stale(tmp_path: object, caplog:
                                                      pytest.LogCaptureFixture) -> None:
    from aufs.store.fsck import check
    from aufs.store.migrate import migrate

    root = os.path.join(str(tmp_path), "store")
    with aufs.Driver(root) as driver:
        data = archive([directory("etc/"), member("etc/.wh.gone", data=b""),
                        member("etc/os", data=b"x\n")])
        driver.create("base")
        driver.apply_diff("base", "", io.BytesIO(data), record=True)
        assert driver.verified_diff_id("base") == digest(data)
        other = "aufs" if driver.store.read_format() == "overlay" else "overlay"
        migrate(driver.store, other)
        assert driver.verified_diff_id("base") is None
        assert not os.path.exists(driver.store.record_path("base"))
        with caplog.at_level(logging.WARNING):
            fresh = diff_bytes(driver, "base")
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        with tarfile.open(fileobj=io.BytesIO(fresh)) as tar:
            assert sorted(tar.getnames()) == ["etc", "etc/.wh.gone", "etc/os"]
    assert check(root) == []


def test_a_file_that_cannot_be_read_back_fails_the_apply(driver: aufs.Driver,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A file whose CRC cannot be read back as it was written (tar-split's thread reads
    them back) is an apply that failed: it says why, and the layer stays as it was."""
    from aufs.archive.tarsplit import TarSplitRecorder

    def failing(self: TarSplitRecorder) -> bytes:
        raise OSError(5, "tar-split: reading a file's CRC back: Input/output error")

    monkeypatch.setattr(TarSplitRecorder, "finish", failing)
    driver.create("layer")
    with pytest.raises(OSError, match="reading a file's CRC back"):
        driver.apply_diff("layer", "", io.BytesIO(odd_archive()), record=True)
    assert os.listdir(driver.store.diff_path("layer")) == []
    assert driver.verified_diff_id("layer") is None


def test_an_apply_leaves_no_file_open_for_its_record(driver: aufs.Driver) -> None:
    """Recorded or not (a name twice makes the archive unusable), kept or given up: once
    apply_diff returns, no file of the layer is still open for its CRC to be read back."""
    from aufs import _implementation

    before = sorted(os.listdir("/proc/self/fd"))
    twice = archive([directory("d/"), member("d/f", data=b"one" * 100),
                     member("d/f", data=b"two" * 100)])
    odd = odd_archive()
    for index, data in enumerate((odd, twice)):
        driver.create(f"layer-{index}")
        driver.apply_diff(f"layer-{index}", "", io.BytesIO(data), record=True)
        assert _implementation.tarsplit_fds_held() == 0
        assert sorted(os.listdir("/proc/self/fd")) == before
    assert driver.verified_diff_id("layer-0") == digest(odd)
    assert driver.verified_diff_id("layer-1") is None
