"""Hostile archives where runs hand over to the entry-by-entry path: cut short, with numbers
no header should hold, or with headers only the spec's parser takes. Found by a mutation
fuzzer comparing runs with entries, and the native run with its spec."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from aufs import _fallback
from aufs.archive import extract
from aufs.archive.tarsplit import TarSplitRecorder
from aufs.errors import DiffError
from conftest import IS_ROOT, NATIVE
from tarbuild import archive, member


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def fix_checksum(block: bytearray) -> bytearray:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return block


def with_and_without_runs(data: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                          ) -> list[extract.ExtractResult]:
    """What extracting data gives with runs, then entry by entry, each in a fresh folder."""
    results = []
    for runs in (True, False):
        monkeypatch.setattr(extract, "UNPACK_RUNS", runs)
        target = tmp_path / str(runs)
        target.mkdir()
        results.append(extract.extract(io.BytesIO(data), str(target),
                                       extract.ExtractOptions(extract.WhiteoutMode.LITERAL)))
    return results


def unpack(data: bytes, target: Path, mode: extract.WhiteoutMode, runs: bool,
           monkeypatch: pytest.MonkeyPatch) -> str:
    """The error's type and message, with the fds open before and after compared."""
    monkeypatch.setattr(extract, "UNPACK_RUNS", runs)
    target.mkdir()
    recorder = TarSplitRecorder()
    before = open_fds()
    try:
        with pytest.raises((DiffError, OSError)) as caught:
            extract.extract(io.BytesIO(data), str(target),
                            extract.ExtractOptions(mode, tar_split=recorder))
    finally:
        recorder.abandon()  # what an apply that fails does
    assert open_fds() == before
    return f"{type(caught.value).__name__}: {caught.value}"


