"""Real images made with umoci and skopeo: applied layer by layer and union-mounted, they give
exactly the tree `umoci unpack` gives, and each layer's diff re-applies to the same tree."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import aufs
from conftest import FIXTURES, IS_ROOT, Harness
from tarbuild import tree_snapshot

OCI = FIXTURES / "oci-sample"
TAGS = ["base", "v2", "latest", "insert"]

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="unpacking images with their owners needs root"),
]


def oci_layers(tag: str) -> list[Path]:
    index = json.loads((OCI / "index.json").read_text())
    (entry,) = [m for m in index["manifests"]
                if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
    manifest = json.loads((OCI / "blobs" / "sha256" / entry["digest"][7:]).read_text())
    return [OCI / "blobs" / "sha256" / layer["digest"][7:] for layer in manifest["layers"]]


@pytest.fixture(scope="module")
def umoci_trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed (apt-get install umoci)")
    base = tmp_path_factory.mktemp("umoci")
    layout = base / "layout"
    shutil.copytree(OCI, layout)  # umoci takes a lock inside the layout
    trees = {}
    for tag in TAGS:
        bundle = base / tag
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)],
                       check=True, capture_output=True)
        trees[tag] = bundle / "rootfs"
    return trees


def comparable(root: Path) -> dict[str, tuple[object, ...]]:
    """Names, types, modes, owners, devices, contents, link targets and hardlink groups."""
    return {name: entry[:5] + entry[6:] for name, entry in tree_snapshot(root).items()}


def apply_chain(driver: aufs.Driver, streams: Iterator[tuple[str, io.BufferedIOBase]]) -> str:
    parent = ""
    for layer, stream in streams:
        driver.create(layer, parent)
        with stream:
            driver.apply_diff(layer, parent, stream)
        parent = layer
    return parent


def layer_bytes(blob: Path) -> bytes:
    with gzip.open(blob) as stream:
        return stream.read()


def gzip_layers(tag: str) -> Iterator[tuple[str, io.BufferedIOBase]]:
    for index, blob in enumerate(oci_layers(tag)):
        yield f"{tag}-{index}-{blob.name[:12]}", io.BytesIO(layer_bytes(blob))


@pytest.mark.parametrize("tag", TAGS)
def test_oci_tags_match_umoci(harness: Harness, scratch: Path, umoci_trees: dict[str, Path],
                              tag: str) -> None:
    harness.require_union()
    driver = harness.driver(scratch / "store")
    try:
        top = apply_chain(driver, gzip_layers(tag))
        with driver.mounted(top) as merged:
            assert comparable(Path(merged)) == comparable(umoci_trees[tag])
    finally:
        driver.cleanup()


def test_docker_save_tarball_matches_umoci(harness: Harness, scratch: Path,
                                           umoci_trees: dict[str, Path]) -> None:
    harness.require_union()
    with tarfile.open(FIXTURES / "sample-docker.tar") as saved:
        manifest = json.load(saved.extractfile("manifest.json"))  # type: ignore[arg-type]
        layer_names = manifest[0]["Layers"]
        blobs = {name: saved.extractfile(name).read() for name in layer_names}  # type: ignore[union-attr]
    driver = harness.driver(scratch / "store")
    try:
        top = apply_chain(driver, ((f"docker-{i}", io.BytesIO(blobs[name]))  # type: ignore[misc]
                                   for i, name in enumerate(layer_names)))
        with driver.mounted(top) as merged:
            assert comparable(Path(merged)) == comparable(umoci_trees["latest"])
    finally:
        driver.cleanup()


@pytest.mark.parametrize("tag", ["latest", "insert"])
def test_each_layer_diff_round_trips(harness: Harness, scratch: Path, tag: str) -> None:
    harness.require_union()
    first = harness.driver(scratch / "first")
    second = harness.driver(scratch / "second")
    try:
        top = apply_chain(first, gzip_layers(tag))
        chain = [*reversed(first.parent_ids(top)), top]
        parent = ""
        for layer in chain:
            with first.diff(layer, parent) as stream:
                data = stream.read()
            second.create(layer, parent)
            second.apply_diff(layer, parent, io.BytesIO(data))
            assert comparable(Path(second.store.diff_path(layer))) == comparable(
                Path(first.store.diff_path(layer))), layer
            parent = layer
        with first.mounted(top) as one, second.mounted(top) as two:
            assert comparable(Path(one)) == comparable(Path(two))
    finally:
        first.cleanup()
        second.cleanup()


def test_insert_layers_lack_the_trailer(harness: Harness, scratch: Path) -> None:
    """umoci 0.4.7's `insert` layers end without the last padding and the end-of-archive
    blocks: Python's tarfile refuses them, we accept them as Go does."""
    truncated = [blob for blob in oci_layers("insert")
                 if len(layer_bytes(blob)) % 512]
    assert truncated, "the fixture should hold a layer without its trailer"
    driver = harness.driver(scratch / "store")
    for index, blob in enumerate(truncated):
        data = layer_bytes(blob)
        with pytest.raises(tarfile.ReadError), tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.getmembers()
        driver.create(f"x{index}")
        driver.apply_diff(f"x{index}", "", io.BytesIO(data))
        assert any(Path(driver.store.diff_path(f"x{index}")).rglob("*"))
        with pytest.raises(aufs.DiffError, match="ends inside"):  # one byte short of its data
            driver.apply_diff(f"x{index}", "", io.BytesIO(data[:-1]))
