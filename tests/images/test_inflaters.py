"""The gzip inflater: ISA-L's when the `fast` extra is installed, else zlib; both give the
same bytes, through the same decompressing reader, for every gzip a layer can be."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import random
import subprocess
import sys
import zlib

import pytest

from aufs.images import inflaters
from aufs.images.compression import CompressionError, DecompressingReader

HAS_ISAL = importlib.util.find_spec("isal") is not None
NAMES = ["zlib", pytest.param("isal", marks=pytest.mark.skipif(
    not HAS_ISAL, reason="isal is not installed (pip install 'aufs[fast]')"))]


def payload(size: int = 3 << 20, seed: int = 15) -> bytes:
    """Compressible and incompressible runs, like a layer tar."""
    rng = random.Random(seed)
    parts = []
    while sum(map(len, parts)) < size:
        parts.append(rng.randbytes(rng.randint(1, 70_000)) if rng.random() < 0.3
                     else bytes([rng.randint(0, 255)]) * rng.randint(1, 200_000))
    return b"".join(parts)[:size]


def blobs() -> dict[str, tuple[bytes, bytes]]:
    """name -> (gzip blob, its content): one member, several members (pigz -i, concatenated
    layers), the zero padding some registries add, an empty member, level 1 and 9."""
    data = payload()
    first, second = data[: len(data) // 3], data[len(data) // 3:]
    return {
        "one member": (gzip.compress(data, 6), data),
        "two members": (gzip.compress(first) + gzip.compress(second), data),
        "zero padded": (gzip.compress(data) + b"\0" * 1024, data),
        "empty member": (gzip.compress(b"") + gzip.compress(data, 1), data),
        "level 9": (gzip.compress(data, 9), data),
    }


def decompression_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (zlib.error, CompressionError)
    if HAS_ISAL:
        from isal import isal_zlib  # type: ignore[import-not-found, unused-ignore]
        errors += (isal_zlib.error,)
    return errors


def read_all(blob: bytes, chunk: int) -> tuple[bytes, DecompressingReader]:
    class Chunked(io.BytesIO):  # a source that hands out odd-sized pieces
        def read(self, size: int | None = -1) -> bytes:
            return super().read(chunk)

    reader = DecompressingReader(Chunked(blob))  # type: ignore[arg-type]
    out = bytearray()
    buffer = memoryview(bytearray(1 << 16))
    while count := reader.readinto(buffer):
        out += buffer[:count]
    reader.close()
    return bytes(out), reader


@pytest.fixture(params=NAMES)
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
             ) -> inflaters.Inflater:
    chosen = inflaters.select_inflater(request.param)
    monkeypatch.setattr(inflaters, "GZIP_INFLATER", chosen)
    return chosen


@pytest.mark.parametrize("name", sorted(blobs()))
@pytest.mark.parametrize("chunk", [1 << 20, 4093])
def test_every_inflater_gives_the_same_bytes_and_digests(
        inflater: inflaters.Inflater, name: str, chunk: int) -> None:
    blob, content = blobs()[name]
    out, reader = read_all(blob, chunk)
    assert out == content
    assert reader.stored_hash.hexdigest() == hashlib.sha256(blob).hexdigest()
    assert reader.content_hash.hexdigest() == hashlib.sha256(content).hexdigest()


def test_the_decompressor_comes_from_the_chosen_inflater(inflater: inflaters.Inflater) -> None:
    made = inflaters.new_gzip_decompressor()
    expected = zlib.decompressobj().__class__ if inflater.name == "zlib" else None
    if expected is not None:
        assert isinstance(made, expected)
    else:
        assert type(made).__module__.startswith("isal")
    assert made.decompress(gzip.compress(b"abc")) == b"abc" and made.eof


def test_a_truncated_stream_is_refused(inflater: inflaters.Inflater) -> None:
    blob, _ = blobs()["one member"]
    with pytest.raises(CompressionError, match="ends early"):
        read_all(blob[: len(blob) // 2], 1 << 20)


def test_corrupt_data_is_refused(inflater: inflaters.Inflater) -> None:
    blob = bytearray(blobs()["one member"][0])
    blob[len(blob) // 2: len(blob) // 2 + 64] = os.urandom(64)
    with pytest.raises(decompression_errors()):
        read_all(bytes(blob), 1 << 20)


def test_isal_is_preferred_and_zlib_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    if HAS_ISAL:
        assert inflaters.select_inflater().name == "isal"

    def missing() -> inflaters.Inflater:
        raise inflaters.InflaterUnavailableError("isal is not installed")

    monkeypatch.setitem(inflaters._LOADERS, "isal", missing)
    assert inflaters.select_inflater().name == "zlib"
    with pytest.raises(inflaters.InflaterUnavailableError):
        inflaters.select_inflater("isal")
    with pytest.raises(ValueError, match="unknown inflater"):
        inflaters.select_inflater("zopfli")


@pytest.mark.parametrize("wanted", ["zlib", "isal", "bogus"])
def test_aufs_inflater_chooses_at_import(wanted: str) -> None:
    if wanted == "isal" and not HAS_ISAL:
        pytest.skip("isal is not installed (pip install 'aufs[fast]')")
    result = subprocess.run(
        [sys.executable, "-c", "from aufs.images import inflaters; "
         "print(inflaters.GZIP_INFLATER.name)"],
        capture_output=True, text=True, check=True, env=dict(os.environ, AUFS_INFLATER=wanted))
    expected = inflaters.select_inflater().name if wanted == "bogus" else wanted
    assert result.stdout.strip() == expected
    assert ("unknown inflater" in result.stderr) == (wanted == "bogus")


def test_the_reader_takes_its_gzip_decompressors_from_inflaters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made = []

    def counting() -> object:
        made.append(zlib.decompressobj(inflaters.GZIP_WBITS))
        return made[-1]

    monkeypatch.setattr(inflaters, "GZIP_INFLATER", inflaters.Inflater("test", "0", counting))
    blob, content = blobs()["two members"]
    assert read_all(blob, 1 << 20)[0] == content
    assert len(made) == 2  # one per gzip member


def test_the_content_is_hashed_on_the_readers_thread_not_the_inflaters() -> None:
    """Inflating and hashing on one thread made that thread the import's bottleneck; the
    reader, which unpacks, had time to spare."""
    import threading

    blob, content = blobs()["one member"]
    reader = DecompressingReader(io.BytesIO(blob))
    threads = set()

    class Recording:
        def __init__(self) -> None:
            self.inner = hashlib.sha256()

        def update(self, data: bytes) -> None:
            threads.add(threading.get_ident())
            self.inner.update(data)

    reader.content_hash = Recording()  # type: ignore[assignment]
    reader.drain()
    reader.close()
    assert threads == {threading.get_ident()}
    assert reader.content_hash.inner.hexdigest() == hashlib.sha256(content).hexdigest()  # type: ignore[attr-defined]