@pytest.mark.parametrize("runs", [True, False])
def test_a_file_cut_short_leaks_no_fd(tmp_path: Path, runs: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = archive([member("a/", tarfile.DIRTYPE), member("a/f", data=b"x" * 700)])
    message = unpack(data[:512 * 2 + 300], tmp_path / "t", extract.WhiteoutMode.LITERAL,
                     runs, monkeypatch)
    assert message == "DiffError: entry 'a/f': the archive ends inside a member's data"


@pytest.mark.parametrize("runs", [True, False])
def test_unread_whiteout_data_cut_short_is_a_diff_error(tmp_path: Path, runs: bool,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """An overlay whiteout's data is skipped, not read: the run that follows finds the
    archive cut inside it and must say so as the entry-by-entry path does."""
    data = archive([member("a/f", data=b"1"), member("a/.wh.g", data=b"w" * 2000)],
                   tarfile.GNU_FORMAT)
    message = unpack(data[:512 * 3 + 1000], tmp_path / "t", extract.WhiteoutMode.OVERLAY,
                     runs, monkeypatch)
    assert message == ("DiffError: after entry 'a/.wh.g': the archive ends inside a "
                       "member's data")


@pytest.mark.parametrize("runs", [True, False])
def test_a_base256_size_past_int64_is_a_diff_error(tmp_path: Path, runs: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytearray(archive([member("f", data=b"x")], tarfile.GNU_FORMAT))
    data[124:136] = b"\x80" + (1 << 70).to_bytes(11, "big")
    fix_checksum(memoryview(data)[:512])  # type: ignore[arg-type]
    message = unpack(bytes(data), tmp_path / "t", extract.WhiteoutMode.LITERAL, runs,
                     monkeypatch)
    assert message == f"DiffError: the archive: size {1 << 70} is out of range"


def spec_only_header(what: str) -> bytes:
    """Headers the native parser leaves to the spec: a negative base-256 mode, a checksum
    summed over signed chars, a base-256 size past int64."""
    made = {}
    base = bytearray(archive([member("a/f", data=b"")], tarfile.GNU_FORMAT)[:512])
    negative_mode = bytearray(base)
    negative_mode[100:108] = b"\xff" * 4 + b"\0\0\x01\xa4"
    made["negative-mode"] = bytes(fix_checksum(negative_mode))
    signed = bytearray(base)
    signed[0:3] = b"a/\xe9"  # a byte past 127 in the name
    fix_checksum(signed)
    signed[148:156] = b"%06o\0 " % (int(signed[148:154], 8) - 256)
    made["signed-checksum"] = bytes(signed)
    huge = bytearray(base)
    huge[124:136] = b"\x80" + (1 << 70).to_bytes(11, "big")
    made["huge-size"] = bytes(fix_checksum(huge))
    return made[what]


@pytest.mark.skipif(NATIVE is None, reason="the native extension was not built")
@pytest.mark.skipif(not IS_ROOT, reason="runs are taken as root only (owners)")
@pytest.mark.parametrize("prefix", [None, b"a/", b"b/"])
@pytest.mark.parametrize("what", ["negative-mode", "signed-checksum", "huge-size"])
def test_native_run_and_spec_stop_alike_at_headers_left_to_the_spec(
        tmp_path: Path, prefix: bytes | None, what: str) -> None:
    header = spec_only_header(what)
    assert _fallback.parse_tar_header(header)  # the spec takes each of them
    data = header + bytes(1024)
    outcomes = []
    for impl in (NATIVE, _fallback):
        assert impl is not None
        target = tmp_path / impl.IMPLEMENTATION
        target.mkdir()
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        try:
            run = impl.unpack_run(memoryview(bytearray(data)), 0, len(data), 0, fd, prefix,
                                  "", 1 << 19, None, [])
        finally:
            os.close(fd)
        outcomes.append((run, sorted(os.listdir(target))))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0].status == _fallback.UNPACK_OTHER


@pytest.mark.skipif(not IS_ROOT, reason="runs are taken as root only (owners)")
@pytest.mark.parametrize("name", ["a/f/", "a/f/.", "l/"])
def test_a_member_no_run_can_make_opens_no_directory_for_it(tmp_path: Path, name: str,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A file or symlink spelled with a trailing slash (or "/.") is the entry-by-entry
    path's: a run must not first make its name a directory, as the parent of a member."""
    kind = tarfile.SYMTYPE if name.startswith("l") else tarfile.REGTYPE
    data = archive([member("a/", tarfile.DIRTYPE), member("a/g", data=b"1"),
                    member(name, kind, data=b"" if kind == tarfile.SYMTYPE else b"2",
                           linkname="a")], tarfile.GNU_FORMAT)
    results = with_and_without_runs(data, tmp_path, monkeypatch)
    assert results[0] == results[1]
    assert not results[0].removed_something


@pytest.mark.skipif(not IS_ROOT, reason="runs are taken as root only (owners)")
@pytest.mark.parametrize("kind", [tarfile.DIRTYPE, tarfile.REGTYPE])
def test_a_stray_linkname_adds_nothing_to_the_size(tmp_path: Path, kind: bytes,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a symlink's target counts in added_size, whatever the linkname field of a
    directory or file holds (both implementations' runs)."""
    data = archive([member("d/", tarfile.DIRTYPE),
                    member("d/x", kind, data=b"abc", linkname="stray-target")],
                   tarfile.GNU_FORMAT)
    results = with_and_without_runs(data, tmp_path, monkeypatch)
    assert results[0] == results[1]
    assert results[0].added_size == (3 if kind == tarfile.REGTYPE else 0)


@pytest.mark.parametrize("impl", [NATIVE, _fallback], ids=["native", "fallback"])
@pytest.mark.parametrize(("position", "end", "padding"), [(600, 512, 0), (0, 2048, 0),
                                                          (0, 512, -1)])
def test_a_run_outside_its_buffer_is_refused(tmp_path: Path, impl: object, position: int,
                                             end: int, padding: int) -> None:
    if impl is None:
        pytest.skip("the native extension was not built")
    with pytest.raises(ValueError, match="do not fit the buffer"):
        impl.unpack_run(memoryview(bytearray(1024)), position, end,  # type: ignore[attr-defined]
                        padding, -1, None, "", 1 << 19, None, [])
