"""The image index: which tag names which top layer, and each image's config, kept under
ROOT/images/ (Docker's aufs code never looks there). Every write is atomic."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from aufs.errors import AufsError
from aufs.store.atomic import atomic_write
from aufs.store.layout import Store

INDEX_VERSION = 1


class UnknownImageError(AufsError, LookupError):
    """No tag or layer by that name."""


@dataclass(frozen=True)
class Tag:
    name: str
    top: str  # the top layer (a chain id)
    config_digest: str


class Catalog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.directory = os.path.join(store.root, "images")
        self.index_path = os.path.join(self.directory, "index.json")
        self.configs = os.path.join(self.directory, "configs")

    def tags(self) -> dict[str, Tag]:
        try:
            with open(self.index_path) as handle:
                data = json.load(handle)
            return {name: Tag(name, entry["top"], entry["config"])
                    for name, entry in data.get("tags", {}).items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError, TypeError, KeyError) as error:  # not our shape
            raise AufsError(f"{self.index_path} is corrupt ({type(error).__name__}: {error}); "
                            "restore it or delete it (the layers stay, only the tags are "
                            "lost)") from None

    def _write(self, tags: dict[str, Tag]) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.makedirs(self.store.staging_dir, mode=0o700, exist_ok=True)
        data = {"version": INDEX_VERSION,
                "tags": {t.name: {"top": t.top, "config": t.config_digest}
                         for t in sorted(tags.values(), key=lambda t: t.name)}}
        atomic_write(self.index_path, json.dumps(data, indent=1).encode() + b"\n",
                     temp_dir=self.store.staging_dir)

    def save_config(self, config: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(config).hexdigest()
        os.makedirs(self.configs, mode=0o700, exist_ok=True)
        path = os.path.join(self.configs, digest[7:] + ".json")
        if not os.path.exists(path):
            os.makedirs(self.store.staging_dir, mode=0o700, exist_ok=True)
            atomic_write(path, config, temp_dir=self.store.staging_dir)
        return digest

    def save_manifest(self, config_digest: str, manifest: bytes) -> None:
        """The manifest an image came with, kept by its config digest: a push that offers
        the very same blobs sends it unchanged, so the image keeps its manifest digest."""
        path = os.path.join(self.directory, "manifests",
                            config_digest.removeprefix("sha256:") + ".json")
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.makedirs(self.store.staging_dir, mode=0o700, exist_ok=True)
        atomic_write(path, manifest, temp_dir=self.store.staging_dir)

    def manifest(self, config_digest: str) -> bytes | None:
        try:
            with open(os.path.join(self.directory, "manifests",
                                   config_digest.removeprefix("sha256:") + ".json"),
                      "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def config(self, digest: str) -> bytes:
        with open(os.path.join(self.configs, digest.removeprefix("sha256:") + ".json"),
                  "rb") as handle:
            return handle.read()

    def set_tag(self, name: str, top: str, config_digest: str) -> None:
        tags = self.tags()
        tags[name] = Tag(name, top, config_digest)
        self._write(tags)

    def remove_tag(self, name: str) -> None:
        tags = self.tags()
        if tags.pop(name, None) is None:
            raise UnknownImageError(f"no tag {name!r}")
        self._write(tags)

    def resolve(self, reference: str) -> tuple[str, Tag | None]:
        """(top layer, tag) for a tag name or a layer id."""
        tag = self.tags().get(reference)
        if tag is not None:
            return tag.top, tag
        if self.store.exists(reference):
            return reference, None
        raise UnknownImageError(f"no tag or layer {reference!r} in {self.store.root}; "
                                "see `aufs ls`")
