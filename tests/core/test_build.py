"""The native extension is there when it should be, and AUFS_NO_EXTENSIONS picks the fallback."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import aufs
from conftest import REPO

FORCED_FALLBACK = os.environ.get("AUFS_NO_EXTENSIONS", "") not in ("", "0")


@pytest.mark.skipif(FORCED_FALLBACK, reason="AUFS_NO_EXTENSIONS is set: the fallback is expected")
def test_native_extension_is_live() -> None:
    # Fails if the build silently skipped the extension (aiohttp's guard).
    assert aufs.IMPLEMENTATION == "native", "the Cython extension did not build or import"
    assert aufs.directory_size.__module__ == "aufs._native"


@pytest.mark.skipif(not FORCED_FALLBACK, reason="only meaningful with AUFS_NO_EXTENSIONS=1")
def test_fallback_is_forced() -> None:
    assert aufs.IMPLEMENTATION == "fallback"
    assert aufs.directory_size.__module__ == "aufs._fallback"


def test_environment_switch_in_a_fresh_interpreter() -> None:
    script = "import aufs; print(aufs.IMPLEMENTATION)"
    # a wheel built with AUFS_NO_EXTENSIONS=1 has no extension to switch back to
    built = importlib.util.find_spec("aufs._native") is not None
    for value, expected in (("1", "fallback"), ("", "native" if built else "fallback")):
        environment = dict(os.environ, AUFS_NO_EXTENSIONS=value)
        output = subprocess.run(
            [sys.executable, "-c", script], env=environment, cwd="/", check=True,
            capture_output=True, text=True,
        ).stdout.strip()
        assert output == expected


@pytest.mark.skipif(not (REPO / "setup.py").is_file(), reason="runs from a source checkout only")
def test_sdist_carries_the_sources(tmp_path: Path) -> None:
    environment = dict(os.environ, AUFS_NO_EXTENSIONS="1")
    # sdist stages its tree in the checkout: one test run at a time per checkout (a lock on
    # setup.py), with the egg-info beside the sdist
    with open(REPO / "setup.py") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(
            [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
             "sdist", "-d", str(tmp_path)],
            cwd=REPO, env=environment, check=True, capture_output=True,
        )
    (archive,) = tmp_path.glob("aufs-*.tar.gz")
    with tarfile.open(archive) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    csrc = sorted(f"csrc/{path.name}" for path in (REPO / "csrc").iterdir()
                  if path.suffix in (".c", ".h"))
    assert "csrc/unpackrun.c" in csrc
    for required in ("setup.py", "pyproject.toml", "aufs/_native.pyx", "aufs/_native.pxd",
                     "aufs/__init__.pxd", "aufs/_core.pxd", "aufs/_native.pyi", "aufs/py.typed",
                     *csrc):
        assert required in names, f"{required} missing from the sdist"
