"""Damaged and hostile layer blobs: each becomes one line naming the blob, what is wrong and
what to do, with exit status 1 and nothing stored; data after the archive ends is drained, not
waited on forever; and a decompression bomb streams through in bounded memory.

Garbage appended after a complete gzip or zstd stream is refused by the decompressor (as Go
and Docker do; zero padding after gzip is tolerated), and the blob's digest covers it anyway:
an image whose manifest names the blob's digest never accepts it. Behind an uncompressed tar,
trailing bytes are ignored by the tar reader (the README promises it), and the diff_id, which
covers every byte, refuses them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import threading
import zlib
from pathlib import Path

import pytest
from registries import FakeRegistry, real_registry

import aufs
from aufs.archive.reader import TarReader
from aufs.images import Catalog, import_images
from aufs.images.compression import DecompressingReader
from aufs.images.push import push
from conftest import FIXTURES, IS_ROOT
from tarbuild import archive, directory, member

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="importing layers with their owners needs root"),
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
         "none": "application/vnd.oci.image.layer.v1.tar"}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar() -> bytes:
    noise = random.Random(16).randbytes(96 * 1024)  # stored deflate blocks
    text = b"".join(b"line %d of a text file\n" % i for i in range(4000))  # real deflate
    return archive([directory("etc"), member("etc/noise", data=noise),
                    member("etc/text", data=text), member("etc/hosts", data=b"127.0.0.1\n")])


def compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        zstandard = pytest.importorskip("zstandard", reason="the zstd extra is not installed")
        return bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    return data


def write_layout(path: Path, diff_id: str, blob: bytes, media: str, *,
                 blob_digest: str | None = None, blob_size: int | None = None) -> None:
    """An OCI layout whose tag `latest` has one layer: `blob`, declared with the digest and
    size of the undamaged blob when they are given."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, digest: str | None = None) -> str:
        digest = digest or digest_of(data)
        (blobs / digest[7:]).write_bytes(data)
        return digest

    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config), "size": len(config)},
        "layers": [{"mediaType": media, "digest": put(blob, blob_digest),
                    "size": len(blob) if blob_size is None else blob_size}],
    }).encode()
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": put(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))


def write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_docker_archive(path: Path, diff_id: str, blob: bytes) -> None:
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = [{"Config": config_name, "RepoTags": ["hostile:latest"],
                 "Layers": ["layer0/layer.tar"]}]
    write_tar(path, {"manifest.json": json.dumps(manifest).encode(), config_name: config,
                     "layer0/layer.tar": blob})


def run(root: Path, *arguments: str, timeout: float | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aufs", "--root", str(root), "--backend", "overlay", *arguments],
        capture_output=True, text=True, cwd="/", timeout=timeout,
        env=dict(os.environ, PYTHONWARNINGS="ignore"))


def assert_nothing_stored(root: Path) -> None:
    assert json.loads(run(root, "ls", "--json").stdout) == []
    assert aufs.Driver(root, backend="overlay").layer_ids() == []
    configs = root / "images" / "configs"
    assert not configs.exists() or not any(configs.iterdir())


