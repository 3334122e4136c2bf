"""Docker's tar-split format: how a layer tar was laid out, without its file contents, so that
the same tar can be written again, byte for byte, from the files on disk.

A tar-split file (`tar-split.json.gz`) is gzip of JSON lines, one entry each, in the order of
the archive, numbered by "position":
- a segment (type 2): raw bytes of the archive, base64 in "payload": header blocks with their
  PAX or GNU extensions, the padding after the previous member's data, and at the end the
  end-of-archive blocks with anything that followed them;
- a file (type 1): one member, by "name" ("name_raw", base64, when the name is not UTF-8),
  with the "size" of its data and, when it has data, the CRC-64 (ISO) of that data as 8
  big-endian bytes in "payload".

Docker's layerdb, the rescue of a Docker root and this store's own records all use this one
reader. The recorder never keeps file data, and caps what it keeps of the rest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO, NamedTuple, Protocol

from aufs import _implementation as native
from aufs.errors import AufsError

FILE_NAME = "tar-split.json.gz"
FILE_ENTRY = 1
SEGMENT_ENTRY = 2
# what one member may take of headers, extensions and padding (a PAX header holds at most
# 1 MiB: format.MAX_EXTENDED_HEADER), and what a whole layer may take
MAX_ENTRY_RAW = 4 << 20
MAX_TOTAL_RAW = 256 << 20
_COPY = 1 << 20


class TarSplitError(AufsError, ValueError):
    """A tar-split file that cannot be read."""


class TarSplitMismatch(TarSplitError):
    """The files on disk are not the ones the tar-split file describes."""


class Entry(NamedTuple):
    kind: int  # FILE_ENTRY or SEGMENT_ENTRY
    name: bytes  # a file's archive name; empty for a segment
    size: int  # a file's data size; 0 for a segment
    payload: bytes | None  # a segment's raw bytes; a file's CRC-64, or None without data
    position: int


class FileSource(Protocol):
    """Opens a layer's file by its archive name (aufs.store.diffs.FileGetter is one)."""

    def get(self, name: str) -> BinaryIO: ...


# ---- reading ----------------------------------------------------------------------------------


_LINES_AT_ONCE = 512


def read_entries(journal: BinaryIO) -> Iterator[Entry]:
    """The entries of an uncompressed tar-split stream (open the file with gzip.open). The
    lines are parsed a few hundred at a time, as one JSON array (a call per line costs more
    than the parsing); a batch that does not parse is read again line by line, to name the
    line at fault."""
    batch: list[tuple[int, bytes]] = []
    for number, line in enumerate(journal, start=1):
        if line.strip():
            batch.append((number, line))
        if len(batch) == _LINES_AT_ONCE:
            yield from _parse_lines(batch)
            batch = []
    yield from _parse_lines(batch)


def _parse_lines(batch: list[tuple[int, bytes]]) -> Iterator[Entry]:
    if not batch:
        return
    try:
        values = json.loads(b"[" + b",".join(line for _, line in batch) + b"]")
    except ValueError:
        values = None
    for index, (number, line) in enumerate(batch):
        if values is None:
            try:
                data = json.loads(line)
            except ValueError as error:
                raise TarSplitError(f"tar-split line {number} is not JSON: {error}") from None
        else:
            data = values[index]
        if not isinstance(data, dict):
            raise TarSplitError(f"tar-split line {number} is not an entry")
        yield _entry(data, number)


