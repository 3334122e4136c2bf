"""Importing images: each layer's blob digest and diff_id are checked while it streams into
the store; a mismatch removes every layer this import created."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aufs.errors import DiffError
from aufs.images.catalog import Catalog
from aufs.images.compression import CompressionError, DecompressingReader
from aufs.images.digests import CorruptBlobError, HashingReader, buffered, chain_ids, parse_digest
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


IMPORT_ADVICE = "the image source is damaged or was altered: export or download it again"


def add_layer(driver: Driver, layer: str, parent: str, blob: LayerBlob, what: str,
              progress: Progress | None, advice: str = IMPORT_ADVICE) -> None:
    """Creates `layer` from a blob, checked against its digests. The content goes into a
    temporary layer, renamed only when whole: an interrupted import or pull leaves no
    partial layer under a real id, and the next run starts that layer again."""
    temporary = layer + INCOMPLETE_SUFFIX
    if driver.exists(temporary):  # a crashed run's leftover
        driver.remove(temporary, force=True)
    driver.create(temporary, parent)
    try:
        _apply_verified(driver, temporary, parent, blob, what, progress, advice)
        driver.rename(temporary, layer)
    except BaseException:
        if driver.exists(temporary):
            driver.remove(temporary, force=True)
        raise


def _apply_verified(driver: Driver, layer: str, parent: str, blob: LayerBlob, what: str,
                    progress: Progress | None, advice: str) -> None:
    parse_digest(blob.diff_id)
    if blob.digest is not None:
        parse_digest(blob.digest)
    counter = (lambda count: progress("bytes", count)) if progress is not None else None
    try:
        with blob.open() as raw, DecompressingReader(raw, counter) as stream:
            reader = buffered(stream)  # held: dropping it would close the stream under drain()
            # the tar-split is kept under the diff_id checked below; a layer whose check
            # fails is removed with its record
            driver.apply_diff(layer, parent, reader, record=blob.diff_id)
            stream.drain()
            reader.close()
    except (DiffError, CompressionError) as error:
        found = _diagnose(blob) or str(error)
        raise CorruptBlobError(_blob_line(blob, what, found, advice)) from error
    problem = _mismatch(blob, stream.stored_hash.hexdigest(), stream.content_hash.hexdigest())
    if problem is not None:
        raise CorruptBlobError(_blob_line(blob, what, problem, advice))
    if blob.digest is not None and isinstance(blob.size, int) and blob.media_type:
        # push offers this blob again when the registry has it or can mount it
        driver.store.write_record_source(layer, {
            "digest": blob.digest, "size": blob.size, "mediaType": blob.media_type,
            "repository": blob.repository})


def _blob_line(blob: LayerBlob, what: str, problem: str, advice: str) -> str:
    name = f"blob {blob.digest}" if blob.digest else f"layer {blob.diff_id}"
    return f"{what}: {name}: {problem}; {advice}"


def _mismatch(blob: LayerBlob, stored: str, content: str) -> str | None:
    if blob.digest is not None and stored != parse_digest(blob.digest):
        return f"sha256 mismatch: expected {blob.digest} got sha256:{stored}"
    if content != parse_digest(blob.diff_id):
        return (f"diff_id mismatch: the uncompressed layer should be {blob.diff_id} but is "
                f"sha256:{content}")
    return None


def _diagnose(blob: LayerBlob) -> str | None:
    """Why a blob failed to apply, read again from its start: its digest first (then the
    damage is in the blob, not in our reading), then its compression, then its diff_id.
    None when the blob is what it promised to be (the layer's content itself is bad)."""
    if blob.digest is not None:
        with blob.open() as raw:
            stored = HashingReader(raw)
            stored.drain()
        if stored.hash.hexdigest() != parse_digest(blob.digest):
            return f"sha256 mismatch: expected {blob.digest} got sha256:{stored.hash.hexdigest()}"
    try:
        with blob.open() as raw, DecompressingReader(raw) as stream:
            stream.drain()
    except CompressionError as error:
        return str(error)
    return _mismatch(blob, stream.stored_hash.hexdigest(), stream.content_hash.hexdigest())
