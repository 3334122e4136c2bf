"""Pulling an image from a registry straight into the store.

Blobs download in parallel (3 at a time by default) into spool files; each layer is applied
from its spool while it is still downloading, as soon as its parent is in place, and its
blob digest and diff_id are checked on the way (importer.add_layer). Layers already in the
store (same chain id) are not downloaded. An interrupted pull leaves no partial layer: the
next run fetches the missing layers only.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from aufs.images.catalog import Catalog
from aufs.images.digests import DigestMismatchError, buffered, chain_ids, parse_digest
from aufs.images.importer import ImportedImage, Progress, add_layer
from aufs.images.registry import Credentials, Reference, RegistryClient
from aufs.images.sources import ImageSourceError, LayerBlob, host_platform
from aufs.store.driver import Driver

log = logging.getLogger(__name__)

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")


class Spool:
    """A blob being downloaded to a file, readable while it grows."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._changed = threading.Condition()
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        open(path, "wb").close()

    def download(self, client: RegistryClient, descriptor: dict[str, Any]) -> None:
        try:
            response = client.open_blob(descriptor["digest"])
            expected = int(response.getheader("Content-Length") or -1)
            with open(self.path, "ab") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    out.flush()
                    with self._changed:
                        self.written += len(chunk)
                        self._changed.notify_all()
            size = descriptor.get("size")
            if (expected >= 0 and self.written != expected) or (
                    isinstance(size, int) and self.written != size):
                raise DigestMismatchError(
                    f"blob {descriptor['digest'][:19]}: {self.written} bytes arrived, "
                    f"{size if isinstance(size, int) else expected} were promised")
        except BaseException as error:  # handed to the reader
            with self._changed:
                self.error = error
        finally:
            with self._changed:
                self.done = True
                self._changed.notify_all()

    def abandon(self) -> None:
        """Nothing will read this spool any more."""
        with self._changed:
            self.done = True
            self._changed.notify_all()

    def reader(self) -> BinaryIO:
        return buffered(_SpoolReader(self))

    def wait(self, position: int) -> bool:
        """Blocks until more than `position` bytes exist or the download ended; True if
        there is more to read."""
        with self._changed:
            while self.written <= position and not self.done:
                self._changed.wait()
            if self.error is not None:
                raise self.error
            return self.written > position


class _SpoolReader(io.RawIOBase):
    def __init__(self, spool: Spool) -> None:
        super().__init__()
        self._spool = spool
        self._file = open(spool.path, "rb")  # noqa: SIM115 - closed in close()
        self._position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while True:
            count = self._file.readinto(buffer)
            if count:
                self._position += count
                return count
            if not self._spool.wait(self._position):
                return 0

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def choose_manifest(client: RegistryClient, body: bytes, media_type: str,
                    platform: str | None) -> tuple[bytes, str]:
    """The image manifest for this platform, when the reference names an index."""
    data = json.loads(body)
    if media_type not in INDEX_TYPES and "manifests" not in data:
        return body, media_type
    wanted = tuple(platform.split("/")) if platform else host_platform()
    for descriptor in data.get("manifests", []):
        found = descriptor.get("platform", {})
        key = (found.get("os"), found.get("architecture"))
        if key == wanted[:2] and (len(wanted) < 3 or found.get("variant") == wanted[2]):
            manifest, manifest_type, _ = client.get_manifest(descriptor["digest"])
            _check_digest(manifest, descriptor["digest"], "the platform's manifest")
            return manifest, manifest_type
    platforms = [d.get("platform", {}) for d in data.get("manifests", [])]
    available = sorted({f"{p.get('os')}/{p.get('architecture')}" for p in platforms})
    raise ImageSourceError(f"no image for {'/'.join(wanted)} in the index; it has {available} "
                           "(choose one with --platform)")


def _check_digest(body: bytes, digest: str, what: str) -> None:
    found = "sha256:" + hashlib.sha256(body).hexdigest()
    if found != f"sha256:{parse_digest(digest)}":
        raise DigestMismatchError(f"{what} is {found}, not {digest}: the registry served "
                                  "other content than it promised")


def pull(driver: Driver, catalog: Catalog, reference: str, tag: str | None = None, *,
         platform: str | None = None, credentials: Credentials | None = None,
         insecure: bool = False, jobs: int = 3,
         progress: Progress | None = None) -> ImportedImage:
    ref = Reference.parse(reference)
    client = RegistryClient(ref, credentials, insecure)
    body, media_type, served_digest = client.get_manifest(ref.name)
    if ref.digest:
        _check_digest(body, ref.digest, "the manifest")
    elif served_digest:
        _check_digest(body, served_digest, "the manifest")
    manifest_bytes, _ = choose_manifest(client, body, media_type, platform)
    manifest = json.loads(manifest_bytes)
    if manifest.get("schemaVersion") != 2 or "config" not in manifest:
        raise ImageSourceError(f"{ref}: only schema 2 (OCI or Docker) manifests are supported")
    config_descriptor = manifest["config"]
    response = client.open_blob(config_descriptor["digest"])
    config = response.read()
    _check_digest(config, config_descriptor["digest"], "the image config")
    diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    descriptors = manifest.get("layers", [])
    if len(diff_ids) != len(descriptors):
        raise ImageSourceError(f"{ref}: {len(descriptors)} layers but {len(diff_ids)} "
                               "diff_ids in the config")
    layers = chain_ids(diff_ids)
    missing = [index for index, layer in enumerate(layers) if not driver.exists(layer)]
    created: list[str] = []
    with driver.store.staging("pull") as staging, \
            ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="aufs-pull") as pool:
        spools = {}
        for index in missing:
            spools[index] = Spool(os.path.join(staging, f"blob{index}"))
            pool.submit(spools[index].download, client, descriptors[index])
        try:
            for index, layer in enumerate(layers):
                if index in spools:
                    spool = spools[index]
                    blob = LayerBlob(diff_ids[index], descriptors[index]["digest"],
                                     descriptors[index].get("size"), spool.reader,
                                     descriptors[index].get("mediaType"),
                                     f"{ref.registry}/{ref.repository}")
                    add_layer(driver, layer, layers[index - 1] if index else "", blob,
                              f"layer {index + 1} ({descriptors[index]['digest'][:19]})",
                              progress)
                    created.append(layer)
                    os.unlink(spool.path)  # applied: its disk space goes back now
                if progress is not None:
                    progress("layer", 1)
        except BaseException:
            for spool in spools.values():
                spool.abandon()
            raise
    config_digest = catalog.save_config(config)
    catalog.save_manifest(config_digest, manifest_bytes)
    name = tag or f"{ref.registry}/{ref.repository}:{ref.tag or 'latest'}"
    catalog.set_tag(name, layers[-1], config_digest)
    log.info("pulled %s: %d layers, %d fetched", ref, len(layers), len(created))
    return ImportedImage(name, layers[-1], tuple(layers), tuple(created), config_digest)

