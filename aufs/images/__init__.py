"""Whole images on top of the layer store: sources (OCI layouts, docker save archives),
compression and digests, import, export, tags (`catalog`), and the registry client with pull
and push.

May import: `aufs.store`, `aufs.archive` and the core; never `aufs.docker` or the command line.
"""

from aufs.images.catalog import Catalog, Tag, UnknownImageError
from aufs.images.compression import CompressionError
from aufs.images.digests import DigestMismatchError, chain_ids
from aufs.images.exporter import ExportedImage, export_image
from aufs.images.importer import ImportedImage, import_image, import_images
from aufs.images.sources import ImageSourceError, open_images

__all__ = [
    "Catalog",
    "CompressionError",
    "DigestMismatchError",
    "ExportedImage",
    "ImageSourceError",
    "ImportedImage",
    "Tag",
    "UnknownImageError",
    "chain_ids",
    "export_image",
    "import_image",
    "import_images",
    "open_images",
]