def _entry(data: dict[str, object], number: int) -> Entry:
    kind = data.get("type")
    position = data.get("position", number - 1)
    size = data.get("size") or 0
    if not isinstance(position, int) or not isinstance(size, int) or size < 0:
        raise TarSplitError(f"tar-split line {number} has a bad position or size")
    try:
        payload = _base64(data.get("payload"))
        if kind == SEGMENT_ENTRY:
            return Entry(SEGMENT_ENTRY, b"", 0, payload or b"", position)
        if kind != FILE_ENTRY:
            raise TarSplitError(f"tar-split line {number} has unknown type {kind!r}")
        name = data.get("name")
        if isinstance(name, str) and name:
            raw_name = name.encode("utf-8", "surrogateescape")
        else:
            raw_name = _base64(data.get("name_raw")) or b""
    except (binascii.Error, TypeError):
        raise TarSplitError(f"tar-split line {number}: bad base64") from None
    if not raw_name:
        raise TarSplitError(f"tar-split line {number} is a file without a name")
    return Entry(FILE_ENTRY, raw_name, size, payload, position)


def _base64(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("not a string")
    return base64.b64decode(value, validate=True)


def replay(entries: Iterable[Entry], files: FileSource,
           write: Callable[[bytes | memoryview], object] | None = None,
           *, check_crc: bool = False, hashing: bool = True) -> str:
    """Writes the original tar (or only hashes it, with write=None); returns its sha256
    digest ("" with hashing=False). A file shorter or longer than its entry says raises
    TarSplitMismatch; so does one whose CRC-64 differs from its entry's, with check_crc (a
    file with data whose entry keeps no CRC counts as differing)."""
    digest = hashlib.sha256() if hashing else None
    buffer = bytearray(_COPY)
    view = memoryview(buffer)
    for entry in entries:
        if entry.kind == SEGMENT_ENTRY:
            assert entry.payload is not None
            if digest is not None:
                digest.update(entry.payload)
            if write is not None:
                write(entry.payload)
            continue
        if not entry.size:
            continue
        name = os.fsdecode(entry.name)
        crc = 0
        with files.get(name) as handle:
            if os.fstat(handle.fileno()).st_size != entry.size:
                raise TarSplitMismatch(f"{name} is no longer {entry.size} bytes long")
            remaining = entry.size
            while remaining:
                count = handle.readinto(view[:min(remaining, _COPY)])  # type: ignore[attr-defined]
                if not count:
                    raise TarSplitMismatch(f"{name} is shorter than tar-split says")
                piece = view[:count]
                if digest is not None:
                    digest.update(piece)
                if check_crc:
                    crc = native.crc64_iso(crc, piece)
                if write is not None:
                    write(piece)
                remaining -= count
        if check_crc and entry.payload != crc.to_bytes(8, "big"):
            raise TarSplitMismatch(f"{name}: its contents changed (CRC-64 differs)")
    return "" if digest is None else "sha256:" + digest.hexdigest()


# ---- recording --------------------------------------------------------------------------------


def _new_gzip_compressor() -> Any:
    """A gzip compressobj at its fastest level: ISA-L's (the optional `fast` extra) when it
    is installed, about five times faster than zlib's level 1 on tar-split's lines and a
    little smaller, else zlib's. Both let go of the GIL while they work."""
    try:
        from isal import isal_zlib  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: a gzip container
    return isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)


# whether a recorder may compress on the native core's C thread (tests turn it off, to check
# that both ways give the same file)
NATIVE_GZIP = True


def _native_gzip() -> Any:
    """The native core's compressing thread, which never takes the GIL, or None where it
    cannot run (the pure-Python fallback, or no libz.so.1 here)."""
    if native.GzipLines is None or not NATIVE_GZIP:
        return None
    try:
        return native.GzipLines(1)
    except OSError:
        return None


