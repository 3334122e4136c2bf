"""Rescuing the images of a Docker data root that used the aufs driver, without Docker.

Docker keeps, under DOCKER_ROOT/image/aufs/: repositories.json (tags), imagedb/ (configs)
and layerdb/sha256/<chain-id>/ (cache-id naming aufs/diff/<cache-id>, and
tar-split.json.gz). tar-split records the original layer tar's header and padding bytes
around each file's contents, so replaying it over the files in aufs/diff/<cache-id> rebuilds
the layer byte for byte: the image keeps its diff_ids and its image id. Where that data is
missing or the rebuilt tar does not match its diff_id, the layer is archived afresh from the
files, the config is rewritten, and the result says so.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from aufs.archive.beneath import open_directory_no_symlinks, open_regular_file
from aufs.archive.export import ExportOptions, write_tree
from aufs.archive.tarsplit import FILE_NAME as TAR_SPLIT_FILE
from aufs.archive.tarsplit import read_entries, replay
from aufs.errors import AufsError, InvalidLayerIDError
from aufs.ids import validate_layer_id
from aufs.images.digests import chain_ids, parse_digest
from aufs.images.sources import REF_NAME

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

Progress = Callable[[str, int], None]


class RescueError(AufsError):
    """The Docker root cannot be read as one that used the aufs driver."""


@dataclass
class RescuedImage:
    tag: str
    image_id: str  # the config digest Docker knew it by (rewritten if a layer was rebuilt)
    diff_ids: list[str]
    exact: bool  # every layer rebuilt byte for byte from tar-split
    notes: list[str] = field(default_factory=list)


class LayerFiles:
    """The files of one layer directory of a Docker root being rescued (untrusted): opened
    by name below its fd, never through a symlink, and only if they are regular files."""

    def __init__(self, directory_fd: int) -> None:
        self.fd = directory_fd

    def get(self, name: str) -> BinaryIO:
        try:
            return os.fdopen(open_regular_file(self.fd, name.lstrip("/")), "rb")
        except OSError as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise RescueError(f"tar-split names {name!r}: {error.strerror}") from None


class DockerAufsRoot:
    """The image metadata and layer dirs of a Docker data root (e.g. /var/lib/docker)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.image_dir = os.path.join(root, "image", "aufs")
        self.diff_dir = os.path.join(root, "aufs", "diff")
        if not os.path.isdir(self.image_dir):
            raise RescueError(f"{root} has no image/aufs/: it is not a Docker root that used "
                              "the aufs storage driver")

    def repositories(self) -> dict[str, str]:
        """tag -> image id ("sha256:..."), as repositories.json lists them."""
        try:
            with open(os.path.join(self.image_dir, "repositories.json")) as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {}
        tags = {}
        for references in data.get("Repositories", {}).values():
            for reference, image_id in references.items():
                if "@" not in reference:  # digest references repeat a tag
                    tags[reference] = image_id
        return tags

    def config(self, image_id: str) -> bytes:
        path = os.path.join(self.image_dir, "imagedb", "content", "sha256",
                            parse_digest(image_id))
        with open(path, "rb") as handle:
            data = handle.read()
        if "sha256:" + hashlib.sha256(data).hexdigest() != image_id:
            raise RescueError(f"{path} does not match its image id {image_id}")
        return data

    def layer_dir(self, chain_id: str) -> str:
        return os.path.join(self.image_dir, "layerdb", "sha256", chain_id)

    def cache_id(self, chain_id: str) -> str:
        """The layer's directory name under aufs/diff/, checked to be a layer id: a crafted
        root could name any host directory (issue 16)."""
        with open(os.path.join(self.layer_dir(chain_id), "cache-id")) as handle:
            cache_id = handle.read().strip()
        try:
            return validate_layer_id(cache_id, f"layerdb cache-id of {chain_id[:12]}")
        except InvalidLayerIDError as error:
            raise RescueError(f"{error}: refused") from None

    def open_layer_directory(self, cache_id: str) -> int:
        """An fd of aufs/diff/<cache_id>, opened below the root without following a
        symlink on the way."""
        root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return open_directory_no_symlinks(root, f"aufs/diff/{cache_id}")
        except FileNotFoundError:
            raise RescueError(f"aufs/diff/{cache_id} is missing: the layer's files are gone"
                              ) from None
        except OSError as error:
            raise RescueError(f"aufs/diff/{cache_id}: {error.strerror} ({error.filename}): "
                              "refused") from None
        finally:
            os.close(root)


