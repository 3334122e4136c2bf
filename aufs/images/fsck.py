"""Checking a whole root: the layer store's checks, plus the image catalog's (every tag names
a layer, the tag index is readable)."""

from __future__ import annotations

from aufs.errors import AufsError
from aufs.images.catalog import Catalog
from aufs.store import fsck as store_fsck
from aufs.store.fsck import Problem
from aufs.store.layout import Store


def check_tags(store: Store, ids: set[str]) -> list[Problem]:
    catalog = Catalog(store)
    try:
        tags = catalog.tags()
    except AufsError as error:
        return [Problem("corrupt-tag-index", catalog.index_path, str(error),
                        "delete the index (tags are lost, layers stay)", False)]
    return [Problem("dangling-tag", catalog.index_path, f"tag {tag.name!r} names missing "
                    f"layer {tag.top[:12]}", "remove the tag", True, tag.name)
            for tag in tags.values() if tag.top not in ids]


def remove_dangling_tag(store: Store, problem: Problem) -> None:
    catalog = Catalog(store)
    tag = catalog.tags().get(problem.subject)
    if tag is not None and not store.exists(tag.top):
        catalog.remove_tag(tag.name)


def check(root: str) -> list[Problem]:
    """Every problem of the store at root and of its tags."""
    return store_fsck.check(root, (check_tags,))


def repair(root: str, *, force: bool = False) -> tuple[list[Problem], list[Problem]]:
    """Repairs every safe problem of the store and its tags; returns (repaired, still there).
    force=True also removes broken layers, the layers built on them and the tags that named
    them (`aufs.store.fsck.repair` says how): the repaired list then holds a "removed-layer"
    problem for each layer and a "dangling-tag" problem for each tag removed."""
    return store_fsck.repair(root, (check_tags,), {"dangling-tag": remove_dangling_tag},
                             force=force)
