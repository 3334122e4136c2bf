"""The sample image the repository ships (aufs/data/sample-image.tar), made by this code.

Two layers, deterministic to the byte: a small base tree, then a layer with a modified file,
a new file, a whiteout and an opaque directory. `python -m aufs.cli.samples OUT` rebuilds it; a
test checks that the shipped file is exactly what this code makes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import zlib
from importlib import resources

from aufs.archive.format import (
    DIRECTORY,
    REGULAR,
    SYMLINK,
    ZERO_BLOCK,
    TarHeader,
    build_header,
    padding,
)

MTIME = 1_700_000_000 * 1_000_000_000
Entry = tuple[str, bytes, bytes, str]  # (name, typeflag, content, link target)

BASE: list[Entry] = [
    ("etc/", DIRECTORY, b"", ""),
    ("etc/motd", REGULAR, b"Welcome to the aufs sample image.\n", ""),
    ("etc/hostname", REGULAR, b"sample\n", ""),
    ("app/", DIRECTORY, b"", ""),
    ("app/config.txt", REGULAR, b"mode=base\n", ""),
    ("app/cache/", DIRECTORY, b"", ""),
    ("app/cache/old-1.bin", REGULAR, b"stale cache entry 1\n", ""),
    ("app/cache/old-2.bin", REGULAR, b"stale cache entry 2\n", ""),
    ("app/obsolete.txt", REGULAR, b"this file is deleted by the second layer\n", ""),
    ("app/current", SYMLINK, b"", "config.txt"),
]
UPDATE: list[Entry] = [
    ("app/", DIRECTORY, b"", ""),
    ("app/config.txt", REGULAR, b"mode=updated\n", ""),
    ("app/.wh.obsolete.txt", REGULAR, b"", ""),
    ("app/cache/", DIRECTORY, b"", ""),
    ("app/cache/.wh..wh..opq", REGULAR, b"", ""),
    ("app/cache/fresh.bin", REGULAR, b"the only cache entry after the update\n", ""),
    ("app/new.txt", REGULAR, b"added by the second layer\n", ""),
]


def layer_tar(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    for name, kind, content, target in entries:
        mode = 0o755 if kind == DIRECTORY else 0o644
        if name.rpartition("/")[2].startswith(".wh."):
            mode = 0o600
        out.write(build_header(TarHeader(name=name, typeflag=kind, mode=mode, size=len(content),
                                         mtime_ns=MTIME, linkname=target)))
        out.write(content + padding(len(content)))
    out.write(ZERO_BLOCK * 2)
    return out.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with no name and a zero mtime, so the bytes never vary."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def build_sample_image() -> bytes:
    """The OCI image layout, as a tar, of the sample image tagged "sample"."""
    blobs: dict[str, bytes] = {}

    def add(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest

    layers = [layer_tar(BASE), layer_tar(UPDATE)]
    compressed = [gzip_bytes(layer) for layer in layers]
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/sh"], "WorkingDir": "/app"},
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()
                                for layer in layers]},
        "history": [{"created_by": "aufs.samples: base"},
                    {"created_by": "aufs.samples: update"}],
    }, sort_keys=True, separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": add(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": add(blob), "size": len(blob)} for blob in compressed],
    }, sort_keys=True, separators=(",", ":")).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": add(manifest),
        "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "sample"}}]},
        sort_keys=True).encode()
    files = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]
    files += [(f"blobs/sha256/{digest[7:]}", data) for digest, data in sorted(blobs.items())]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME // 1_000_000_000, 0o644
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def shipped_sample_path() -> str:
    return str(resources.files("aufs") / "data" / "sample-image.tar")


if __name__ == "__main__":
    destination = sys.argv[1] if len(sys.argv) > 1 else shipped_sample_path()
    with open(destination, "wb") as handle:
        handle.write(build_sample_image())
    print(f"wrote {destination} ({os.path.getsize(destination)} bytes)")
