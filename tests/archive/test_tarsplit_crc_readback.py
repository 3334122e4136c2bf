"""tar-split CRCs read back from the files on tar-split's compressing thread (csrc/crcfd.c):
the same file as summing the data while unpacking, no fd left open whatever happens, access
times left alone, the cap on fds held, and a file that changed before it was read back."""

from __future__ import annotations

import gzip
import io
import os
import resource
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aufs import _fallback
from aufs import _implementation as implementation
from aufs.archive import tarsplit
from aufs.archive.extract import ExtractOptions, WhiteoutMode, extract
from aufs.archive.tarsplit import TarSplitRecorder, read_entries
from aufs.errors import DiffError
from conftest import NATIVE
from tarbuild import archive, directory, member

MTIME = 1_600_000_000


@pytest.fixture
def native() -> object:
    if NATIVE is None or implementation.IMPLEMENTATION != "native":
        pytest.skip("the pure-Python fallback is in use (AUFS_NO_EXTENSIONS=1): it sums "
                    "every file's data while unpacking")
    return NATIVE


@pytest.fixture
def cap() -> Iterator[None]:
    """Whatever a test sets the cap to, the default comes back after it."""
    yield
    implementation.tarsplit_fd_cap(-1)


@pytest.fixture
def held_up(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Recorders compress on the Python thread, which reads no batch (and so no file back)
    until the event is set."""
    go = threading.Event()
    compress = TarSplitRecorder._compress_batches

    def waiting(self: TarSplitRecorder) -> None:
        go.wait(timeout=60)
        compress(self)

    monkeypatch.setattr(tarsplit, "NATIVE_GZIP", False)
    monkeypatch.setattr(TarSplitRecorder, "_compress_batches", waiting)
    return go


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def layer() -> tuple[bytes, dict[str, bytes]]:
    """Files for unpack runs (small), for the streaming path (over half the reader's 1 MiB
    buffer: read back) and one over 4 MiB (summed as it is written), with their data."""
    files = {f"d/small-{index}": b"%d;" % index * (index % 50) for index in range(300)}
    files["d/empty"] = b""
    files["d/streamed"] = os.urandom(3 << 19)
    files["d/big"] = os.urandom(5 << 20)
    files["d/caf\udce9"] = b"a name that is not UTF-8"
    members = [directory("d/")] + [member(name, data=data, mtime=MTIME)
                                   for name, data in files.items()]
    return archive(members, tarfile.PAX_FORMAT), files


def record(data: bytes, target: Path) -> tuple[bytes, TarSplitRecorder]:
    target.mkdir()
    recorder = TarSplitRecorder(hash_stream=True)
    extract(io.BytesIO(data), str(target), ExtractOptions(WhiteoutMode.LITERAL,
                                                          tar_split=recorder))
    return gzip.decompress(recorder.finish()), recorder


def crcs(lines: bytes) -> dict[bytes, bytes | None]:
    return {entry.name: entry.payload for entry in read_entries(io.BytesIO(lines))
            if entry.kind == tarsplit.FILE_ENTRY}


def test_read_back_crcs_are_the_data_s(native: object, cap: None, tmp_path: Path) -> None:
    data, files = layer()
    before = open_fds()
    read_back, _ = record(data, tmp_path / "read-back")
    implementation.tarsplit_fd_cap(0)  # no fd may be held: every CRC is summed from the data
    summed, _ = record(data, tmp_path / "summed")
    assert read_back == summed
    expected = {os.fsencode(name): _fallback.crc64_iso(0, content).to_bytes(8, "big")
                if content else None for name, content in files.items()}
    assert crcs(read_back) == {b"d/": None, **expected}  # a member without data has no CRC
    assert open_fds() == before
    assert implementation.tarsplit_fds_held() == 0


def test_reading_back_leaves_the_times_alone(native: object, tmp_path: Path) -> None:
    data, _ = layer()
    record(data, tmp_path / "t")
    for name in ("small-7", "streamed", "big"):
        info = os.stat(tmp_path / "t" / "d" / name)
        assert (info.st_atime_ns, info.st_mtime_ns) == (MTIME * 10**9, MTIME * 10**9), name


def test_the_cap_on_fds_held_is_kept(native: object, cap: None, tmp_path: Path,
                                     held_up: threading.Event) -> None:
    """With the compressing thread held up, the files past the cap are summed from their data
    and closed at once: three stay open, until the thread reads them back."""
    data, _ = layer()
    implementation.tarsplit_fd_cap(0)
    expected, _ = record(data, tmp_path / "expected")
    implementation.tarsplit_fd_cap(3)
    (tmp_path / "capped").mkdir()
    recorder = TarSplitRecorder(hash_stream=True)
    before = open_fds()
    extract(io.BytesIO(data), str(tmp_path / "capped"),
            ExtractOptions(WhiteoutMode.LITERAL, tar_split=recorder))
    assert implementation.tarsplit_fds_held() == 3
    assert len(open_fds()) == len(before) + 3
    held_up.set()
    assert gzip.decompress(recorder.finish()) == expected
    assert implementation.tarsplit_fds_held() == 0
    assert open_fds() == before


def test_an_apply_that_fails_leaves_no_file_open(native: object, tmp_path: Path,
                                                 held_up: threading.Event) -> None:
    data, _ = layer()
    recorder = TarSplitRecorder()
    (tmp_path / "t").mkdir()
    before = open_fds()
    with pytest.raises(DiffError, match="ends inside"):
        extract(io.BytesIO(data[:len(data) - (6 << 20)]), str(tmp_path / "t"),
                ExtractOptions(WhiteoutMode.LITERAL, tar_split=recorder))
    assert implementation.tarsplit_fds_held() > 0  # batches wait in the held-up queue
    held_up.set()
    recorder.abandon()
    assert implementation.tarsplit_fds_held() == 0
    assert open_fds() == before


def test_the_c_thread_dropping_its_batches_closes_their_files(native: object,
                                                              tmp_path: Path) -> None:
    if implementation.GzipLines is None:
        pytest.skip("no libz.so.1 here: recorders compress on a Python thread")
    data, _ = layer()
    recorder = TarSplitRecorder()
    (tmp_path / "t").mkdir()
    before = open_fds()
    with pytest.raises(DiffError):
        extract(io.BytesIO(data[:len(data) - (6 << 20)]), str(tmp_path / "t"),
                ExtractOptions(WhiteoutMode.LITERAL, tar_split=recorder))
    recorder.abandon()
    assert implementation.tarsplit_fds_held() == 0
    assert open_fds() == before


def collector_holding(native: object, path: Path, content: bytes) -> object:
    """A collector whose one member's CRC is to be read back from path's fd."""
    collector = native.TarSplitCollector(1 << 20, 1 << 30)  # type: ignore[attr-defined]
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR | os.O_NOATIME)
    collector.begin_file("f", len(content), False, b"h" * 512)
    assert collector.defer_crc()
    collector.take_fd(fd)
    collector.end_file(content)  # consumed, not summed
    return collector


def test_a_file_that_shrank_before_it_was_read_back_is_an_error(native: object,
                                                                tmp_path: Path) -> None:
    collector = collector_holding(native, tmp_path / "f", b"0123456789")
    os.truncate(tmp_path / "f", 4)
    batch, position = collector.take()  # type: ignore[attr-defined]
    with pytest.raises(OSError, match="reading a file's CRC back"):
        native.tarsplit_lines(batch, position)  # type: ignore[attr-defined]
    assert implementation.tarsplit_fds_held() == 0


@pytest.mark.parametrize("how", ["abandon", "free"])
def test_a_collector_given_up_closes_what_it_holds(native: object, tmp_path: Path,
                                                   how: str) -> None:
    before = open_fds()
    collector = collector_holding(native, tmp_path / "f", b"data")
    assert implementation.tarsplit_fds_held() == 1
    if how == "abandon":
        collector.abandon()  # type: ignore[attr-defined]
        assert collector.unusable == "the recording was abandoned"  # type: ignore[attr-defined]
    del collector
    assert implementation.tarsplit_fds_held() == 0
    assert open_fds() == before


def test_take_fd_wants_a_deferred_crc(native: object, tmp_path: Path) -> None:
    collector = native.TarSplitCollector(1 << 20, 1 << 30)  # type: ignore[attr-defined]
    collector.begin_file("f", 4, False, b"")
    collector.consume(b"da")  # summed already: too late to read it back
    assert not collector.defer_crc()
    with pytest.raises(ValueError, match="not deferred"):
        collector.take_fd(0)


def test_a_deferred_crc_whose_file_never_came_is_an_error(native: object) -> None:
    collector = native.TarSplitCollector(1 << 20, 1 << 30)  # type: ignore[attr-defined]
    collector.begin_file("f", 4, False, b"")
    assert collector.defer_crc()
    with pytest.raises(DiffError, match="no CRC for 'f'"):
        collector.end_file(b"data")
    assert implementation.tarsplit_fds_held() == 0


def test_the_spec_never_defers() -> None:
    collector = _fallback.TarSplitCollector(1 << 20, 1 << 30)
    collector.begin_file("f", 4, False, b"")
    assert not collector.defer_crc()
    assert _fallback.tarsplit_fd_cap() == 0


def test_a_file_that_shrank_before_the_thread_read_it_fails_finish(
        native: object, tmp_path: Path, held_up: threading.Event) -> None:
    data, _ = layer()
    recorder = TarSplitRecorder()
    (tmp_path / "t").mkdir()
    before = open_fds()
    extract(io.BytesIO(data), str(tmp_path / "t"),
            ExtractOptions(WhiteoutMode.LITERAL, tar_split=recorder))
    os.truncate(tmp_path / "t" / "d" / "small-7", 3)
    held_up.set()
    with pytest.raises(OSError, match="reading a file's CRC back"):
        recorder.finish()
    assert implementation.tarsplit_fds_held() == 0
    assert open_fds() == before


def test_the_cap_follows_the_fds_the_process_has_free(native: object, cap: None) -> None:
    """A quarter of what RLIMIT_NOFILE leaves free when a recording starts: a process close
    to its limit holds few files open, or none."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(open_fds())
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 40, hard))
        TarSplitRecorder().abandon()
        assert 8 <= implementation.tarsplit_fd_cap() <= 10
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 2, hard))
        TarSplitRecorder().abandon()
        assert implementation.tarsplit_fd_cap() == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    TarSplitRecorder().abandon()
    expected = 512 if soft == resource.RLIM_INFINITY else min(512, (soft - in_use) // 4)
    assert abs(implementation.tarsplit_fd_cap() - expected) <= 1  # the listing's own fd


def test_a_file_whose_access_time_cannot_be_spared_is_summed(
        native: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the filesystem refuses O_NOATIME (a file it gave another owner), the streamed
    file's data is summed as it is read instead, and the file is closed at once."""
    from aufs.archive import extract as extract_module

    data, files = layer()
    monkeypatch.setattr(extract_module, "_no_access_times", lambda fd: False)
    taken = []
    monkeypatch.setattr(TarSplitRecorder, "take_fd",
                        lambda self, fd: taken.append(fd))  # never reached
    lines, _ = record(data, tmp_path / "t")
    assert taken == []
    assert crcs(lines)[b"d/streamed"] == _fallback.crc64_iso(
        0, files["d/streamed"]).to_bytes(8, "big")