class TarSplitRecorder(native.TarSplitCollector):
    """Builds a tar-split file while a TarReader reads an archive: the reader hands it every
    byte it consumes (consume), and says where each member's data starts (begin_file) and
    ends (end_file). File data only feeds a CRC-64, never the record. With the native core,
    the extractor hands over most files once written, still open (defer_crc, take_fd), and
    the compressing thread reads their CRC-64 back from the page cache and closes them: the
    checksum was most of what recording added to the applying thread.

    The collecting is the native core's (TarSplitCollector, once per member and in C, as the
    recording's cost is what it adds to each member of an apply); this class hands what it
    collects to a thread that builds the JSON lines and gzips them. That is the native core's
    C thread (GzipLines: zlib, never the GIL) where it can run: a Python thread takes the GIL
    a few times per batch, and each time the applying thread sleeps until it has it back,
    which cost an apply more than the compressing itself (on a 2-core VM, recording went from
    1.07-1.13x a plain apply to 1.02-1.09x, and with the CRCs read back, to 0.98-1.00x, or
    1.016x round by round). Elsewhere it is a Python thread with ISA-L's or zlib's gzip. A
    recorder is used in the process that made it (a forked child has no copy of its C
    thread), and an apply that fails abandons it, which closes the files it holds.

    Raises DiffError when one member brings more than max_entry_bytes of headers and
    padding, or the archive more than max_total_bytes in all.
    """

    def __init__(self, *, max_entry_bytes: int = MAX_ENTRY_RAW,
                 max_total_bytes: int = MAX_TOTAL_RAW, hash_stream: bool = False) -> None:
        self._hash = hashlib.sha256() if hash_stream else None
        super().__init__(max_entry_bytes, max_total_bytes,
                         None if self._hash is None else self._hash.update)
        # the C thread, where this system has it; else a Python thread below
        self._gzip = _native_gzip()
        self._compressor: Any = None if self._gzip is not None else _new_gzip_compressor()
        self._compressed: list[bytes] = []
        self._batches: queue.SimpleQueue[tuple[Sequence[bytes | tuple[str, int, int]], int] | None]
        self._batches = queue.SimpleQueue()
        self._compressing: threading.Thread | None = None
        self._failure: Exception | None = None  # the Python thread's, for finish to raise
        self._read = False  # archive_read() was called
        self._finished: bytes | None = None

    def batch_ready(self) -> None:
        self._compress()

    def _compress(self) -> None:
        if self._gzip is not None:
            self._gzip.add(*self.take())
            return
        if self._compressing is None:
            self._compressing = threading.Thread(target=self._compress_batches,
                                                 name="aufs-tar-split", daemon=True)
            self._compressing.start()
        self._batches.put(self.take())

    def _compress_batches(self) -> None:
        while (batch := self._batches.get()) is not None:
            if self._failure is None:  # after one, the batches are only freed (their files)
                try:
                    lines = native.tarsplit_lines(*batch)
                except Exception as error:  # reading a file's CRC back, or memory
                    self._failure = error  # the thread goes on: the batches left are freed
                    continue
                self._compressed.append(self._compressor.compress(lines))

    def close(self) -> None:
        """Stops the Python compressing thread (finish does it too). The native one stops in
        finish, or when the recorder is freed: until then finish can still be called."""
        if self._compressing is not None:
            self._batches.put(None)
            self._compressing.join()
            self._compressing = None

    def abandon(self) -> None:
        """Gives the recording up (the apply failed): stops the compressing threads and
        closes the files held for their CRCs now, rather than when the recorder is freed
        (which a traceback can put off)."""
        self.close()
        if self._gzip is not None:
            self._gzip.close()
        super().abandon()

    def archive_read(self) -> None:
        """The archive was read to its end: its last entries go to the compressing thread
        now, to be compressed while the caller finishes its work (finish() does it too)."""
        if not self._read:
            self._read = True
            self.end_segment()
            self._compress()

    def finish(self) -> bytes:
        """The tar-split file's content (gzip); call once the archive is read to its end.
        Raises OSError when a file's CRC could not be read back."""
        if self._finished is None:
            self.archive_read()
            if self._gzip is not None:
                self._finished = self._gzip.finish()
                return self._finished
            self.close()
            if self._failure is not None:
                raise self._failure
            self._compressed.append(self._compressor.flush())
            self._finished = b"".join(self._compressed)
            self._compressed.clear()
        return self._finished

    @property
    def diff_id(self) -> str | None:
        """The sha256 of every byte consumed, when built with hash_stream=True."""
        return None if self._hash is None else "sha256:" + self._hash.hexdigest()
