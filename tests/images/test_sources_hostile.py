"""Local image sources are untrusted: malformed metadata is an ImageSourceError naming the
problem, a symlink inside a source is refused, and every config is checked against its
digest (issue 16 items 4 and 14)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from aufs.errors import AufsError
from aufs.images.digests import DigestMismatchError
from aufs.images.sources import ImageSourceError, open_images
from conftest import FIXTURES

OCI = FIXTURES / "oci-sample"


def read(source: Path | str) -> list[object]:
    with open_images(str(source)) as images:
        return list(images)


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    copy = tmp_path / "layout"
    shutil.copytree(OCI, copy)
    return copy


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """`docker save` unpacked into a directory (a source form the reader takes)."""
    directory = tmp_path / "saved"
    with tarfile.open(FIXTURES / "sample-docker.tar") as archive:
        archive.extractall(directory, filter="data")
    return directory


def first_manifest(layout: Path) -> tuple[dict[str, object], Path]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    return json.loads(path.read_text()), path


@pytest.mark.parametrize("index, match", [
    ([], "index.json is not a JSON object but list"),
    ({"manifests": {"a": 1}}, "'manifests' is not a list"),
    ({"manifests": ["x"]}, "index.json manifest 1 is not a JSON object"),
    ({"manifests": [{"annotations": {}}]}, "has no 'digest'"),
    ({"manifests": [{"digest": "sha256:../../../etc/passwd"}]}, "malformed digest"),
])
def test_malformed_index(layout: Path, index: object, match: str) -> None:
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(AufsError, match=match):
        read(layout)


def test_manifest_without_config(layout: Path) -> None:
    manifest, path = first_manifest(layout)
    del manifest["config"]
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (path.parent / digest).write_bytes(data)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"] = [dict(index["manifests"][0], digest=f"sha256:{digest}")]
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageSourceError, match="manifest has no 'config'"):
        read(layout)


def test_oci_config_must_match_its_digest(layout: Path) -> None:
    manifest, _ = first_manifest(layout)
    config = layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]  # type: ignore[index]
    config.write_bytes(config.read_bytes().replace(b"{", b"{ ", 1))
    with pytest.raises(DigestMismatchError, match="config does not match"):
        read(layout)


def test_oci_blob_symlink_is_refused(layout: Path, tmp_path: Path) -> None:
    """A blob that is a symlink to a host file must not be read (issue 16 item 14)."""
    manifest, _ = first_manifest(layout)
    config = layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]  # type: ignore[index]
    host_copy = tmp_path / "host-file.json"
    host_copy.write_bytes(config.read_bytes())  # even the right bytes: a link is refused
    config.unlink()
    config.symlink_to(host_copy)
    with pytest.raises(ImageSourceError, match="symlink"):
        read(layout)


def test_oci_blobs_directory_symlink_is_refused(layout: Path, tmp_path: Path) -> None:
    os.rename(layout / "blobs", tmp_path / "blobs-elsewhere")
    (layout / "blobs").symlink_to(tmp_path / "blobs-elsewhere")
    with pytest.raises(ImageSourceError, match="symlink"):
        read(layout)


def test_oci_blob_fifo_is_refused(layout: Path) -> None:
    manifest, _ = first_manifest(layout)
    config = layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]  # type: ignore[index]
    config.unlink()
    os.mkfifo(config)
    with pytest.raises(ImageSourceError, match="FIFO"):
        read(layout)


def docker_config(saved: Path) -> tuple[list[dict[str, object]], Path]:
    manifest = json.loads((saved / "manifest.json").read_text())
    return manifest, saved / str(manifest[0]["Config"])


def test_docker_save_config_symlink_is_refused(saved: Path, tmp_path: Path) -> None:
    """The attack: config.json, not named by a digest, links to a root-only host file."""
    manifest, config = docker_config(saved)
    secret = tmp_path / "root-only.json"
    secret.write_bytes(config.read_bytes())
    secret.chmod(0o600)
    (saved / "config.json").symlink_to(secret)
    manifest[0]["Config"] = "config.json"
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImageSourceError, match="symlink"):
        read(saved)


def test_docker_save_config_not_named_by_digest_is_hashed(saved: Path) -> None:
    manifest, config = docker_config(saved)
    shutil.copy(config, saved / "config.json")
    manifest[0]["Config"] = "config.json"
    (saved / "manifest.json").write_text(json.dumps(manifest))
    images = read(saved)
    expected = "sha256:" + hashlib.sha256(config.read_bytes()).hexdigest()
    assert images[0].config_digest == expected  # type: ignore[attr-defined]


def test_docker_save_config_named_by_another_digest(saved: Path) -> None:
    _, config = docker_config(saved)
    config.write_bytes(config.read_bytes().replace(b"{", b"{ ", 1))
    with pytest.raises(DigestMismatchError, match="does not match the digest it is named by"):
        read(saved)


@pytest.mark.parametrize("manifest, match", [
    ({"Config": "x.json"}, "manifest.json is not a JSON list but dict"),
    ([{"Layers": []}], "entry 1 has no 'Config'"),
    (["x"], "entry 1 is not a JSON object"),
])
def test_malformed_docker_manifest(saved: Path, manifest: object, match: str) -> None:
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImageSourceError, match=match):
        read(saved)


def test_symlink_member_of_a_tar_source_is_refused(saved: Path, tmp_path: Path) -> None:
    manifest, config = docker_config(saved)
    manifest[0]["Config"] = "config.json"
    archive_path = tmp_path / "evil.tar"
    with tarfile.open(archive_path, "w") as archive:
        for path in sorted(saved.rglob("*")):
            name = str(path.relative_to(saved))
            if name == "manifest.json":
                data = json.dumps(manifest).encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.add(path, name, recursive=False)
        link = tarfile.TarInfo("config.json")
        link.type = tarfile.SYMTYPE
        link.linkname = config.name
        archive.addfile(link)
    with pytest.raises(ImageSourceError, match=r"config\.json is a link"):
        read(archive_path)
