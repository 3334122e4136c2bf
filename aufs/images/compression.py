"""Layer compression: recognise gzip, zstd or none, and decompress while reading.

gzip goes through aufs.images.inflaters (ISA-L when the `fast` extra is installed, else zlib).
Decompression and both digests run on a thread of their own: zlib and hashlib release the
GIL, so they overlap with unpacking on the other core (faster here than a gzip child
process). zstd needs the optional `zstandard` package (`pip install aufs[zstd]`).
Compression for export goes through `pigz`/`gzip` when present.
"""

from __future__ import annotations

import hashlib
import io
import queue
import shutil
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO, cast

from aufs.errors import AufsError
from aufs.images import inflaters

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class CompressionError(AufsError):
    """A layer is compressed in a way this machine cannot read."""


def detect(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith((b"BZh", b"\xfd7zXZ\x00")):
        raise CompressionError("bzip2 and xz layers are not supported; recompress with gzip")
    return "none"


# Every decompression step yields at most STEP bytes, whatever the ratio: a 1 MiB gzip of
# 1 GiB of zeros streams through in STEP-sized pieces. The queue holds at most QUEUE of them.
STEP = 1 << 18
QUEUE = 8
READ = 1 << 20
_INPUT_SLICE = 1 << 16  # compressed input per zlib call: its unconsumed tail is copied each step


class _RawBlob:
    """The stored bytes of a blob as a file, hashed and counted as they are read."""

    def __init__(self, source: BinaryIO, head: bytes, owner: DecompressingReader,
                 on_bytes: Callable[[int], None] | None) -> None:
        self._source = source
        self._head = head
        self._owner = owner
        self._on_bytes = on_bytes

    def read(self, size: int = READ) -> bytes:
        if self._owner._stop.is_set():
            return b""
        if self._head:
            chunk, self._head = self._head, b""
        else:
            chunk = self._source.read(min(size, READ) if size > 0 else READ)
        if chunk:
            self._owner.stored_hash.update(chunk)
            self._owner.stored_bytes += len(chunk)
            if self._on_bytes is not None:
                self._on_bytes(len(chunk))
        return chunk

    def chunks(self) -> Iterator[bytes]:
        while chunk := self.read(READ):
            yield chunk


def _gunzip(raw: _RawBlob) -> Iterator[bytes]:
    """gzip, every member, in pieces of at most STEP bytes. Zero bytes after the last member
    are ignored (some writers pad); anything else there is an error, as in Go and Docker."""
    inflater = inflaters.new_gzip_decompressor()
    ended = padded = False
    for chunk in raw.chunks():
        for start in range(0, len(chunk), _INPUT_SLICE):
            data = chunk[start:start + _INPUT_SLICE]
            while True:
                if ended:
                    if not data.strip(b"\0"):
                        padded = padded or bool(data)
                        break
                    if padded or not data.startswith(GZIP_MAGIC[:1]):
                        raise CompressionError("garbage after the end of the gzip stream")
                    inflater = inflaters.new_gzip_decompressor()
                    ended = False
                try:
                    out = inflater.decompress(data, STEP)
                except inflaters.ERRORS as error:
                    raise CompressionError(_zlib_problem(error)) from None
                if out:
                    yield out
                if inflater.eof:
                    ended, data = True, inflater.unused_data
                    continue
                data = inflater.unconsumed_tail
                if not data and len(out) < STEP:
                    break
    if not ended:
        raise CompressionError("truncated: the gzip stream ends early")


def _zlib_problem(error: Exception) -> str:
    text = str(error)
    if "incorrect data check" in text or "Incorrect checksum" in text:
        return "gzip data check failed (CRC-32)"
    if "incorrect length check" in text or "Incorrect length" in text:
        return "gzip length check failed"
    return f"gzip data is corrupt ({text.split(': ', 1)[-1]})"


def _unzstd(raw: _RawBlob) -> Iterator[bytes]:
    """zstd, every frame, in pieces of at most STEP bytes."""
    try:
        import zstandard  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise CompressionError("this layer is zstd-compressed: install the zstd extra "
                               "(pip install 'aufs[zstd]')") from None
    reader = zstandard.ZstdDecompressor().stream_reader(
        cast(BinaryIO, raw), read_size=_INPUT_SLICE, read_across_frames=True, closefd=False)
    while True:
        try:
            out = reader.read(STEP)
        except zstandard.ZstdError as error:
            raise CompressionError(f"zstd data is corrupt ({error})") from None
        if not out:
            return
        yield bytes(out)


def decompressed(kind: str, raw: _RawBlob) -> Iterator[bytes]:
    if kind == "gzip":
        return _gunzip(raw)
    if kind == "zstd":
        return _unzstd(raw)
    return raw.chunks()


class DecompressingReader(io.RawIOBase):
    """The uncompressed stream of a blob. A thread reads the blob, hashes it and inflates
    it (zlib, ISA-L and hashlib release the GIL); the reader's thread hashes what it takes
    and unpacks. The two digests are ready once the stream has been read to its end. Reads
    never wait on a producer that has stopped: after close() they raise."""

    def __init__(self, source: BinaryIO, on_bytes: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.stored_hash = hashlib.sha256()
        self.content_hash = hashlib.sha256()
        self.stored_bytes = 0
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(QUEUE)
        self._pending = memoryview(b"")
        self._finished = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source, on_bytes),
                                        name="aufs-decompress", daemon=True)
        self._thread.start()

    def _run(self, source: BinaryIO, on_bytes: Callable[[int], None] | None) -> None:
        try:
            head = source.read(READ)
            raw = _RawBlob(source, head, self, on_bytes)
            for piece in decompressed(detect(head[:4]), raw):
                if self._stop.is_set():
                    return
                self._put(piece)
            self._put(None)
        except BaseException as error:  # handed to the reader
            self._put(error)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            if self._finished:
                return 0
            item = self._next_item()
            if item is None:
                self._finished = True
                return 0
            if isinstance(item, BaseException):
                self._finished = True
                raise item
            # hashed here, on the reader's thread: the inflating thread is the slower of
            # the two (hash and inflate there took 0.9 s of CPU against 0.4 s of unpacking
            # for the Debian image), and hashlib releases the GIL
            self.content_hash.update(item)
            self._pending = memoryview(item)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def _next_item(self) -> bytes | BaseException | None:
        while True:
            if self._stop.is_set():
                raise ValueError("read from a closed DecompressingReader")
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise CompressionError("the decompressing thread ended without a "
                                           "result") from None

    def drain(self) -> None:
        """Reads what is left, so that both digests cover the whole blob."""
        scratch = memoryview(bytearray(1 << 20))
        while self.readinto(scratch):
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        super().close()


def gzip_stream(source: BinaryIO, destination: BinaryIO, level: int = 6) -> None:
    """Compresses source into destination as gzip (a helper process when one is present)."""
    binary = shutil.which("pigz") or shutil.which("gzip")
    if binary is None:
        compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        while chunk := source.read(1 << 20):
            destination.write(compressor.compress(chunk))
        destination.write(compressor.flush())
        return
    with subprocess.Popen([binary, f"-{level}", "-c", "-n"], stdin=subprocess.PIPE,
                          stdout=destination) as process:
        assert process.stdin is not None
        with process.stdin:
            while chunk := source.read(1 << 20):
                process.stdin.write(chunk)
    if process.returncode != 0:
        raise CompressionError(f"{binary} exited with {process.returncode}")


def zstd_stream(source: BinaryIO, destination: BinaryIO, level: int = 3) -> None:
    """Compresses source into destination as zstd (the zstd extra)."""
    try:
        import zstandard  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise CompressionError("zstd needs the zstd extra (pip install 'aufs[zstd]')") from None
    zstandard.ZstdCompressor(level=level).copy_stream(source, destination)
