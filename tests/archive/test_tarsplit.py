"""tar-split: recording while unpacking, the file format, replay and the recorder's caps."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from aufs.archive.extract import ExtractOptions, WhiteoutMode, extract
from aufs.archive.reader import TarReader
from aufs.archive.tarsplit import (
    FILE_ENTRY,
    SEGMENT_ENTRY,
    TarSplitError,
    TarSplitMismatch,
    TarSplitRecorder,
    read_entries,
    replay,
)
from aufs.errors import DiffError
from aufs.store.diffs import FileGetter
from conftest import NATIVE
from tarbuild import archive, directory, member


def test_crc64_iso_matches_go(impl: ModuleType) -> None:
    # CRC-64/GO-ISO check value, and an update split in two gives the same result
    assert impl.crc64_iso(0, b"123456789") == 0xB90956C775A41001
    data = bytes(range(256)) * 41
    assert impl.crc64_iso(impl.crc64_iso(0, data[:1001]), data[1001:]) == impl.crc64_iso(0, data)


def test_crc64_iso_every_length_and_split(impl: ModuleType) -> None:
    # lengths around the native code's 16- and 64-byte folding steps, from any register
    # value and split anywhere, against the bit-by-bit definition
    def bitwise(crc: int, data: bytes) -> int:
        crc ^= (1 << 64) - 1
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ (0xD800000000000000 if crc & 1 else 0)
        return crc ^ ((1 << 64) - 1)

    data = bytes((index * 167 + 13) % 251 for index in range(700))
    for size in [*range(0, 200), 255, 256, 257, 383, 511, 512, 513, 700]:
        start = (size * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
        expected = bitwise(start, data[:size])
        assert impl.crc64_iso(start, data[:size]) == expected, size
        cut = size // 3
        assert impl.crc64_iso(impl.crc64_iso(start, data[:cut]), data[cut:size]) == expected


@pytest.mark.parametrize("path", ["pclmul", "table"])
def test_crc64_iso_on_each_native_path(path: str) -> None:
    """The native CRC-64 takes the widest path the CPU has (AVX-512, else PCLMULQDQ, else
    tables); AUFS_CRC64_PATH caps it, so every path is checked against the spec here."""
    if NATIVE is None:
        pytest.skip("the native extension was not built (AUFS_NO_EXTENSIONS=1 at build time)")
    script = """
import sys
from aufs import _fallback, _native
data = bytes((index * 167 + 13) % 251 for index in range(5000))
for size in [*range(0, 130), 255, 256, 511, 512, 513, 767, 1024, 1500, 4999, 5000]:
    for cut in (0, size // 3, size):
        ours = _native.crc64_iso(_native.crc64_iso(7, data[:cut]), data[cut:size])
        spec = _fallback.crc64_iso(_fallback.crc64_iso(7, data[:cut]), data[cut:size])
        assert ours == spec, (size, cut)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "AUFS_CRC64_PATH": path})
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def sample_archive() -> bytes:
    return archive([
        directory("etc/"),
        member("etc/hosts", data=b"127.0.0.1 localhost\n" * 40),
        member("etc/motd", data=b""),
        member("etc/" + "long-name-" * 20, data=b"x" * 700, pax={"SCHILY.xattr.user.k": "v"}),
        member("etc/link", tarfile.SYMTYPE, linkname="hosts"),
        member("caf\udce9", data=b"latin-1 name"),
    ], tarfile.GNU_FORMAT) + bytes(8192)  # GNU tar's record padding after the end blocks


def record(data: bytes, target: Path, **caps: int) -> TarSplitRecorder:
    recorder = TarSplitRecorder(hash_stream=True, **caps)  # type: ignore[arg-type]
    extract(io.BytesIO(data), str(target), ExtractOptions(WhiteoutMode.LITERAL,
                                                          tar_split=recorder))
    return recorder


def test_record_then_replay_is_byte_for_byte(tmp_path: Path) -> None:
    data = sample_archive()
    recorder = record(data, tmp_path)
    journal = recorder.finish()
    assert recorder.unusable is None
    assert recorder.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    out = io.BytesIO()
    with FileGetter(str(tmp_path)) as files:
        digest = replay(read_entries(gzip.GzipFile(fileobj=io.BytesIO(journal))), files,
                        out.write, check_crc=True)
    assert out.getvalue() == data
    assert digest == recorder.diff_id


def test_the_record_is_dockers_format_and_holds_no_file_data(tmp_path: Path) -> None:
    secret = b"SECRET-CONTENT-" * 100
    data = archive([member("a", data=secret), member("b", data=b"")])
    lines = [json.loads(line) for line in gzip.decompress(record(data, tmp_path).finish())
             .splitlines()]
    assert [line["type"] for line in lines] == [SEGMENT_ENTRY, FILE_ENTRY, SEGMENT_ENTRY,
                                                FILE_ENTRY, SEGMENT_ENTRY]
    assert [line["position"] for line in lines] == list(range(5))
    assert lines[1]["name"] == "a" and lines[1]["size"] == len(secret)
    assert len(__import__("base64").b64decode(lines[1]["payload"])) == 8  # the CRC-64
    assert lines[3] == {"type": FILE_ENTRY, "name": "b", "payload": None, "position": 3}
    raw = b"".join(__import__("base64").b64decode(line["payload"]) for line in lines
                   if line["type"] == SEGMENT_ENTRY)
    assert b"SECRET" not in raw
    assert len(raw) == len(data) - len(secret)


