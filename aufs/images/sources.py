"""Reading images from disk: an OCI image layout (a directory or a tar of one) or a
`docker save` archive. Only metadata is read here; blobs are opened as streams."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from aufs.archive.beneath import open_regular_file
from aufs.errors import AufsError
from aufs.images.digests import DigestMismatchError, parse_digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"
MAX_METADATA = 4 << 20  # index, manifests and configs: what Docker and containerd accept


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


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageSourceError(f"{what} is not a JSON object but {type(value).__name__}")
    return value


def _field(container: dict[str, Any], key: str, kind: type, what: str,
           default: Any = None) -> Any:
    """container[key], checked to be a kind; a missing key gives default, or an error when
    default is None."""
    if key not in container:
        if default is None:
            raise ImageSourceError(f"{what} has no {key!r}")
        return default
    value = container[key]
    if not isinstance(value, kind):
        raise ImageSourceError(f"{what}: {key!r} is not a {kind.__name__}")
    return value


def _verified(data: bytes, digest: str, what: str) -> bytes:
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise DigestMismatchError(f"{what} does not match its digest {digest}")
    return data


def _rootfs_diff_ids(config: bytes, what: str) -> list[str]:
    document = _object(_json(config, what), what)
    rootfs = _field(document, "rootfs", dict, what, default={})
    diff_ids: list[str] = _field(rootfs, "diff_ids", list, f"{what} rootfs", default=[])
    for diff_id in diff_ids:
        if not isinstance(diff_id, str):
            raise ImageSourceError(f"{what}: a diff_id is not a string")
        parse_digest(diff_id)
    return diff_ids


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
    """Reads named files of a directory or of a tar archive. A source is untrusted: a
    symlink (or a tar link) anywhere on the way to a file is refused, and only regular
    files are opened."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._tar: tarfile.TarFile | None = None
        self._fd = -1
        self._members: dict[str, tarfile.TarInfo] = {}
        if os.path.isdir(root):
            self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            return
        try:
            self._tar = tarfile.open(root, "r:*")  # noqa: SIM115 - closed by close()
        except tarfile.ReadError:  # tarfile lists every decompressor it tried
            raise ImageSourceError(f"{root} is neither an image directory nor a tar "
                                   "archive (plain, gzip, bzip2 or xz)") from None
        except (tarfile.TarError, OSError) as error:
            raise ImageSourceError(f"{root} is neither an image directory nor a tar: "
                                   f"{error}") from None
        for member in self._tar:
            self._members[os.path.normpath(member.name).lstrip("./")] = member

    def exists(self, name: str) -> bool:
        if self._tar is None:
            return os.path.lexists(os.path.join(self.root, name))
        return os.path.normpath(name) in self._members

    def open(self, name: str) -> BinaryIO:
        if ".." in name.split("/") or name.startswith("/"):
            raise ImageSourceError(f"the image names a file outside itself: {name!r}")
        if self._tar is None:
            try:
                return os.fdopen(open_regular_file(self._fd, name), "rb")
            except FileNotFoundError:
                raise ImageSourceError(f"{self.root} has no {name}") from None
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.EINVAL, errno.EXDEV):
                    raise ImageSourceError(f"{self.root}: {error.filename}: {error.strerror} "
                                           "(refused in an image source)") from None
                raise
        member = self._members.get(os.path.normpath(name))
        if member is None:
            raise ImageSourceError(f"{self.root} has no {name}")
        if not member.isfile():
            kind = "a link" if member.issym() or member.islnk() else "not a regular file"
            raise ImageSourceError(f"{self.root}: {name} is {kind} (refused in an image "
                                   "source)")
        handle = self._tar.extractfile(member)
        if handle is None:
            raise ImageSourceError(f"{self.root}: {name} cannot be read")
        return handle  # type: ignore[return-value]

    def read(self, name: str, limit: int = MAX_METADATA) -> bytes:
        with self.open(name) as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise ImageSourceError(f"{self.root}: {name} is larger than {limit} bytes")
        return data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _blob_path(digest: str) -> str:
    return f"blobs/sha256/{parse_digest(digest)}"


