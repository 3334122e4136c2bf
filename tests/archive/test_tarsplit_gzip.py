"""tar-split's gzip on the native core's C thread (GzipLines): the same file as the Python
thread makes, batch after batch, and the errors it must give."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from aufs import _fallback
from aufs import _implementation as implementation
from aufs.archive import tarsplit
from aufs.archive.extract import ExtractOptions, WhiteoutMode, extract
from aufs.archive.tarsplit import TarSplitRecorder
from conftest import NATIVE
from tarbuild import archive, directory, member


@pytest.fixture
def native() -> object:
    if NATIVE is None:
        pytest.skip("the native extension was not built (AUFS_NO_EXTENSIONS=1 at build time)")
    return NATIVE


@pytest.fixture
def c_thread() -> None:
    """Recorders here compress on the C thread."""
    if implementation.GzipLines is None:
        pytest.skip("the pure-Python fallback is in use (AUFS_NO_EXTENSIONS=1): recorders "
                    "compress on a Python thread")


def many_members() -> bytes:
    """More entries and more raw bytes than one batch holds, with names the spec formats
    (not ASCII, not UTF-8), so that the thread gets several batches of every kind."""
    members = [directory("d/")]
    for index in range(_fallback.TARSPLIT_BATCH_ITEMS // 2 + 300):
        members.append(member(f"d/file-{index}", data=b"%d" % index * (index % 7)))
    members.append(member("d/caf\udce9", data=b"latin-1"))
    members.append(member("d/日本", data=b"utf-8"))
    members.append(member("d/" + "long-" * 40, data=b"pax", pax={"SCHILY.xattr.user.k": "v"}))
    return archive(members, tarfile.PAX_FORMAT) + bytes(10240)


def recorded(data: bytes, target: Path) -> tuple[bytes, TarSplitRecorder]:
    target.mkdir()
    recorder = TarSplitRecorder(hash_stream=True)
    extract(io.BytesIO(data), str(target), ExtractOptions(WhiteoutMode.LITERAL,
                                                          tar_split=recorder))
    return recorder.finish(), recorder


def test_the_c_thread_makes_the_python_threads_file(c_thread: None, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = many_members()
    ours, recorder = recorded(data, tmp_path / "c")
    assert recorder._gzip is not None and recorder._compressor is None  # the C thread
    monkeypatch.setattr(tarsplit, "NATIVE_GZIP", False)
    theirs, python = recorded(data, tmp_path / "python")
    assert python._compressor is not None  # the Python thread's compressor was used
    assert gzip.decompress(ours) == gzip.decompress(theirs)
    assert len(gzip.decompress(ours).splitlines()) > _fallback.TARSPLIT_BATCH_ITEMS


def test_the_c_thread_is_used_by_default(c_thread: None) -> None:
    recorder = TarSplitRecorder()
    assert recorder._gzip is not None and recorder._compressor is None
    recorder.consume(b"x" * 512)
    assert gzip.decompress(recorder.finish()).startswith(b'{"type":2,"payload":"eHh4')


def test_gzip_lines_holds_the_batches_in_order(native: object) -> None:
    def batches() -> Iterator[tuple[object, int]]:
        """The batches a collector takes from one script: every other member, then the end."""
        collector = native.TarSplitCollector(1 << 20, 1 << 30)  # type: ignore[attr-defined]
        for index in range(5):
            collector.begin_file(f"f{index}", index, False, b"h" * 512)
            collector.end_file(b"d" * index)
            if index % 2:
                yield collector.take()
        collector.end_segment()
        yield collector.take()

    expected = b"".join(native.tarsplit_lines(*batch)  # type: ignore[attr-defined]
                        for batch in batches())
    writer = native.GzipLines(1)  # type: ignore[attr-defined]
    handed = list(batches())
    for batch, position in handed:
        writer.add(batch, position)
    assert [len(batch) for batch, _ in handed] == [0, 0, 0]  # the thread has the entries
    assert expected.count(b"\n") == 10  # a segment and a file for each member
    assert gzip.decompress(writer.finish()) == expected
    with pytest.raises(ValueError, match="already finished"):
        writer.finish()
    with pytest.raises(ValueError, match="already finished"):
        writer.add(*next(batches()))


def test_a_closed_gzip_lines_drops_its_batches(native: object) -> None:
    collector = native.TarSplitCollector(1 << 20, 1 << 30)  # type: ignore[attr-defined]
    collector.consume(b"x" * 4096)
    collector.end_segment()
    writer = native.GzipLines(1)  # type: ignore[attr-defined]
    writer.add(*collector.take())
    writer.close()
    writer.close()  # twice is harmless
    with pytest.raises(ValueError, match="already finished"):
        writer.finish()


def test_a_recorder_closed_before_finish_still_finishes(tmp_path: Path) -> None:
    # the store closes the recorder in a finally, then asks for its file
    data = archive([directory("a/"), member("a/f", data=b"1" * 3000)])
    recorder = TarSplitRecorder(hash_stream=True)
    extract(io.BytesIO(data), str(tmp_path), ExtractOptions(WhiteoutMode.LITERAL,
                                                            tar_split=recorder))
    recorder.close()
    lines = gzip.decompress(recorder.finish()).splitlines()
    assert b'"name":"a/f"' in lines[3]


def test_the_python_thread_still_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    monkeypatch.setattr(tarsplit, "NATIVE_GZIP", False)
    data = archive([member("f", data=b"abc")])
    recorder = TarSplitRecorder()
    assert recorder._gzip is None
    extract(io.BytesIO(data), str(tmp_path), ExtractOptions(WhiteoutMode.LITERAL,
                                                            tar_split=recorder))
    assert b'"name":"f"' in gzip.decompress(recorder.finish())


def test_archive_read_hands_over_the_last_entries_once() -> None:
    # extract calls it as soon as the archive ends, so that its last batch compresses while
    # the directory times are set; finish() then only waits for it
    recorder = TarSplitRecorder()
    recorder.consume(b"x" * 512)
    assert recorder.position == 0
    recorder.archive_read()
    assert recorder.position == 1  # the segment was taken
    recorder.archive_read()
    assert recorder.position == 1
    assert gzip.decompress(recorder.finish()).count(b"\n") == 1
