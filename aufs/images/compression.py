"""Layer compression: recognise gzip, zstd or none, and decompress while reading.

gzip goes through the `pigz`/`gzip` binary when present, so that decompression runs on the
other core while this process unpacks; Python's zlib is the fallback. zstd needs the
optional `zstandard` package (`pip install aufs[zstd]`).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import threading
import zlib
from collections.abc import Iterator
from typing import BinaryIO, cast

from aufs.errors import AufsError

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


class _ZlibReader(io.RawIOBase):
    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self._source = source
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            if self._inflate.eof:
                unused = self._inflate.unused_data
                if not unused.strip(b"\0"):
                    return 0
                self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # another member
                self._pending = self._inflate.decompress(unused, 1 << 20)
                continue
            data = self._inflate.unconsumed_tail or self._source.read(1 << 20)
            if not data:
                raise CompressionError("the gzip stream ends early")
            self._pending = self._inflate.decompress(data, 1 << 20)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


class _ProcessReader(io.RawIOBase):
    """Decompresses with a helper process; a thread feeds it the compressed stream."""

    def __init__(self, command: list[str], source: BinaryIO) -> None:
        super().__init__()
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
        self._feed_error: BaseException | None = None
        self._feeder = threading.Thread(target=self._feed, args=(source,), daemon=True)
        self._feeder.start()

    def _feed(self, source: BinaryIO) -> None:
        assert self._process.stdin is not None
        try:
            while chunk := source.read(1 << 20):
                self._process.stdin.write(chunk)
        except BrokenPipeError:
            pass
        except BaseException as error:  # handed to the reader
            self._feed_error = error
        finally:
            with contextlib.suppress(OSError):
                self._process.stdin.close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        assert self._process.stdout is not None
        count = self._process.stdout.readinto(buffer)  # type: ignore[attr-defined]
        if not count:
            self._feeder.join()
            if self._feed_error is not None:
                raise self._feed_error
            status = self._process.wait()
            if status != 0:
                message = self._process.stderr.read().decode(errors="replace").strip() \
                    if self._process.stderr else ""
                raise CompressionError(f"decompression failed: {message or status}")
        return count or 0

    def close(self) -> None:
        if not self.closed:
            for stream in (self._process.stdout, self._process.stderr):
                if stream is not None:
                    stream.close()
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._feeder.join()
        super().close()


@contextlib.contextmanager
def decompressed(source: BinaryIO) -> Iterator[BinaryIO]:
    """The uncompressed stream of a layer blob, whatever its compression."""
    if not hasattr(source, "peek"):
        source = cast(BinaryIO, io.BufferedReader(cast(io.RawIOBase, source), 1 << 20))
    peek = source.peek(4)[:4]  # type: ignore[attr-defined]
    kind = detect(peek)
    if kind == "none":
        yield source
        return
    if kind == "gzip":
        binary = shutil.which("pigz") or shutil.which("gzip")
        raw: io.RawIOBase = (_ProcessReader([binary, "-dc"], source) if binary
                             else _ZlibReader(source))
    else:
        try:
            import zstandard  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            raise CompressionError("this layer is zstd-compressed: install the zstd extra "
                                   "(pip install 'aufs[zstd]')") from None
        raw = cast(io.RawIOBase,
                   zstandard.ZstdDecompressor().stream_reader(source, read_size=1 << 20))
    with raw, io.BufferedReader(raw, 1 << 20) as reader:
        yield cast(BinaryIO, reader)


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