def _read_oci(files: _Files, ref: str | None) -> list[SourceImage]:
    index = _object(_json(files.read("index.json"), "index.json"), "index.json")
    descriptors = _field(index, "manifests", list, "index.json", default=[])
    for number, descriptor in enumerate(descriptors, start=1):
        _object(descriptor, f"index.json manifest {number}")
    entries = []
    for descriptor in descriptors:
        annotations = _field(descriptor, "annotations", dict, "an index.json manifest",
                             default={})
        name = annotations.get(REF_NAME)
        if ref is None or name == ref:
            entries.append((name, descriptor))
    if not entries:
        names = [d.get("annotations", {}).get(REF_NAME) for d in descriptors
                 if isinstance(d.get("annotations", {}), dict)]
        raise ImageSourceError(f"no image {ref!r} in {files.root}; it has {names}")
    images = []
    for name, descriptor in entries:
        what = f"image {name!r}" if name else "an image"
        manifest = _manifest_for_platform(files, descriptor, what)
        config_descriptor = _object(_field(manifest, "config", dict, f"{what}'s manifest"),
                                    f"{what}'s config descriptor")
        config_digest = _digest_of(config_descriptor, f"{what}'s config")
        config = _verified(files.read(_blob_path(config_digest)), config_digest,
                           f"{what}'s config")
        diff_ids = _rootfs_diff_ids(config, f"{what}'s config")
        layers = _field(manifest, "layers", list, f"{what}'s manifest", default=[])
        if len(diff_ids) != len(layers):
            raise ImageSourceError(f"{what}: {len(layers)} layers but "
                                   f"{len(diff_ids)} diff_ids in its config")
        blobs = []
        for number, (diff_id, layer) in enumerate(zip(diff_ids, layers, strict=True), 1):
            layer = _object(layer, f"{what}'s layer {number}")
            digest = _digest_of(layer, f"{what}'s layer {number}")
            size = layer.get("size")
            if size is not None and (not isinstance(size, int) or size < 0):
                raise ImageSourceError(f"{what}'s layer {number}: size {size!r} is not a size")
            media_type = layer.get("mediaType")
            if media_type is not None and not isinstance(media_type, str):
                raise ImageSourceError(f"{what}'s layer {number}: mediaType is not a string")
            blobs.append(LayerBlob(diff_id, digest, size, _opener(files, _blob_path(digest)),
                                   media_type))
        images.append(SourceImage(name, config, config_digest, tuple(blobs)))
    return images


def _digest_of(descriptor: dict[str, Any], what: str) -> str:
    digest = _field(descriptor, "digest", str, what)
    parse_digest(digest)  # checked before it names a file
    return digest  # type: ignore[no-any-return]


def _manifest_for_platform(files: _Files, descriptor: dict[str, Any], what: str
                           ) -> dict[str, Any]:
    for _ in range(4):  # an index may point to an index
        digest = _digest_of(descriptor, f"{what}'s manifest descriptor")
        manifest = _object(_json(_verified(files.read(_blob_path(digest)), digest,
                                           f"{what}'s manifest"), f"{what}'s manifest"),
                           f"{what}'s manifest")
        if manifest.get("mediaType", descriptor.get("mediaType")) not in (OCI_INDEX, DOCKER_LIST) \
                and "manifests" not in manifest:
            return manifest
        wanted = host_platform()
        for candidate in _field(manifest, "manifests", list, f"{what}'s index"):
            candidate = _object(candidate, f"{what}'s index entry")
            found = candidate.get("platform", {})
            if isinstance(found, dict) and (found.get("os"), found.get("architecture")) == wanted:
                descriptor = candidate
                break
        else:
            raise ImageSourceError(f"no manifest for {wanted[0]}/{wanted[1]} in the index")
    raise ImageSourceError("image indexes nested too deeply")


def _read_docker_archive(files: _Files, ref: str | None) -> list[SourceImage]:
    images = []
    entries = _json(files.read("manifest.json"), "manifest.json")
    if not isinstance(entries, list):
        raise ImageSourceError(f"manifest.json is not a JSON list but {type(entries).__name__}")
    for number, entry in enumerate(entries, start=1):
        what = f"manifest.json entry {number}"
        entry = _object(entry, what)
        tags = _field(entry, "RepoTags", list, what, default=[]) or [None]
        if not all(tag is None or isinstance(tag, str) for tag in tags):
            raise ImageSourceError(f"{what}: a tag is not a string")
        if ref is not None and ref not in tags and not any(
                isinstance(tag, str) and tag.endswith(f":{ref}") for tag in tags):
            continue
        config_name = _field(entry, "Config", str, what)
        layer_names = _field(entry, "Layers", list, what)
        if not all(isinstance(layer, str) for layer in layer_names):
            raise ImageSourceError(f"{what}: a layer name is not a string")
        config = files.read(config_name)
        # the image id is the config's digest: check it against the name when the name is
        # one (<hex>.json, or blobs/sha256/<hex>), else it is what the hash says
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        named = os.path.basename(config_name).removesuffix(".json")
        if len(named) == 64 and not named.strip("0123456789abcdef") \
                and config_digest != f"sha256:{named}":
            raise DigestMismatchError(f"{config_name} does not match the digest it is named by")
        diff_ids = _rootfs_diff_ids(config, config_name)
        if len(diff_ids) != len(layer_names):
            raise ImageSourceError(f"{config_name}: {len(layer_names)} layers but "
                                   f"{len(diff_ids)} diff_ids")
        blobs = tuple(LayerBlob(diff_id, None, None, _opener(files, layer))
                      for diff_id, layer in zip(diff_ids, layer_names, strict=True))
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
