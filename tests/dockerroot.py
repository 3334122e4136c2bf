"""Builds a Docker data root that used the aufs driver, from the fixtures: Docker 20.10's image
store (image/vfs, which is image/aufs under another name) and the layer tars it was made from,
unpacked into aufs/diff/<cache-id> as Docker's aufs driver left them."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

from aufs.archive.extract import ExtractOptions, WhiteoutMode, extract
from conftest import FIXTURES

STORE = FIXTURES / "docker-image-store"


def layer_tars() -> dict[str, bytes]:
    """Every layer tar the fixtures hold, by its diff_id."""
    found: dict[str, bytes] = {}
    for archive_path in (FIXTURES / "sample-docker.tar", STORE / "sample-docker-insert.tar"):
        with tarfile.open(archive_path) as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(".tar"):
                    data = archive.extractfile(member).read()  # type: ignore[union-attr]
                    found["sha256:" + hashlib.sha256(data).hexdigest()] = data
    commit = (STORE / "commit-layer.tar").read_bytes()
    found["sha256:" + hashlib.sha256(commit).hexdigest()] = commit
    return found


def build_docker_root(root: Path) -> Path:
    shutil.copytree(STORE / "image" / "vfs", root / "image" / "aufs")
    tars = layer_tars()
    layerdb = root / "image" / "aufs" / "layerdb" / "sha256"
    for name in ("diff", "layers", "mnt"):
        (root / "aufs" / name).mkdir(parents=True, mode=0o710)
    cache_of = {chain.name: (chain / "cache-id").read_text().strip()
                for chain in layerdb.iterdir()}
    for chain in layerdb.iterdir():
        cache_id = cache_of[chain.name]
        diff_id = (chain / "diff").read_text().strip()
        branch = root / "aufs" / "diff" / cache_id
        branch.mkdir(mode=0o755)
        (root / "aufs" / "mnt" / cache_id).mkdir(mode=0o755)
        extract(io.BytesIO(tars[diff_id]), str(branch), ExtractOptions(WhiteoutMode.LITERAL))
        (branch / ".wh..wh.aufs").touch()  # what the aufs module leaves in every branch
        (branch / ".wh..wh.plnk").mkdir()
        (branch / ".wh..wh.orph").mkdir()
        parents = []
        parent = chain / "parent"
        while parent.exists():
            parent_chain = parent.read_text().strip().removeprefix("sha256:")
            parents.append(cache_of[parent_chain])
            parent = layerdb / parent_chain / "parent"
        (root / "aufs" / "layers" / cache_id).write_text("".join(f"{p}\n" for p in parents))
    return root


def image_ids() -> dict[str, str]:
    data = json.loads((STORE / "image" / "vfs" / "repositories.json").read_text())
    return {tag: image for refs in data["Repositories"].values() for tag, image in refs.items()}



