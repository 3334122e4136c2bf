"""Importing images: each layer's blob digest and diff_id are checked while it streams into
the store; a mismatch removes every layer this import created."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aufs.images.catalog import Catalog
from aufs.images.compression import DecompressingReader
from aufs.images.digests import HashingReader, buffered, chain_ids, parse_digest, verify_digest
from aufs.images.sources import ImageSourceError, LayerBlob, SourceImage, open_images
from aufs.store.driver import Driver
from aufs.store.layout import INCOMPLETE_SUFFIX

log = logging.getLogger(__name__)

Progress = Callable[[str, int], None]  # (event, amount): "layer" 1, or "bytes" n


@dataclass(frozen=True)
class ImportedImage:
    name: str | None
    top: str
    layers: tuple[str, ...]  # chain ids, base first
    created: tuple[str, ...]  # the layers this import added (the others were shared)
    config_digest: str


def import_images(driver: Driver, catalog: Catalog, source: str, tag: str | None = None,
                  progress: Progress | None = None) -> list[ImportedImage]:
    with open_images(source) as images:
        if tag is not None and len(images) > 1:
            raise ImageSourceError(f"{source} holds {len(images)} images: name one with "
                                   "SOURCE:REF to give it a tag")
        return [import_image(driver, catalog, image, tag or image.name, progress)
                for image in images]


def import_image(driver: Driver, catalog: Catalog, image: SourceImage, tag: str | None,
                 progress: Progress | None = None) -> ImportedImage:
    config_check = HashingReader(io.BytesIO(image.config))
    config_check.drain()
    if image.config_digest is not None:
        config_check.verify(image.config_digest, "image config")
    diff_ids = json.loads(image.config)["rootfs"]["diff_ids"]
    layers = chain_ids(diff_ids)
    created: list[str] = []
    try:
        for index, (layer, blob) in enumerate(zip(layers, image.layers, strict=True)):
            parent = layers[index - 1] if index else ""
            if driver.exists(layer):
                log.info("layer %d/%d %s is already in the store", index + 1, len(layers),
                         layer[:12])
            else:
                add_layer(driver, layer, parent, blob, f"layer {index + 1}", progress)
                created.append(layer)
            if progress is not None:
                progress("layer", 1)
    except BaseException:
        for layer in reversed(created):
            driver.remove(layer, force=True)
        raise
    config_digest = catalog.save_config(image.config)
    if tag is not None:
        catalog.set_tag(tag, layers[-1], config_digest)
    return ImportedImage(tag, layers[-1], tuple(layers), tuple(created), config_digest)




def add_layer(driver: Driver, layer: str, parent: str, blob: LayerBlob, what: str,
              progress: Progress | None) -> None:
    """Creates `layer` from a blob, checked against its digests. The content goes into a
    temporary layer, renamed only when whole: an interrupted import or pull leaves no
    partial layer under a real id, and the next run starts that layer again."""
    temporary = layer + INCOMPLETE_SUFFIX
    if driver.exists(temporary):  # a crashed run's leftover
        driver.remove(temporary, force=True)
    driver.create(temporary, parent)
    try:
        _apply_verified(driver, temporary, parent, blob, what, progress)
        driver.rename(temporary, layer)
    except BaseException:
        if driver.exists(temporary):
            driver.remove(temporary, force=True)
        raise


def _apply_verified(driver: Driver, layer: str, parent: str, blob: LayerBlob, what: str,
                    progress: Progress | None) -> None:
    parse_digest(blob.diff_id)
    counter = (lambda count: progress("bytes", count)) if progress is not None else None
    with blob.open() as raw, DecompressingReader(raw, counter) as stream:
        # the tar-split is kept under the diff_id checked below; a layer whose check fails
        # is removed with its record
        driver.apply_diff(layer, parent, buffered(stream), record=blob.diff_id)
        stream.drain()
    if blob.digest is not None:
        verify_digest(stream.stored_hash, blob.digest, f"{what} blob")
    verify_digest(stream.content_hash, blob.diff_id, f"{what} content (diff_id)")
    if blob.digest is not None and isinstance(blob.size, int) and blob.media_type:
        # push offers this blob again when the registry has it or can mount it
        driver.store.write_record_source(layer, {
            "digest": blob.digest, "size": blob.size, "mediaType": blob.media_type,
            "repository": blob.repository})
