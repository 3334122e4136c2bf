"""Shared fixtures: both implementations, scratch space on tmpfs, and capability checks."""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import settings

import aufs
from aufs import _fallback

IS_ROOT = os.geteuid() == 0


def _native_module() -> ModuleType | None:
    try:
        return importlib.import_module("aufs._native")
    except ImportError:
        return None


NATIVE = _native_module()

requires_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (CAP_SYS_ADMIN) to mount")


def kernel_has_filesystem(name: str) -> bool:
    with open("/proc/filesystems") as listing:
        return any(line.split()[-1] == name for line in listing if line.strip())


@pytest.fixture(params=["native", "fallback"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """Each low-level implementation in turn (multidict's pattern)."""
    if request.param == "fallback":
        return _fallback
    if NATIVE is None:
        pytest.skip("the native extension was not built (AUFS_NO_EXTENSIONS=1 at build time)")
    return NATIVE


@contextlib.contextmanager
def tmpfs_mount(path: Path, size: str = "2g") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    aufs.mount("tmpfs", path, "tmpfs", 0, f"size={size},mode=0755")
    try:
        yield path
    finally:
        aufs.unmount(path, 2)  # MNT_DETACH: a failed test must not leave the mount busy


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory on its own tmpfs when we are root (fast and independent of /'s ext4
    without a journal), else a plain temporary directory."""
    if not IS_ROOT:
        yield tmp_path
        return
    with tmpfs_mount(tmp_path / "tmpfs") as mounted:
        yield mounted


@pytest.fixture(scope="session")
def session_scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="aufs-tests-") as base:
        if not IS_ROOT:
            yield Path(base)
            return
        with tmpfs_mount(Path(base) / "tmpfs", "4g") as mounted:
            yield mounted


# CI runs derandomized so that a red build is reproducible; local runs keep exploring.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
