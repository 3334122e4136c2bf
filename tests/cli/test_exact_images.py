"""`aufs import` then `aufs export` keeps an image's config digest and diff_ids, as skopeo
reads them; a layer changed in between is exported afresh, with a warning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, IS_ROOT

OCI = FIXTURES / "oci-sample"
TAGS = ["base", "v2", "latest", "insert"]

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="the CLI tests need root"),
    pytest.mark.skipif(shutil.which("skopeo") is None,
                       reason="skopeo is not installed (apt-get install skopeo)"),
]


def run(root: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "aufs", "--root", str(root), *arguments],
        capture_output=True, text=True, cwd="/", env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, f"aufs {' '.join(arguments)}:\n{result.stderr}"
    return result


def inspect(reference: str) -> tuple[str, list[str]]:
    """(config digest, diff_ids) as skopeo reads them."""
    def skopeo(*arguments: str) -> dict[str, object]:
        return json.loads(subprocess.run(["skopeo", "inspect", *arguments, reference],
                                         check=True, capture_output=True, text=True).stdout)
    manifest = skopeo("--raw")
    config = skopeo("--config")
    return manifest["config"]["digest"], config["rootfs"]["diff_ids"]  # type: ignore[index]


def test_oci_import_then_export_keeps_config_and_diff_ids(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run(root, "import", str(OCI))
    for tag in TAGS:
        out = tmp_path / f"out-{tag}"
        run(root, "export", tag, "-o", str(out))
        source = inspect(f"oci:{OCI}:{tag}")
        assert inspect(f"oci:{out}:{tag}") == source, tag


def test_docker_archive_in_and_out_keeps_config_and_diff_ids(tmp_path: Path) -> None:
    root = tmp_path / "root"
    source = FIXTURES / "sample-docker.tar"
    run(root, "import", str(source), "--tag", "sample")
    out = tmp_path / "out.tar"
    run(root, "export", "sample", "-o", str(out), "--format", "docker-archive")
    assert inspect(f"docker-archive:{out}") == inspect(f"docker-archive:{source}")


def test_a_layer_changed_after_import_is_exported_afresh_with_a_warning(tmp_path: Path
                                                                        ) -> None:
    root = tmp_path / "root"
    imported = json.loads(run(root, "import", f"{OCI}:v2", "--json").stdout)
    top = imported[0]["top"] if isinstance(imported, list) else imported["top"]
    branch = root / "diff" / top
    victim = next(path for path in sorted(branch.rglob("*"))
                  if path.is_file() and not path.is_symlink() and path.stat().st_size)
    with open(victim, "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 1]))
    out = tmp_path / "out"
    result = run(root, "export", "v2", "-o", str(out))
    assert "changed since it was applied" in result.stderr
    source_config, source_diff_ids = inspect(f"oci:{OCI}:v2")
    config, diff_ids = inspect(f"oci:{out}:v2")
    assert diff_ids[0] == source_diff_ids[0]  # the base layer is untouched
    assert diff_ids[1] != source_diff_ids[1]  # the changed one has its new digest
    assert config != source_config