def damage(blob: bytes, how: str) -> bytes:
    data = bytearray(blob)
    if how == "header":
        data[3] ^= 0xFF
    elif how == "middle":
        data[len(data) // 2] ^= 0xFF
    elif how == "trailer":
        data[-4] ^= 0xFF
    elif how == "truncated":
        del data[len(data) * 2 // 3:]
    elif how == "appended":
        data += b"garbage!" * 128
    return bytes(data)


KINDS = ["gzip", "zstd", "none"]
DAMAGE = ["header", "middle", "trailer", "truncated", "appended"]


def assert_one_line(result: subprocess.CompletedProcess[str], name: str) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("aufs: error: ") and name in line, line
    assert "again" in line  # what to do
    return line


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", ["oci-dir", "oci-tar", "docker-archive"])
def test_a_damaged_blob_is_one_line_and_stores_nothing(scratch: Path, source: str, kind: str,
                                                       how: str) -> None:
    content = layer_tar()
    blob = compress(kind, content)
    damaged = damage(blob, how)
    assert damaged != blob
    layout = scratch / "layout"
    if source == "docker-archive":
        target = scratch / "docker.tar"
        write_docker_archive(target, digest_of(content), damaged)
        name = digest_of(content)  # a docker archive names its layers by diff_id only
    else:
        write_layout(layout, digest_of(content), damaged, MEDIA[kind],
                     blob_digest=digest_of(blob), blob_size=len(blob))
        target = layout
        name = digest_of(blob)
        if source == "oci-tar":
            target = scratch / "oci.tar"
            write_tar(target, {str(p.relative_to(layout)): p.read_bytes()
                               for p in sorted(layout.rglob("*")) if p.is_file()})
    root = scratch / "root"
    line = assert_one_line(run(root, "import", f"{target}:latest", "--tag", "t"), name)
    if source != "docker-archive":
        assert f"sha256 mismatch: expected {digest_of(blob)} got {digest_of(damaged)}" in line
    assert_nothing_stored(root)


@pytest.fixture
def fake() -> FakeRegistry:
    registry = FakeRegistry()
    yield registry
    registry.close()


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_blob_in_a_pull_is_one_line_and_stores_nothing(
        scratch: Path, fake: FakeRegistry, kind: str, how: str) -> None:
    content = layer_tar()
    blob = compress(kind, content)
    layout = scratch / "layout"
    write_layout(layout, digest_of(content), blob, MEDIA[kind])
    fake.load_layout(layout, "latest")
    fake.blobs[digest_of(blob)] = damage(blob, how)
    root = scratch / "root"
    line = assert_one_line(run(root, "pull", f"{fake.address}/hostile/image:latest"),
                           digest_of(blob))
    if how in ("truncated", "appended"):
        assert "bytes" in line  # the declared size is enforced before any digest
    else:
        assert f"sha256 mismatch: expected {digest_of(blob)}" in line
    assert_nothing_stored(root)


def test_a_good_blob_with_zero_padding_after_gzip_imports(scratch: Path) -> None:
    content = layer_tar()
    blob = compress("gzip", content) + bytes(512)
    write_layout(scratch / "layout", digest_of(content), blob, MEDIA["gzip"])
    result = run(scratch / "root", "import", f"{scratch / 'layout'}:latest", "--tag", "t")
    assert result.returncode == 0, result.stderr


# ---- data after the end of the archive, and a closed stream ---------------------------------


def test_data_after_the_archive_is_drained_not_waited_on(scratch: Path) -> None:
    """A gzip layer holding a tar and then 16 MiB of other bytes hung forever: the tar
    reader's full buffer read zero bytes, took that for the end, and the importer then waited
    for a producer that had stopped. The timeout only turns a hang into a failure."""
    content = archive([member("a.txt", data=b"hello")]) + random.Random(5).randbytes(16 << 20)
    write_layout(scratch / "layout", digest_of(content), gzip.compress(content, 1),
                 MEDIA["gzip"])
    result = run(scratch / "root", "import", f"{scratch / 'layout'}:latest", "--tag", "t",
                 timeout=600)
    assert result.returncode == 0, result.stderr


def test_the_tar_reader_reads_past_a_full_buffer() -> None:
    content = archive([member("a.txt", data=b"hello")])
    stream = io.BytesIO(content + bytes(range(256)) * 64)  # trailing data after the archive
    reader = TarReader(stream, buffer_size=len(content))  # the buffer ends full
    assert reader.next() is not None
    assert reader.next() is None
    assert stream.tell() == len(stream.getvalue())  # drained to the end


def test_reading_a_closed_decompressing_reader_never_blocks() -> None:
    stream = DecompressingReader(io.BytesIO(gzip.compress(bytes(8 << 20))))
    stream.close()
    outcome: list[BaseException | None] = []

    def drain() -> None:
        try:
            stream.drain()
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    thread.join(120)  # only a hang takes this long
    assert not thread.is_alive(), "drain() blocked on a stopped producer"
    assert isinstance(outcome[0], ValueError)


# ---- a decompression bomb ---------------------------------------------------------------------


def gzip_bomb_layout(path: Path, size: int) -> None:
    """One layer: a tar with one file of `size` zero bytes, gzipped (about 1 MiB per GiB),
    built in pieces so the test itself stays small."""
    info = tarfile.TarInfo("zeros")
    info.size = size
    info.mtime = 1_700_000_000
    header = info.tobuf(tarfile.PAX_FORMAT)
    tail = bytes(-size % 512) + bytes(1024)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    content_hash = hashlib.sha256(header)
    pieces = [compressor.compress(header)]
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        content_hash.update(zeros)
        pieces.append(compressor.compress(zeros))
    content_hash.update(tail)
    pieces += [compressor.compress(tail), compressor.flush()]
    write_layout(path, "sha256:" + content_hash.hexdigest(), b"".join(pieces), MEDIA["gzip"])


# Linux carries a process's peak RSS across execve, so a child of this (large) test process
# would report our peak. A small launcher starts the import and reads its child's peak with
# getrusage(RUSAGE_CHILDREN): that child inherits only the launcher's few MB.
LAUNCHER = """
import resource, subprocess, sys
status = subprocess.run([sys.executable, "-m", "aufs", *sys.argv[1:]]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(status)
"""


def test_a_gzip_bomb_imports_in_bounded_memory(scratch: Path) -> None:
    """1 GiB of zeros in a 1 MiB gzip layer peaked at 2 GiB of RSS (a capability
    measurement, not a timing)."""
    layout = scratch / "layout"
    gzip_bomb_layout(layout, 1 << 30)
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, "--root", str(scratch / "root"), "--backend", "overlay",
         "import", f"{layout}:latest", "--tag", "bomb"],
        capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stdout.split()[-1])
    print(f"peak RSS of the import: {peak_kib} KiB")
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB"
    store = aufs.Driver(scratch / "root", backend="overlay")
    (layer,) = store.layer_ids()
    assert os.path.getsize(Path(store.store.diff_path(layer)) / "zeros") == 1 << 30


