"""Pulling an image from a registry straight into the store.

Blobs download in parallel (3 at a time by default) into spool files; each layer is applied
from its spool while it is still downloading, as soon as its parent is in place, and its
blob digest and diff_id are checked on the way (importer.add_layer). Layers already in the
store (same chain id) are not downloaded. An interrupted pull leaves no partial layer: the
next run fetches the missing layers only.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from aufs.images.catalog import Catalog
from aufs.images.digests import (
    CorruptBlobError,
    DigestMismatchError,
    buffered,
    chain_ids,
    parse_digest,
)
from aufs.images.importer import ImportedImage, Progress, add_layer
from aufs.images.registry import (
    MANIFEST_LIMIT,
    TIMEOUT,
    Credentials,
    Reference,
    RegistryClient,
    RegistryError,
)
from aufs.images.sources import ImageSourceError, LayerBlob, host_platform
from aufs.store.driver import Driver

log = logging.getLogger(__name__)

PULL_ADVICE = "the registry served damaged data: pull again, or tell the registry's owner"
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")


class Spool:
    """A blob being downloaded to a file, readable while it grows. It stops at the size the
    manifest declares: a registry that sends more, or less, fails the blob."""

    def __init__(self, path: str, stall_timeout: float = TIMEOUT) -> None:
        self.path = path
        self.stall_timeout = stall_timeout
        self._changed = threading.Condition()
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        open(path, "wb").close()

    def download(self, client: RegistryClient, descriptor: Descriptor) -> None:
        digest, size = descriptor.digest, descriptor.size
        try:
            response = client.open_blob(digest)
            announced = response.getheader("Content-Length")
            if announced is not None and announced.strip() != str(size):
                client.discard(response)
                raise CorruptBlobError(
                    f"blob {digest}: the registry announces {announced.strip()[:20]} bytes "
                    f"but the manifest declares {size}; {PULL_ADVICE}")
            with open(self.path, "ab") as out:
                while True:
                    try:  # one byte more than declared is enough to know it is too long
                        chunk = response.read(min(1 << 20, size - self.written + 1))
                    except (OSError, http.client.HTTPException) as error:
                        client.discard(response)
                        raise CorruptBlobError(
                            f"blob {digest}: truncated: the connection failed after "
                            f"{self.written} of {size} bytes ({error or type(error).__name__})"
                            f"; {PULL_ADVICE}") from error
                    if not chunk:
                        break
                    if self.written + len(chunk) > size:
                        client.discard(response)
                        raise CorruptBlobError(
                            f"blob {digest}: the registry sends more than the {size} bytes "
                            f"the manifest declares; {PULL_ADVICE}")
                    out.write(chunk)
                    out.flush()
                    with self._changed:
                        self.written += len(chunk)
                        self._changed.notify_all()
            if self.written != size:
                raise CorruptBlobError(f"blob {digest}: truncated: {self.written} of {size} "
                                       f"bytes arrived; {PULL_ADVICE}")
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
        there is more to read. No new byte for stall_timeout seconds fails the pull."""
        with self._changed:
            while self.written <= position and not self.done:
                if not self._changed.wait(self.stall_timeout) and self.written <= position \
                        and not self.done:
                    raise RegistryError(f"the pull stalled: no data for {self.stall_timeout:g} "
                                        "s; try again later")
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


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor from a manifest or index, checked when it is parsed: a digest
    of the sha256 form and a size, before anything is requested with them."""

    digest: str
    size: int
    media_type: str | None = None

    @classmethod
    def parse(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise ImageSourceError(f"{what} is not a descriptor: {str(data)[:80]!r}")
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str):
            raise ImageSourceError(f"{what} has no digest")
        try:
            parse_digest(digest)
        except DigestMismatchError:
            raise ImageSourceError(f"{what} has a malformed digest {digest[:100]!r}: refused "
                                   "before any request") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageSourceError(f"{what} {digest} declares no valid size ({size!r})")
        media_type = data.get("mediaType")
        return cls(digest, size, media_type if isinstance(media_type, str) else None)


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError as error:
        raise ImageSourceError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ImageSourceError(f"{what} is not a JSON object")
    return data


def choose_manifest(client: RegistryClient, body: bytes, media_type: str,
                    platform: str | None) -> tuple[bytes, str]:
    """The image manifest for this platform, when the reference names an index."""
    data = _json_object(body, "the manifest")
    if media_type not in INDEX_TYPES and "manifests" not in data:
        return body, media_type
    entries = data.get("manifests")
    if not isinstance(entries, list) or not all(isinstance(d, dict) for d in entries):
        raise ImageSourceError("the index's manifests are not a list of descriptors")
    descriptors = [Descriptor.parse(entry, "an index entry") for entry in entries]
    wanted = tuple(platform.split("/")) if platform else host_platform()
    for entry, descriptor in zip(entries, descriptors, strict=True):
        found = entry.get("platform") if isinstance(entry.get("platform"), dict) else {}
        key = (found.get("os"), found.get("architecture"))
        if key == wanted[:2] and (len(wanted) < 3 or found.get("variant") == wanted[2]):
            manifest, manifest_type, _ = client.get_manifest(descriptor.digest)
            _check_digest(manifest, descriptor.digest, "the platform's manifest")
            return manifest, manifest_type
    platforms = [d.get("platform") if isinstance(d.get("platform"), dict) else {}
                 for d in entries]
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
         insecure: bool = False, jobs: int = 3, timeout: float = TIMEOUT,
         progress: Progress | None = None) -> ImportedImage:
    """`timeout`: seconds without a byte on any request, or on the layer being applied,
    before the pull fails."""
    ref = Reference.parse(reference)
    client = RegistryClient(ref, credentials, insecure, timeout=timeout)
    body, media_type, served_digest = client.get_manifest(ref.name)
    if ref.digest:
        _check_digest(body, ref.digest, "the manifest")
    elif served_digest:
        _check_digest(body, served_digest, "the manifest")
    manifest_bytes, _ = choose_manifest(client, body, media_type, platform)
    manifest = _json_object(manifest_bytes, "the manifest")
    if manifest.get("schemaVersion") != 2 or "config" not in manifest:
        raise ImageSourceError(f"{ref}: only schema 2 (OCI or Docker) manifests are supported")
    config_descriptor = Descriptor.parse(manifest["config"], "the manifest's config")
    layer_list = manifest.get("layers", [])
    if not isinstance(layer_list, list):
        raise ImageSourceError(f"{ref}: the manifest's layers are not a list")
    descriptors = [Descriptor.parse(layer, f"layer {index + 1} of the manifest")
                   for index, layer in enumerate(layer_list)]
    if config_descriptor.size > MANIFEST_LIMIT:
        raise ImageSourceError(f"{ref}: an image config of {config_descriptor.size} bytes "
                               f"(more than {MANIFEST_LIMIT}): refused")
    config = client.read_blob(config_descriptor.digest, MANIFEST_LIMIT)
    _check_digest(config, config_descriptor.digest, "the image config")
    rootfs = _json_object(config, "the image config").get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise ImageSourceError(f"{ref}: the image config has no list of diff_ids")
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
            spools[index] = Spool(os.path.join(staging, f"blob{index}"), timeout)
            pool.submit(spools[index].download, client, descriptors[index])
        try:
            for index, layer in enumerate(layers):
                if index in spools:
                    spool = spools[index]
                    blob = LayerBlob(diff_ids[index], descriptors[index].digest,
                                     descriptors[index].size, spool.reader,
                                     descriptors[index].media_type,
                                     f"{ref.registry}/{ref.repository}")
                    add_layer(driver, layer, layers[index - 1] if index else "", blob,
                              f"layer {index + 1}/{len(layers)}", progress, PULL_ADVICE)
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
