"""Reading images from disk: an OCI image layout (a directory or a tar of one) or a
`docker save` archive. Only metadata is read here; blobs are opened as streams."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from aufs.errors import AufsError
from aufs.images.digests import parse_digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"


class ImageSourceError(AufsError):
    """The source is not an image this tool can read, or holds no image by that name."""


@dataclass(frozen=True)
class LayerBlob:
    diff_id: str  # digest of the uncompressed tar, from the config
    digest: str | None  # digest of the blob as stored (None: only the diff_id is known)
    size: int | None
    open: Callable[[], BinaryIO]
    media_type: str | None = None  # of the blob as stored, when a manifest says it
    repository: str | None = None  # "registry/repository" it was pulled from


@dataclass(frozen=True)
class SourceImage:
    name: str | None  # the tag the source gives it
    config: bytes
    config_digest: str | None
    layers: tuple[LayerBlob, ...]


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as error:
        raise ImageSourceError(f"{what} is not valid JSON: {error}") from None


def host_platform() -> tuple[str, str]:
    machine = platform.machine().lower()
    architecture = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
    return "linux", architecture


def split_reference(source: str) -> tuple[str, str | None]:
    """"path" or "path:ref" (the last colon, when path itself does not exist)."""
    if os.path.exists(source) or ":" not in source:
        return source, None
    path, _, ref = source.rpartition(":")
    return path, ref or None


class _Files:
    """Reads named files of a directory or of a tar archive."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if not os.path.isdir(root):
            try:
                self._tar = tarfile.open(root, "r:*")  # noqa: SIM115 - closed by close()
            except tarfile.ReadError:  # tarfile lists every decompressor it tried
                raise ImageSourceError(f"{root} is neither an image directory nor a tar "
                                       "archive (plain, gzip, bzip2 or xz)") from None
            except (tarfile.TarError, OSError) as error:
                raise ImageSourceError(f"{root} is neither an image directory nor a tar: "
                                       f"{error}") from None
            for member in self._tar:
                if member.isfile():
                    self._members[os.path.normpath(member.name).lstrip("./")] = member

    def exists(self, name: str) -> bool:
        if self._tar is None:
            return os.path.isfile(os.path.join(self.root, name))
        return os.path.normpath(name) in self._members

    def open(self, name: str) -> BinaryIO:
        if ".." in name.split("/") or name.startswith("/"):
            raise ImageSourceError(f"the image names a file outside itself: {name!r}")
        if self._tar is None:
            return open(os.path.join(self.root, name), "rb")
        member = self._members.get(os.path.normpath(name))
        if member is None:
            raise ImageSourceError(f"{self.root} has no {name}")
        handle = self._tar.extractfile(member)
        assert handle is not None
        return handle  # type: ignore[return-value]

    def read(self, name: str) -> bytes:
        with self.open(name) as handle:
            return handle.read()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def _blob_path(digest: str) -> str:
    return f"blobs/sha256/{parse_digest(digest)}"


def _read_oci(files: _Files, ref: str | None) -> list[SourceImage]:
    index = _json(files.read("index.json"), "index.json")
    entries = []
    for descriptor in index.get("manifests", []):
        name = descriptor.get("annotations", {}).get(REF_NAME)
        if ref is None or name == ref:
            entries.append((name, descriptor))
    if not entries:
        names = [d.get("annotations", {}).get(REF_NAME) for d in index.get("manifests", [])]
        raise ImageSourceError(f"no image {ref!r} in {files.root}; it has {names}")
    images = []
    for name, descriptor in entries:
        manifest = _manifest_for_platform(files, descriptor)
        config_descriptor = manifest["config"]
        config = files.read(_blob_path(config_descriptor["digest"]))
        diff_ids = _json(config, "the image config").get("rootfs", {}).get("diff_ids", [])
        layers = manifest.get("layers", [])
        if len(diff_ids) != len(layers):
            raise ImageSourceError(f"image {name!r}: {len(layers)} layers but "
                                   f"{len(diff_ids)} diff_ids in its config")
        blobs = tuple(
            LayerBlob(diff_id, layer["digest"], layer.get("size"),
                      _opener(files, _blob_path(layer["digest"])), layer.get("mediaType"))
            for diff_id, layer in zip(diff_ids, layers, strict=True))
        images.append(SourceImage(name, config, config_descriptor["digest"], blobs))
    return images


def _manifest_for_platform(files: _Files, descriptor: dict[str, Any]) -> dict[str, Any]:
    for _ in range(4):  # an index may point to an index
        manifest = _json(files.read(_blob_path(descriptor["digest"])), "a manifest")
        if manifest.get("mediaType", descriptor.get("mediaType")) not in (OCI_INDEX, DOCKER_LIST) \
                and "manifests" not in manifest:
            return manifest  # type: ignore[no-any-return]
        wanted = host_platform()
        for candidate in manifest["manifests"]:
            found = candidate.get("platform", {})
            if (found.get("os"), found.get("architecture")) == wanted:
                descriptor = candidate
                break
        else:
            raise ImageSourceError(f"no manifest for {wanted[0]}/{wanted[1]} in the index")
    raise ImageSourceError("image indexes nested too deeply")


def _read_docker_archive(files: _Files, ref: str | None) -> list[SourceImage]:
    images = []
    for entry in _json(files.read("manifest.json"), "manifest.json"):
        tags = entry.get("RepoTags") or [None]
        if ref is not None and ref not in tags and not any(
                tag and tag.endswith(f":{ref}") for tag in tags):
            continue
        config = files.read(entry["Config"])
        diff_ids = _json(config, "the image config").get("rootfs", {}).get("diff_ids", [])
        if len(diff_ids) != len(entry["Layers"]):
            raise ImageSourceError(f"{entry['Config']}: {len(entry['Layers'])} layers but "
                                   f"{len(diff_ids)} diff_ids")
        config_name = os.path.basename(entry["Config"]).removesuffix(".json")
        config_digest = f"sha256:{config_name}" if len(config_name) == 64 else None
        blobs = tuple(LayerBlob(diff_id, None, None, _opener(files, layer))
                      for diff_id, layer in zip(diff_ids, entry["Layers"], strict=True))
        images.append(SourceImage(tags[0], config, config_digest, blobs))
    if not images:
        raise ImageSourceError(f"no image {ref!r} in {files.root}")
    return images


def _opener(files: _Files, name: str) -> Callable[[], BinaryIO]:
    return lambda: files.open(name)


@contextlib.contextmanager
def open_images(source: str) -> Iterator[list[SourceImage]]:
    """The images in SOURCE ("path" or "path:ref"): an OCI layout dir or tar, or a docker
    save tar. Blob openers stay valid inside the with-block."""
    path, ref = split_reference(source)
    if not os.path.exists(path):
        raise ImageSourceError(f"{path!r} does not exist: give an OCI layout (dir or tar) or "
                               "a docker save tar, as PATH or PATH:REF")
    files = _Files(path)
    try:
        if files.exists("oci-layout") or files.exists("index.json"):
            yield _read_oci(files, ref)
        elif files.exists("manifest.json"):
            yield _read_docker_archive(files, ref)
        else:
            raise ImageSourceError(f"{path} is neither an OCI image layout nor a docker save "
                                   "archive (no index.json or manifest.json)")
    finally:
        files.close()