def rescue(docker_root: str, destination: str, progress: Progress | None = None
           ) -> list[RescuedImage]:
    """Writes every tagged image of docker_root as one OCI image layout at destination."""
    source = DockerAufsRoot(docker_root)
    tags = source.repositories()
    if not tags:
        raise RescueError(f"{docker_root} has no tagged images in repositories.json")
    if os.path.lexists(destination):
        raise FileExistsError(f"{destination} exists; remove it or choose another -o")
    parent = os.path.dirname(os.path.abspath(destination)) or "."
    rescued: list[RescuedImage] = []
    with tempfile.TemporaryDirectory(dir=parent, prefix=".aufs-rescue-") as work:
        blobs = os.path.join(work, "blobs", "sha256")
        os.makedirs(blobs)
        manifests = []
        used_names: set[str] = set()
        for tag, image_id in sorted(tags.items()):
            image, manifest = _rescue_image(source, tag, image_id, blobs, progress)
            rescued.append(image)
            name = _ref_name(tag, used_names)
            manifests.append({"mediaType": OCI_MANIFEST, "digest": manifest[0],
                              "size": manifest[1], "annotations": {REF_NAME: name}})
        with open(os.path.join(work, "index.json"), "w") as handle:
            json.dump({"schemaVersion": 2, "manifests": manifests}, handle)
        with open(os.path.join(work, "oci-layout"), "w") as handle:
            json.dump({"imageLayoutVersion": "1.0.0"}, handle)
        os.rename(work, destination)
        os.makedirs(work)  # so that TemporaryDirectory's cleanup finds something to remove
    return rescued


def _ref_name(tag: str, used: set[str]) -> str:
    """The tag part ("latest"), or repo and tag when two repositories share a tag."""
    name = tag.rpartition(":")[2]
    if name in used:
        name = tag.replace("/", "_").replace(":", "_")
    used.add(name)
    return name


def _rescue_image(source: DockerAufsRoot, tag: str, image_id: str, blobs: str,
                  progress: Progress | None) -> tuple[RescuedImage, tuple[str, int]]:
    config = json.loads(source.config(image_id))
    diff_ids = list(config["rootfs"]["diff_ids"])
    chain = chain_ids(diff_ids)
    result = RescuedImage(tag, image_id, diff_ids, exact=True)
    layers = []
    for index, (chain_id, diff_id) in enumerate(zip(chain, diff_ids, strict=True)):
        digest, size, note = _rescue_layer(source, chain_id, diff_id, blobs)
        if note:
            result.exact = False
            result.notes.append(f"layer {index + 1} ({diff_id[:19]}): {note}")
            log.warning("%s: layer %d rebuilt from its files, not byte for byte: %s", tag,
                        index + 1, note)
        layers.append({"mediaType": OCI_LAYER, "digest": digest, "size": size})
        diff_ids[index] = digest  # an uncompressed layer's digest is its diff_id
        if progress is not None:
            progress("bytes", size)
            progress("layer", 1)
    config_bytes = source.config(image_id)
    if not result.exact:
        config["rootfs"]["diff_ids"] = diff_ids
        config_bytes = json.dumps(config, separators=(",", ":")).encode()
        result.image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        result.diff_ids = diff_ids
    _write_blob(blobs, config_bytes)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": result.image_id,
                   "size": len(config_bytes)},
        "layers": layers,
    }, separators=(",", ":")).encode()
    return result, (_write_blob(blobs, manifest), len(manifest))


def _write_blob(blobs: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest[7:]), "wb") as handle:
        handle.write(data)
    return digest


def _rescue_layer(source: DockerAufsRoot, chain_id: str, diff_id: str, blobs: str
                  ) -> tuple[str, int, str]:
    """(digest, size, note): the note is empty when the layer was rebuilt byte for byte."""
    target = os.path.join(blobs, parse_digest(diff_id))
    if os.path.exists(target):
        return diff_id, os.path.getsize(target), ""  # shared with an image already done
    try:
        cache_id = source.cache_id(chain_id)
    except FileNotFoundError:
        raise RescueError(f"layer {chain_id} has no layerdb entry; the root is incomplete"
                          ) from None
    branch = source.open_layer_directory(cache_id)
    try:
        return _archive_layer(source, chain_id, diff_id, blobs, branch)
    finally:
        os.close(branch)


def _archive_layer(source: DockerAufsRoot, chain_id: str, diff_id: str, blobs: str,
                   branch: int) -> tuple[str, int, str]:
    target = os.path.join(blobs, parse_digest(diff_id))
    partial = target + ".partial"
    journal_path = os.path.join(source.layer_dir(chain_id), TAR_SPLIT_FILE)
    note = ""
    try:
        with gzip.open(journal_path, "rb") as journal, open(partial, "wb") as out:
            rebuilt = replay(read_entries(journal), LayerFiles(branch),  # type: ignore[arg-type]
                             out.write)
        if rebuilt != diff_id:
            note = f"the tar-split rebuild gives {rebuilt[:19]}, not the recorded diff_id"
    except FileNotFoundError as error:
        note = f"missing data ({error.filename or error})"
    except (OSError, RescueError, ValueError) as error:
        note = f"tar-split replay failed ({error})"
    if not note:
        os.rename(partial, target)
        return diff_id, os.path.getsize(target), ""
    with open(partial, "wb") as out:
        write_tree(branch, out.fileno(), ExportOptions())
    digest = _write_blob_from_file(blobs, partial)
    return digest, os.path.getsize(os.path.join(blobs, digest[7:])), note


def _write_blob_from_file(blobs: str, path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    name = digest.hexdigest()
    shutil.move(path, os.path.join(blobs, name))
    return "sha256:" + name
