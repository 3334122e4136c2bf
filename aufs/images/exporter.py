"""Exporting an image: an OCI image layout (gzip layers) or a `docker save` archive that
skopeo, umoci, podman and docker read. Layers are this store's own diffs, so the config's
diff_ids are rewritten to match them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aufs.images.catalog import Catalog
from aufs.images.compression import gzip_stream, zstd_stream
from aufs.images.digests import HashingReader, buffered
from aufs.images.sources import REF_NAME, host_platform
from aufs.store.atomic import fsync_directory
from aufs.store.driver import Driver

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class ExportedImage:
    destination: str
    format: str
    manifest_digest: str | None
    config_digest: str
    diff_ids: tuple[str, ...]


def _sha256_file(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
        return "sha256:" + digest.hexdigest(), handle.tell()


def image_config(catalog: Catalog, tag_config: str | None, diff_ids: list[str]) -> bytes:
    """The image's config (the imported one, if there is one) with these diff_ids: the
    imported bytes themselves when its diff_ids are these, so the image id stays."""
    os_name, architecture = host_platform()
    original = catalog.config(tag_config) if tag_config else None
    config: dict[str, Any] = (json.loads(original) if original is not None
                              else {"architecture": architecture, "os": os_name, "config": {}})
    if original is not None and config.get("rootfs", {}).get("diff_ids") == diff_ids:
        return original
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    return json.dumps(config, separators=(",", ":")).encode()


@dataclass(frozen=True)
class LayerFile:
    path: str
    digest: str  # of the file as stored (compressed or not)
    size: int
    diff_id: str  # of the uncompressed tar
    media_type: str


def layer_files(driver: Driver, chain: list[str], work: str, compression: str | None,
                progress: Progress | None = None, parent: str = "") -> list[LayerFile]:
    """Each layer's diff against its parent, as a file in work: gzip, zstd or plain tar.
    parent is the first layer's parent."""
    files = []
    for layer in chain:
        raw_path = os.path.join(work, f"{layer}.tar")
        with driver.diff(layer, parent) as stream, open(raw_path, "wb") as out:
            hashing = HashingReader(stream)
            shutil.copyfileobj(buffered(hashing), out, 1 << 20)
        diff_id = "sha256:" + hashing.hash.hexdigest()
        if compression is None:
            files.append(LayerFile(raw_path, diff_id, hashing.count, diff_id, OCI_LAYER))
        else:
            packed = f"{raw_path}.{compression}"
            with open(raw_path, "rb") as source, open(packed, "wb") as out:
                if compression == "gzip":
                    gzip_stream(source, out)
                else:
                    zstd_stream(source, out)
            os.unlink(raw_path)
            files.append(LayerFile(packed, *_sha256_file(packed), diff_id,
                                   OCI_LAYER_GZIP if compression == "gzip" else OCI_LAYER_ZSTD))
        if progress is not None:
            progress("bytes", hashing.count)
            progress("layer", 1)
        parent = layer
    return files


def oci_manifest(config: bytes, config_digest: str, layers: list[LayerFile]) -> bytes:
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                   for layer in layers],
    }, separators=(",", ":")).encode()


def export_image(driver: Driver, catalog: Catalog, reference: str, destination: str,
                 image_format: str = "oci", progress: Progress | None = None) -> ExportedImage:
    if image_format not in ("oci", "docker-archive"):
        raise ValueError(f"unknown format {image_format!r}; choose oci or docker-archive")
    as_directory = image_format == "oci" and not destination.endswith(".tar")
    if os.path.lexists(destination) and (as_directory or not os.path.isfile(destination)):
        # a rename onto a device or a dir would replace it: only a regular file is rewritten
        raise FileExistsError(f"{destination} exists" + ("" if as_directory else
                              " and is no regular file") + "; remove it or choose another -o")
    top, tag = catalog.resolve(reference)
    chain = [*reversed(driver.parent_ids(top)), top]
    name = tag.name if tag is not None else top[:12]
    parent_dir = os.path.dirname(os.path.abspath(destination)) or "."
    with tempfile.TemporaryDirectory(dir=parent_dir, prefix=".aufs-export-") as work:
        layers = layer_files(driver, chain, work, "gzip" if image_format == "oci" else None,
                             progress)
        diff_ids = [layer.diff_id for layer in layers]
        config = image_config(catalog, tag.config_digest if tag else None, diff_ids)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        if image_format == "oci":
            manifest_digest = _write_oci(destination, work, name, layers, config, config_digest)
        else:
            manifest_digest = None
            _write_docker_archive(destination, work, name, layers, config, config_digest)
    return ExportedImage(destination, image_format, manifest_digest, config_digest,
                         tuple(diff_ids))


def _write_oci(destination: str, work: str, name: str, layers: list[LayerFile],
               config: bytes, config_digest: str) -> str:
    layout = os.path.join(work, "layout")
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    for layer in layers:
        os.rename(layer.path, os.path.join(blobs, layer.digest[7:]))
    with open(os.path.join(blobs, config_digest[7:]), "wb") as handle:
        handle.write(config)
    manifest = oci_manifest(config, config_digest, layers)
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    with open(os.path.join(blobs, manifest_digest[7:]), "wb") as handle:
        handle.write(manifest)
    os_name, architecture = host_platform()
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": OCI_MANIFEST, "digest": manifest_digest,
                            "size": len(manifest),
                            "platform": {"architecture": architecture, "os": os_name},
                            "annotations": {REF_NAME: name.rpartition(":")[2] or name}}]}
    with open(os.path.join(layout, "index.json"), "w") as handle:
        json.dump(index, handle)
    with open(os.path.join(layout, "oci-layout"), "w") as handle:
        json.dump({"imageLayoutVersion": "1.0.0"}, handle)
    if destination.endswith(".tar"):
        _tar_directory(layout, destination)
    else:
        if os.path.lexists(destination):
            raise FileExistsError(f"{destination} exists; remove it or choose another -o")
        os.rename(layout, destination)
        fsync_directory(os.path.dirname(os.path.abspath(destination)))
    return manifest_digest


def _write_docker_archive(destination: str, work: str, name: str, layers: list[LayerFile],
                          config: bytes, config_digest: str) -> None:
    repository, _, tag_name = name.partition(":")
    repo_tag = f"{repository}:{tag_name or 'latest'}"
    entries = [(f"{layer.digest[7:]}.tar", layer.path) for layer in layers]
    manifest = [{"Config": f"{config_digest[7:]}.json", "RepoTags": [repo_tag],
                 "Layers": [name for name, _ in entries]}]
    temporary = os.path.join(work, "archive.tar")
    with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as archive:
        for member_name, path in entries:
            archive.add(path, member_name)
        for member_name, data in (
                (f"{config_digest[7:]}.json", config),
                ("manifest.json", json.dumps(manifest).encode()),
                ("repositories", json.dumps(
                    {repository: {tag_name or "latest": config_digest[7:]}}).encode())):
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    os.replace(temporary, destination)


def _tar_directory(directory: str, destination: str) -> None:
    temporary = destination + ".partial"
    with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as archive:
        for entry in sorted(os.listdir(directory)):
            archive.add(os.path.join(directory, entry), entry)
    os.replace(temporary, destination)



