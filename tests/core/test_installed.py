"""What users install: the suite runs against the wheel, and the wheel holds every module.

tests/run installs the wheel in a fresh venv and sets AUFS_TESTS_INSTALLED to that venv; an
editable checkout has nothing installed to check.
"""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

import pytest

import aufs
from conftest import REPO

VENV = os.environ.get("AUFS_TESTS_INSTALLED", "")

pytestmark = pytest.mark.skipif(
    not VENV, reason="the suite runs against the checkout; tests/run sets AUFS_TESTS_INSTALLED"
)


def installed_package() -> Path:
    return Path(aufs.__file__).resolve().parent


def test_aufs_is_imported_from_the_venv_not_the_checkout() -> None:
    site_packages = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    package = installed_package()
    assert package.parent in site_packages, f"aufs came from {package}"
    assert Path(VENV).resolve() in package.parents
    assert REPO not in package.parents


def test_every_source_file_is_in_the_wheel() -> None:
    package = installed_package()
    wanted = {
        path.relative_to(REPO / "aufs")
        for path in (REPO / "aufs").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
        and path.suffix not in (".c", ".so", ".html")  # Cython's output, made at build time
    }
    missing = sorted(str(name) for name in wanted if not (package / name).is_file())
    assert not missing, f"the wheel lacks {missing}"


def test_the_console_script_runs() -> None:
    script = Path(VENV) / "bin" / "aufs"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "usage: aufs" in result.stdout
