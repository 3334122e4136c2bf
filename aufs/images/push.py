"""Pushing an image from the store to a registry: layers compressed (gzip, or zstd), blobs the
registry already has skipped (HEAD), blobs of another repository of the same registry
mounted across when it allows, the rest uploaded whole or in chunks, the manifest last.

A layer that still rebuilds its original tar (its tar-split record checks out) is offered as
the very blob it came in, when the registry has it or can mount it from the repository it
was pulled from; when every layer goes that way and the config is the original one, the
original manifest is sent unchanged, so the image keeps even its manifest digest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass

from aufs.images.catalog import Catalog
from aufs.images.exporter import (
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    LayerFile,
    image_config,
    layer_files,
    oci_manifest,
)
from aufs.images.importer import Progress
from aufs.images.registry import Credentials, Reference, RegistryClient
from aufs.store.atomic import atomic_write
from aufs.store.driver import Driver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    reference: str
    manifest_digest: str
    uploaded: tuple[str, ...]
    skipped: tuple[str, ...]  # already there
    mounted: tuple[str, ...]  # taken from another repository


class PushRecord:
    """Which repositories of which registry got which blobs from this store
    (ROOT/images/pushed.json), to mount them across instead of uploading them again."""

    def __init__(self, catalog: Catalog) -> None:
        self.path = os.path.join(catalog.directory, "pushed.json")
        self.catalog = catalog

    def load(self) -> dict[str, dict[str, list[str]]]:
        try:
            with open(self.path) as handle:
                data: dict[str, dict[str, list[str]]] = json.load(handle)
                return data
        except (FileNotFoundError, ValueError):
            return {}

    def add(self, registry: str, repository: str, digests: list[str]) -> None:
        data = self.load()
        blobs = data.setdefault(registry, {})
        for digest in digests:
            repositories = blobs.setdefault(digest, [])
            if repository not in repositories:
                repositories.append(repository)
        os.makedirs(self.catalog.directory, mode=0o700, exist_ok=True)
        os.makedirs(self.catalog.store.staging_dir, mode=0o700, exist_ok=True)
        atomic_write(self.path, json.dumps(data).encode(), temp_dir=self.catalog.store.staging_dir)


def push(driver: Driver, catalog: Catalog, source: str, destination: str, *,
         credentials: Credentials | None = None, insecure: bool = False,
         compression: str = "gzip", chunk_size: int = 0,
         progress: Progress | None = None) -> PushResult:
    if compression not in ("gzip", "zstd"):
        raise ValueError(f"unknown compression {compression!r}; choose gzip or zstd")
    ref = Reference.parse(destination)
    if ref.digest:
        raise ValueError("push to a tag (REGISTRY/REPOSITORY:TAG), not to a digest")
    client = RegistryClient(ref, credentials, insecure)
    top, tag = catalog.resolve(source)
    chain = [*reversed(driver.parent_ids(top)), top]
    record = PushRecord(catalog)
    known = record.load().get(ref.registry, {})
    uploaded: list[str] = []
    skipped: list[str] = []
    mounted: list[str] = []
    counter = (lambda count: progress("bytes", count)) if progress is not None else None
    with driver.store.staging("push") as work:
        layers = []
        for index, layer in enumerate(chain):
            parent = chain[index - 1] if index else ""
            original = _original_blob(driver, client, ref, layer, mounted, skipped)
            layers.append(original or layer_files(driver, [layer], work, compression,
                                                  parent=parent)[0])
        config = image_config(catalog, tag.config_digest if tag else None,
                              [layer.diff_id for layer in layers])
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        config_path = os.path.join(work, "config.json")
        with open(config_path, "wb") as handle:
            handle.write(config)
        blobs = [(layer.digest, layer.path) for layer in layers] + [(config_digest, config_path)]
        for digest, path in blobs:
            if not path:  # an original blob, already there or mounted
                continue
            if client.has_blob(digest):
                skipped.append(digest)
            elif any(client.mount_blob(digest, other) for other in known.get(digest, [])
                     if other != ref.repository):
                mounted.append(digest)
            else:
                client.upload_blob(digest, path, chunk_size, counter)
                uploaded.append(digest)
            if progress is not None:
                progress("layer", 1)
        manifest, media_type = _manifest(catalog, config, config_digest, layers)
        digest = client.put_manifest(ref.tag or "latest", manifest, media_type)
    record.add(ref.registry, ref.repository, [d for d, _ in blobs])
    manifest_digest = digest or "sha256:" + hashlib.sha256(manifest).hexdigest()
    log.info("pushed %s: %d uploaded, %d already there, %d mounted", ref, len(uploaded),
             len(skipped), len(mounted))
    return PushResult(str(ref), manifest_digest, tuple(uploaded), tuple(skipped),
                      tuple(mounted))


DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def _original_blob(driver: Driver, client: RegistryClient, ref: Reference, layer: str,
                   mounted: list[str], skipped: list[str]) -> LayerFile | None:
    """The blob the layer came in, when it still rebuilds that blob's content and the
    registry has it or mounts it from the repository it was pulled from; else None."""
    record = driver.store.read_record(layer)
    source = record.source if record is not None else None
    if not source:
        return None
    digest, size, media_type = source.get("digest"), source.get("size"), source.get("mediaType")
    if not (isinstance(digest, str) and isinstance(size, int) and isinstance(media_type, str)):
        return None
    diff_id = driver.verified_diff_id(layer)
    if diff_id is None:
        return None
    original = LayerFile("", digest, size, diff_id, media_type)
    if client.has_blob(digest):
        skipped.append(digest)
        return original
    registry, _, repository = str(source.get("repository") or "").partition("/")
    if registry == ref.registry and repository and repository != ref.repository \
            and client.mount_blob(digest, repository):
        mounted.append(digest)
        return original
    return None


def _manifest(catalog: Catalog, config: bytes, config_digest: str,
              layers: list[LayerFile]) -> tuple[bytes, str]:
    """(body, media type): the image's original manifest when it lists these very blobs
    and this config; else a new OCI manifest."""
    original = catalog.manifest(config_digest)
    if original is not None and all(not layer.path for layer in layers):
        try:
            data = json.loads(original)
            same = ([d.get("digest") for d in data.get("layers", [])]
                    == [layer.digest for layer in layers]
                    and data.get("config", {}).get("digest") == config_digest)
        except (ValueError, AttributeError):
            same = False
        if same:
            return original, str(data.get("mediaType") or OCI_MANIFEST)
    # the same gzip bytes, under the OCI name an OCI manifest expects
    layers = [dataclasses.replace(layer, media_type=OCI_LAYER_GZIP)
              if layer.media_type == DOCKER_LAYER_GZIP else layer for layer in layers]
    return oci_manifest(config, config_digest, layers), OCI_MANIFEST
