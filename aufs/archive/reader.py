"""Reading a tar stream member by member, with the truncation rules of Go's archive/tar.

An archive may end right after a complete member, without the last padding or the two zero
blocks (umoci 0.4.7 writes such layers; Docker and Go accept them). A member cut short inside
its header or data is an error. Anything after the end-of-archive blocks is read and ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from aufs import _implementation as native
from aufs.archive.format import (
    BLOCK,
    GNU_LONGLINK,
    GNU_LONGNAME,
    GNU_SPARSE,
    MAX_EXTENDED_HEADER,
    PAX_GLOBAL,
    PAX_LOCAL,
    ZERO_BLOCK,
    SparseMapParser,
    TarFormatError,
    TarHeader,
    apply_pax,
    check_ranges,
    gnu_sparse_is_extended,
    parse_gnu_sparse_entries,
    parse_header,
    parse_pax,
)

if TYPE_CHECKING:
    from aufs.archive.tarsplit import TarSplitRecorder

MAX_CHAINED_EXTENSIONS = 16


class TarReader:
    """Members of an uncompressed tar stream. Call next() for a header, then consume its
    data with chunks() (or let next() skip it). A recorder, if given, is handed every byte
    consumed and told where each member's data begins and ends: in spans of the buffer, handed
    over once per member (before it moves, too), not piece by piece."""

    def __init__(self, stream: BinaryIO, buffer_size: int = 1 << 20,
                 recorder: TarSplitRecorder | None = None) -> None:
        self._stream = stream
        self._recorder = recorder
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._mark = 0  # the recorder has the bytes before this
        self._eof = False
        self._data_left = 0
        self._padding_left = 0
        self.bytes_read = 0

    # ---- the buffer -----------------------------------------------------------------------

    def _fill(self) -> bool:
        """Reads more; False when the stream is at its end and nothing is buffered."""
        if self._recorder is not None and self._mark != self._start:
            self._hand_over()
        if self._start == self._end:
            self._start = self._end = self._mark = 0
        elif self._start > len(self._buffer) // 2 or self._end == len(self._buffer):
            self._compact()
        self._fill_once()
        return self._start < self._end

    def _take(self, size: int) -> bytes | None:
        """Exactly size bytes; None at a clean end of stream; TarFormatError if it is cut."""
        while self._end - self._start < size:
            available = self._end - self._start
            if self._eof or not self._fill() or self._end - self._start == available:
                if self._end - self._start == 0:
                    return None
                raise TarFormatError("the archive ends inside a header")
        data = bytes(self._view[self._start:self._start + size])
        self._start += size
        return data

    def _skip(self, size: int, *, may_end: bool) -> None:
        while size:
            if self._start == self._end and not self._fill():
                if may_end:
                    return
                raise TarFormatError("the archive ends inside a member's data")
            step = min(size, self._end - self._start)
            self._start += step
            size -= step

    # ---- members --------------------------------------------------------------------------

    def chunks(self, limit: int | None = None) -> Iterator[memoryview]:
        """The current member's data, in buffer-sized pieces (valid until the next call)."""
        wanted = self._data_left if limit is None else min(limit, self._data_left)
        while wanted:
            if self._start == self._end and not self._fill():
                raise TarFormatError("the archive ends inside a member's data")
            step = min(wanted, self._end - self._start)
            piece = self._view[self._start:self._start + step]
            self._start += step
            self._data_left -= step
            wanted -= step
            yield piece

    def buffered_data(self) -> memoryview | None:
        """All of the current member's data as one view into the buffer (valid until the next
        call), or None when it does not fit; the data counts as consumed."""
        size = self._data_left
        if size > len(self._buffer) // 2:
            return None
        while self._end - self._start < size:
            if self._start + size > len(self._buffer):
                self._compact()
            if not self._fill_once():
                raise TarFormatError("the archive ends inside a member's data")
        view = self._view[self._start:self._start + size]
        self._start += size
        self._data_left = 0
        return view

    def unpack_run(self, parent_fd: int, prefix: bytes | None, parent: str,
                   directory_times: list[tuple[str, int, int]]) -> native.UnpackRun:
        """Unpacks the plain members that follow straight from the buffer (native.unpack_run
        says which, and where they go), reading more whenever the next one is not all there
        yet; the reader then stands where the run stopped, as if next() had read up to it."""
        self._end_member()
        entries = data_bytes = added_size = 0
        last_name = b""
        while True:
            run = native.unpack_run(self._view, self._start, self._end, self._padding_left,
                                    parent_fd, prefix, parent, len(self._buffer) // 2,
                                    self._recorder, directory_times)
            self._start = self._mark = run.position
            self._padding_left = run.padding
            entries += run.entries
            data_bytes += run.data_bytes
            added_size += run.added_size
            last_name = run.last_name or last_name
            if run.status != native.UNPACK_NEED_DATA:
                break
            before = self.bytes_read
            self._fill()
            if self.bytes_read == before:
                break  # the stream ends here: next() says how
        return run._replace(entries=entries, data_bytes=data_bytes, added_size=added_size,
                            last_name=last_name)

    def _end_member(self) -> None:
        """Skips what is left of the current member's data, and tells the recorder where it
        ends (its padding is the next member's, or the end's)."""
        self._skip(self._data_left, may_end=False)
        self._data_left = 0
        if self._recorder is not None:
            self._recorder.end_file(self._view[self._mark:self._start])
            self._mark = self._start

    def _hand_over(self) -> None:
        """The bytes consumed since the last hand-over, to the recorder: file data while it
        is in a member's data, raw bytes otherwise."""
        assert self._recorder is not None
        if self._mark != self._start:
            self._recorder.consume(self._view[self._mark:self._start])
        self._mark = self._start

    def _compact(self) -> None:
        if self._recorder is not None and self._mark != self._start:
            self._hand_over()
        remaining = self._end - self._start
        self._buffer[:remaining] = self._buffer[self._start:self._end]
        self._start, self._end, self._mark = 0, remaining, 0

    def _fill_once(self) -> bool:
        """One read into the free tail of the buffer; False at the end of the stream."""
        if self._eof or self._end == len(self._buffer):
            return False  # a full buffer is not the end of the stream
        count = self._stream.readinto(self._view[self._end:])  # type: ignore[attr-defined]
        if not count:
            self._eof = True
            return False
        self._end += count
        self.bytes_read += count
        return True

    def read_data(self, size: int) -> bytes:
        if self._end - self._start >= size and size <= self._data_left:  # one copy
            data = bytes(self._view[self._start:self._start + size])
            self._start += size
            self._data_left -= size
            return data
        return b"".join(bytes(piece) for piece in self.chunks(size))

    @property
    def data_left(self) -> int:
        return self._data_left

    def next(self) -> TarHeader | None:
        """The next member's header with its extensions applied; None at the end."""
        self._end_member()
        recorder = self._recorder
        self._skip(self._padding_left, may_end=True)  # a missing last padding is accepted
        self._padding_left = 0
        pax: dict[str, bytes] = {}
        long_name: str | None = None
        long_link: str | None = None
        for _ in range(MAX_CHAINED_EXTENSIONS):
            block = self._take(BLOCK)
            if block is None:
                if recorder is not None:
                    self._hand_over()
                return None  # a clean end without end-of-archive blocks
            if block == ZERO_BLOCK:
                self._end_of_archive()
                return None
            header = parse_header(block)
            raw_size = header.size
            if header.typeflag in (PAX_LOCAL, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK):
                if header.size > MAX_EXTENDED_HEADER:
                    raise TarFormatError(f"an extended header of {header.size} bytes")
                data = self._member_data(header.size)
                if header.typeflag == PAX_LOCAL:
                    pax.update(parse_pax(data))
                elif header.typeflag == GNU_LONGNAME:
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif header.typeflag == GNU_LONGLINK:
                    long_link = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue  # a global PAX header applies to nothing we keep
            if long_name is not None:
                header.name = long_name
            if long_link is not None:
                header.linkname = long_link
            apply_pax(header, pax)
            check_ranges(header)
            if "size" in pax and raw_size and header.size != raw_size:
                raise TarFormatError(
                    f"PAX size {header.size} contradicts the header's size {raw_size}")
            if header.typeflag == GNU_SPARSE and block[482]:
                self._read_gnu_sparse_extensions(header, block)
            self._data_left = header.size
            self._padding_left = -header.size % BLOCK
            if recorder is not None:
                recorder.begin_file(header.name, header.size, header.sparse is not None,
                                    self._view[self._mark:self._start])
                self._mark = self._start
            if header.sparse == [] and "GNU.sparse.major" in pax:
                self._read_sparse_map(header)
            return header
        raise TarFormatError(f"more than {MAX_CHAINED_EXTENSIONS} extended headers in a row")

    def _member_data(self, size: int) -> bytes:
        self._data_left = size
        data = self.read_data(size)
        self._skip(-size % BLOCK, may_end=False)
        return data

    def _read_gnu_sparse_extensions(self, header: TarHeader, block: bytes) -> None:
        assert header.sparse is not None
        while gnu_sparse_is_extended(block):
            extension = self._take(BLOCK)
            if extension is None:
                raise TarFormatError("the archive ends inside a sparse map")
            header.sparse.extend(parse_gnu_sparse_entries(extension[:504]))
            block = extension[:482] + extension[504:505] + extension[483:]
            if len(header.sparse) > 1 << 20:
                raise TarFormatError("a sparse map of more than a million segments")

    def _read_sparse_map(self, header: TarHeader) -> None:
        """GNU sparse 1.0 keeps its map in the first blocks of the data: parsed as it is
        read, block by block, once."""
        parser = SparseMapParser(min(header.size, MAX_EXTENDED_HEADER))
        try:
            while not parser.feed(self.read_data(BLOCK)):
                pass
        except TarFormatError as error:
            raise TarFormatError(f"entry {header.name!r}: {error}") from None
        header.sparse = parser.segments
        header.size -= parser.used

    def _end_of_archive(self) -> None:
        """After one zero block: a second one (or the stream's end) ends the archive, and
        whatever follows is drained and ignored."""
        block = self._take(BLOCK)
        if block is not None and block != ZERO_BLOCK:
            raise TarFormatError("a zero block in the middle of the archive")
        if self._recorder is not None:
            self._hand_over()
        while self._fill():
            if self._recorder is not None:  # kept: the layer's digest covers it
                self._recorder.consume_trailing(self._view[self._start:self._end])
            self._start = self._mark = self._end