def test_a_non_utf8_name_is_kept_raw(tmp_path: Path) -> None:
    lines = gzip.decompress(record(sample_archive(), tmp_path).finish()).splitlines()
    raw_names = [json.loads(line).get("name_raw") for line in lines]
    assert "Y2Fm6Q==" in raw_names  # b"caf\xe9"


def test_hostile_headers_cannot_make_the_recorder_exceed_its_cap(tmp_path: Path) -> None:
    # a 200 KiB PAX header is legal tar, but more than this recorder's per-entry cap
    data = archive([member("a", data=b"1", pax={"comment": "x" * (200 << 10)})])
    (tmp_path / "one").mkdir()
    with pytest.raises(DiffError, match="tar-split"):
        record(data, tmp_path / "one", max_entry_bytes=64 << 10)
    # many small headers: the total cap
    many = archive([member(f"f{index}", data=b"") for index in range(300)])
    (tmp_path / "two").mkdir()
    with pytest.raises(DiffError, match="tar-split"):
        record(many, tmp_path / "two", max_total_bytes=100 << 10)


def test_data_after_the_archive_past_the_cap_is_not_kept(tmp_path: Path) -> None:
    # trailing data is valid (apply ignores it): past the cap the layer simply gets no
    # record, and the recorder holds no more than the cap
    data = archive([member("a", data=b"1")]) + b"\1" * (1 << 20)
    recorder = record(data, tmp_path, max_entry_bytes=256 << 10)
    assert recorder.unusable is not None and "after the end" in recorder.unusable
    assert recorder.raw_bytes <= 256 << 10
    assert recorder.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()


def test_the_recorder_keeps_what_it_may_under_the_cap(tmp_path: Path) -> None:
    data = archive([member(f"f{index}", data=b"") for index in range(300)])
    recorder = record(data, tmp_path, max_total_bytes=len(data))
    assert recorder.raw_bytes == len(data)


def test_sparse_and_duplicate_members_make_the_record_unusable(tmp_path: Path) -> None:
    data = archive([member("a", data=b"1"), member("a", data=b"2")])
    assert record(data, tmp_path).unusable is not None


def test_replay_notices_changed_files(tmp_path: Path) -> None:
    data = sample_archive()
    journal = record(data, tmp_path).finish()

    def digest() -> str:
        with FileGetter(str(tmp_path)) as files:
            return replay(read_entries(gzip.GzipFile(fileobj=io.BytesIO(journal))), files)

    original = digest()
    (tmp_path / "etc" / "hosts").write_bytes(b"127.0.0.2 localhost\n" * 40)  # same size
    assert digest() != original
    (tmp_path / "etc" / "hosts").write_bytes(b"127.0.0.1 localhost\n" * 41)  # longer
    with pytest.raises(TarSplitMismatch):
        digest()


def test_unreadable_records_raise(tmp_path: Path) -> None:
    for bad in (b"not json\n", b'{"type":7}\n', b'{"type":2,"payload":"@@"}\n',
                b'{"type":1,"size":3}\n'):
        with pytest.raises(TarSplitError):
            list(read_entries(io.BytesIO(bad)))


def test_tarsplit_lines_are_docker_json(impl: ModuleType) -> None:
    # the lines the recorder writes, against json.dumps of the same entries in Docker's
    # field order: escapes, names that are not UTF-8, empty files, base64 padding
    names = ["etc/hosts", 'q"\\\n\r\t\b\f\x01\x1f\x7f~ ', "café", "日本\U0001f600", "caf\udce9",
             "x" * 300]
    items: list[bytes | tuple[str, int, int]] = []
    expected = []
    position = 1 << 33
    for index in range(60):
        if index % 3 == 0:
            raw = bytes(range(index % 7 + index))
            items.append(raw)
            entry: dict[str, object] = {"type": 2, "payload": base64.b64encode(raw).decode()}
        else:
            name = names[index % len(names)] + str(index)
            size = (0, 1, 1 << 40)[index % 3]
            crc = (index * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
            items.append((name, size, crc))
            try:
                entry = {"type": 1, "name": name.encode("utf-8") and name}
            except UnicodeEncodeError:
                raw_name = name.encode("utf-8", "surrogateescape")
                entry = {"type": 1, "name_raw": base64.b64encode(raw_name).decode()}
            if size:
                entry["size"] = size
                entry["payload"] = base64.b64encode(crc.to_bytes(8, "big")).decode()
            else:
                entry["payload"] = None
        entry["position"] = position + index
        expected.append(json.dumps(entry, separators=(",", ":")) + "\n")
    assert impl.tarsplit_lines(items, position).decode() == "".join(expected)
    assert impl.tarsplit_lines([], 0) == b""


def test_record_does_not_depend_on_the_reader_buffer() -> None:
    # the reader hands the recorder spans of its buffer, before each refill too: a buffer
    # smaller than a member's headers and data gives the same record and digest
    data = sample_archive() + b"trailing" * 100

    def recorded(buffer_size: int) -> tuple[bytes, str | None]:
        recorder = TarSplitRecorder(hash_stream=True)
        reader = TarReader(io.BytesIO(data), buffer_size=buffer_size, recorder=recorder)
        while reader.next() is not None:
            if reader.buffered_data() is None:  # as extract does: whole, or in pieces
                for _ in reader.chunks():
                    pass
        return gzip.decompress(recorder.finish()), recorder.diff_id

    expected = recorded(1 << 20)
    assert expected[1] == "sha256:" + hashlib.sha256(data).hexdigest()
    for buffer_size in (1024, 1536, 4096):
        assert recorded(buffer_size) == expected
