"""A Docker root being rescued is untrusted: its layerdb cannot send rescue to a host
directory, and its layer directories cannot make rescue read a FIFO, a device or a file
through a symlink (issue 16 items 12 and 13)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from aufs.docker.rescue import RescueError, rescue
from conftest import IS_ROOT
from dockerroot import build_docker_root

LAYERDB = Path("image", "aufs", "layerdb", "sha256")


@pytest.fixture
def docker_root(tmp_path: Path) -> Path:
    root = build_docker_root(tmp_path / "docker")
    secret = tmp_path / "host-secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE KEY\n")
    return root


def first_chain(root: Path) -> Path:
    """The layerdb entry of a base layer (no parent file), the same on every run."""
    return sorted(chain for chain in (root / LAYERDB).iterdir()
                  if not (chain / "parent").exists())[0]


def branch_of(root: Path, chain: Path) -> Path:
    return root / "aufs" / "diff" / (chain / "cache-id").read_text().strip()


def rescue_fails(root: Path, out: Path, match: str) -> None:
    with pytest.raises(RescueError, match=match):
        rescue(str(root), str(out))
    assert not out.exists()


@pytest.mark.parametrize("cache_id", ["../../host-secret", "/tmp", "..", "a/../../b"])
def test_cache_id_naming_a_host_directory_is_refused(docker_root: Path, tmp_path: Path,
                                                     cache_id: str) -> None:
    chain = first_chain(docker_root)
    (chain / "tar-split.json.gz").unlink()  # the fallback would archive the whole directory
    (chain / "cache-id").write_text(cache_id)
    rescue_fails(docker_root, tmp_path / "out", "cache-id")


@pytest.mark.parametrize("which", ["layer", "diff"])
def test_symlinked_layer_directory_is_refused(docker_root: Path, tmp_path: Path,
                                              which: str) -> None:
    chain = first_chain(docker_root)
    (chain / "tar-split.json.gz").unlink()
    branch = branch_of(docker_root, chain)
    if which == "layer":
        os.rename(branch, tmp_path / "moved")
        branch.symlink_to(tmp_path / "host-secret")
    else:
        diff = docker_root / "aufs" / "diff"
        os.rename(diff, tmp_path / "diff-elsewhere")
        diff.symlink_to(tmp_path / "diff-elsewhere")
    rescue_fails(docker_root, tmp_path / "out", "symlink")


def replace_a_file(root: Path, make: object) -> tuple[Path, str]:
    """Replaces the first non-empty regular file of a base layer (one tar-split reads)."""
    chain = first_chain(root)
    branch = branch_of(root, chain)
    for directory, _, files in sorted(os.walk(branch)):
        for name in sorted(files):
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink() and path.stat().st_size and \
                    not name.startswith(".wh."):
                path.unlink()
                make(path)  # type: ignore[operator]
                return path, chain.name
    raise AssertionError("the fixture layer has no file to replace")


def test_fifo_named_in_tar_split_does_not_hang(docker_root: Path, tmp_path: Path) -> None:
    replace_a_file(docker_root, os.mkfifo)
    results: list[object] = []

    def run() -> None:
        try:
            results.append(rescue(str(docker_root), str(tmp_path / "out")))
        except Exception as error:
            results.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)  # a hang guard, not a measure: the fixed rescue never blocks here
    if worker.is_alive():  # the daemon thread stays blocked; the process still exits
        pytest.fail("rescue blocked opening a FIFO named in tar-split")
    (images,) = results
    assert isinstance(images, list), images
    notes = [note for image in images for note in image.notes]
    assert any("a FIFO, not a regular file" in note for note in notes), notes


@pytest.mark.skipif(not IS_ROOT, reason="creating a device node needs CAP_MKNOD")
def test_device_named_in_tar_split_is_not_opened(docker_root: Path, tmp_path: Path) -> None:
    path, _ = replace_a_file(docker_root, lambda p: os.mknod(p, stat.S_IFCHR | 0o644,
                                                              os.makedev(1, 3)))
    images = rescue(str(docker_root), str(tmp_path / "out"))
    notes = [note for image in images for note in image.notes]
    assert any("a character device, not a regular file" in note for note in notes), notes
    assert stat.S_ISCHR(os.lstat(path).st_mode)


def test_symlink_named_in_tar_split_is_not_followed(docker_root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret" / "id_rsa"
    replace_a_file(docker_root, lambda p: p.symlink_to(secret))
    images = rescue(str(docker_root), str(tmp_path / "out"))
    notes = [note for image in images for note in image.notes]
    assert any("a symlink, not a regular file" in note for note in notes), notes
    blobs = tmp_path / "out" / "blobs" / "sha256"
    assert not any(b"PRIVATE KEY" in blob.read_bytes() for blob in blobs.iterdir())