@pytest.mark.skipif(shutil.which("docker-registry") is None,
                    reason="docker-registry is not installed (apt-get install docker-registry)")
def test_a_blob_damaged_in_a_real_registry(scratch: Path) -> None:
    """Distribution serves what its storage holds: flip a byte of a stored layer blob, and
    the pull says so in one line and stores nothing."""
    source = aufs.Driver(scratch / "source", backend="overlay")
    catalog = Catalog(source.store)
    import_images(source, catalog, f"{FIXTURES / 'oci-sample'}:base", tag="base")
    with real_registry(scratch / "registry") as registry:
        pushed = push(source, catalog, "base", f"{registry}/peers/sample:base")
        layer = next(digest for digest in pushed.uploaded
                     if digest_is_layer(scratch / "registry", digest))
        data = blob_file(scratch / "registry", layer)
        damaged = bytearray(data.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        data.write_bytes(bytes(damaged))
        root = scratch / "root"
        line = assert_one_line(run(root, "pull", f"{registry}/peers/sample:base"), layer)
    assert f"sha256 mismatch: expected {layer}" in line
    assert_nothing_stored(root)


def blob_file(registry: Path, digest: str) -> Path:
    hex_part = digest[7:]
    return (registry / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" /
            hex_part[:2] / hex_part / "data")


def digest_is_layer(registry: Path, digest: str) -> bool:
    return blob_file(registry, digest).read_bytes()[:2] == b"\x1f\x8b"  # gzip: not the config
