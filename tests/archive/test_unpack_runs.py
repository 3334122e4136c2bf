"""Runs of plain members unpacked in one native call: they make exactly what the
entry-by-entry path makes (the spec), stop where it must take over, and fail the same way."""

from __future__ import annotations

import errno
import gzip
import io
import os
import stat
import tarfile
import time
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aufs import _fallback
from aufs.archive import extract
from aufs.archive.tarsplit import TarSplitRecorder
from aufs.errors import DiffError
from conftest import IS_ROOT, NATIVE, tmpfs_mount
from tarbuild import archive, member

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="runs are taken as root only (owners)")

DIRECTORIES = ["", "a/", "./a/", "a/b/", "./a/b/", "c/", "a//b/"]
BASES = ["f", "g", "d", ".wh.f", ".wh..wh..opq", "\u00e9t\u00e9"]
SIZES = [0, 1, 511, 512, 513, 4096, 70_000]


@st.composite
def members(draw: st.DrawFn) -> tuple[tarfile.TarInfo, bytes]:
    name = draw(st.sampled_from(DIRECTORIES)) + draw(st.sampled_from(BASES))
    kind = draw(st.sampled_from(["file", "file", "file", "dir", "dir/", "symlink", "hardlink",
                                 "fifo", "pax-file", "empty-link", "big-uid",
                                 "negative-uid"]))
    mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o600]))
    owner = {"uid": draw(st.sampled_from([0, 1000])), "gid": draw(st.sampled_from([0, 50]))}
    mtime = draw(st.sampled_from([0, 1_700_000_000, 2**33 - 1]))
    if kind == "file":
        size = draw(st.sampled_from(SIZES))
        return member(name, data=os.urandom(size), mode=mode, mtime=mtime, **owner)
    if kind == "pax-file":
        return member(name, data=b"pax", mode=mode, pax={"mtime": "1700000000.25"}, **owner)
    if kind in ("dir", "dir/"):
        return member(name + ("/" if kind == "dir/" else ""), tarfile.DIRTYPE, mode=mode,
                      mtime=mtime, **owner)
    if kind == "symlink":
        return member(name, tarfile.SYMTYPE, linkname="../target", mtime=mtime, **owner)
    if kind == "empty-link":
        return member(name, tarfile.SYMTYPE, linkname="", mtime=mtime)
    if kind == "hardlink":
        return member(name, tarfile.LNKTYPE, linkname="a/f")
    if kind == "big-uid":
        return member(name, data=b"x", uid=2**32 - 1)
    if kind == "negative-uid":  # base-256 in the GNU format (the others cannot hold it)
        return member(name, data=b"x", gid=-1)
    return member(name, tarfile.FIFOTYPE, mode=mode)


class Trickle(io.RawIOBase):
    """Hands the archive over a few hundred bytes at a time, so runs often find the next
    member cut short in the buffer and must read more."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self._step, len(self._data))
        buffer[:count] = self._data[:count]
        self._data = self._data[count:]
        return count


def read_without_atime(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)  # reading must not move what we compare
    try:
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read()
    finally:
        os.close(fd)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Names, types, modes, owners, contents, link targets and both times of everything."""
    entries: dict[str, tuple[object, ...]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            content: object = None
            if stat.S_ISREG(info.st_mode):
                content = read_without_atime(path)
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            times: object = (info.st_mtime_ns, None if stat.S_ISLNK(info.st_mode)
                             else info.st_atime_ns)  # the walk reads links: their atime moves
            if abs(info.st_mtime_ns - time.time_ns()) < 10**11:
                times = "now"  # made with no header's times: a parent, an overlay whiteout
            entries[os.path.relpath(path, root)] = (
                info.st_mode, info.st_uid, info.st_gid, info.st_nlink, content, times,
                os.listxattr(path, follow_symlinks=False))
    return entries


def unpack(data: bytes, target: Path, mode: extract.WhiteoutMode, runs: bool,
           step: int | None, hash_stream: bool) -> tuple[object, ...]:
    """What extracting data makes: the tree, the result and the tar-split record, or the
    error's type and message."""
    target.mkdir()
    recorder = TarSplitRecorder(hash_stream=hash_stream)
    saved = extract.UNPACK_RUNS
    extract.UNPACK_RUNS = runs
    stream = Trickle(data, step) if step else io.BytesIO(data)
    try:
        result = extract.extract(stream, str(target),  # type: ignore[arg-type]
                                 extract.ExtractOptions(mode, tar_split=recorder))
    except (DiffError, OSError) as error:
        return type(error).__name__, str(error).replace(str(target), "<target>")
    finally:
        extract.UNPACK_RUNS = saved
        recorder.close()
    record = gzip.decompress(recorder.finish())
    return snapshot(target), result, record, recorder.unusable, recorder.diff_id


layers = st.lists(members(), max_size=14)
formats = st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])


@settings(max_examples=250, deadline=None)
@given(layers, formats, st.sampled_from([extract.WhiteoutMode.LITERAL,
                                          extract.WhiteoutMode.OVERLAY]),
       st.sampled_from([None, None, 333, 1500]), st.booleans())
@example([member("a/f", data=b"1"), member("a/f", data=b"22")], tarfile.PAX_FORMAT,
         extract.WhiteoutMode.LITERAL, None, False)  # a duplicate: EEXIST hands it to Python
@example([member("./a/d", tarfile.DIRTYPE), member("./a/d/f", data=b"x" * 600_000),
          member("./a/d/g", data=b"y")], tarfile.GNU_FORMAT, extract.WhiteoutMode.LITERAL,
         None, True)  # bigger than half the buffer: streamed by the Python path
def test_runs_make_what_the_entry_by_entry_path_makes(
        tmp_path_factory: pytest.TempPathFactory, chosen: list[tuple[tarfile.TarInfo, bytes]],
        tar_format: int, mode: extract.WhiteoutMode, step: int | None,
        hash_stream: bool) -> None:
    try:
        data = archive(chosen, tar_format)
    except ValueError:
        return  # a name or id this format cannot hold
    base = tmp_path_factory.mktemp("runs")
    with_runs = unpack(data, base / "runs", mode, True, step, hash_stream)
    without = unpack(data, base / "entries", mode, False, step, hash_stream)
    assert with_runs == without


def test_a_layer_of_plain_members_takes_few_python_entries(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    chosen = [member("etc/", tarfile.DIRTYPE)]
    chosen += [member(f"etc/file{index}", data=b"x" * index) for index in range(300)]
    chosen += [member(f"etc/link{index}", tarfile.SYMTYPE, linkname="file0")
               for index in range(100)]
    chosen += [member("usr/bin/", tarfile.DIRTYPE)]
    chosen += [member(f"usr/bin/tool{index}", data=b"y", mode=0o755) for index in range(100)]
    entries = []
    original = extract.Extractor._entry

    def counting(self: extract.Extractor, header: object, reader: object) -> None:
        entries.append(header)
        original(self, header, reader)  # type: ignore[arg-type]

    monkeypatch.setattr(extract.Extractor, "_entry", counting)
    target = tmp_path / "target"
    target.mkdir()
    result = extract.extract(io.BytesIO(archive(chosen)), str(target),
                             extract.ExtractOptions(extract.WhiteoutMode.LITERAL))
    assert result.entries == len(chosen)
    assert entries == []  # every member went through runs
    assert (target / "etc" / "file299").read_bytes() == b"x" * 299
    assert os.readlink(target / "etc" / "link7") == "file0"
    assert (target / "usr" / "bin" / "tool3").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("runs", [True, False])
def test_a_full_disk_in_a_run_names_the_entry(tmp_path: Path, runs: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extract, "UNPACK_RUNS", runs)
    chosen = [member(f"blob{index}", data=os.urandom(64 << 10)) for index in range(40)]
    with tmpfs_mount(tmp_path / "small", "1m") as small, pytest.raises(OSError) as caught:
        extract.extract(io.BytesIO(archive(chosen)), str(small),
                        extract.ExtractOptions(extract.WhiteoutMode.LITERAL))
    assert caught.value.errno == errno.ENOSPC
    assert "No space left on device while unpacking entry 'blob" in str(caught.value)


def test_a_symlinked_directory_is_not_followed_by_a_run(tmp_path: Path) -> None:
    """A run's directory is opened by the extractor's root-bound resolution, so a symlink
    an earlier member planted cannot lead a run outside the layer."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    chosen = [member("a", tarfile.SYMTYPE, linkname=str(outside)),
              member("a/f", data=b"escaped?"), member("a/g", data=b"escaped?")]
    with pytest.raises(DiffError):
        extract.extract(io.BytesIO(archive(chosen)), str(target),
                        extract.ExtractOptions(extract.WhiteoutMode.LITERAL))
    assert list(outside.iterdir()) == []


def run_once(impl: ModuleType, data: bytes, target: Path, prefix: bytes | None,
             recorder: object) -> tuple[object, ...]:
    target.mkdir()
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    times: list[tuple[str, int, int]] = []
    try:
        result = impl.unpack_run(memoryview(bytearray(data)), 0, len(data), 0, fd, prefix,
                                 "p", 1 << 19, recorder, times)
    finally:
        os.close(fd)
    return result, times, snapshot(target)


@pytest.mark.skipif(NATIVE is None, reason="the native extension was not built")
@settings(max_examples=200, deadline=None)
@given(layers, formats, st.sampled_from([None, b"", b"a/", b"./a/"]))
def test_native_run_is_its_spec(tmp_path_factory: pytest.TempPathFactory,
                                chosen: list[tuple[tarfile.TarInfo, bytes]], tar_format: int,
                                prefix: bytes | None) -> None:
    try:
        data = archive(chosen, tar_format)
    except ValueError:
        return
    base = tmp_path_factory.mktemp("spec")
    outcomes = []
    for impl in (NATIVE, _fallback):
        assert impl is not None
        recorder = TarSplitRecorder()
        outcome = run_once(impl, data, base / impl.IMPLEMENTATION, prefix, recorder)
        recorder.end_segment()
        recorder.close()
        outcomes.append((outcome, gzip.decompress(recorder.finish())))
    assert outcomes[0] == outcomes[1]
