"""Shared fixtures: both implementations, scratch space on tmpfs, and capability checks."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import settings

import aufs
from aufs import _fallback
from aufs.machine import Kernel

IS_ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parent.parent
# images made by umoci, skopeo and Docker 20.10 (tests/fixtures/README.md says how)
FIXTURES = REPO / "tests" / "fixtures"


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


def holds_user_xattrs(directory: Path) -> bool:
    """Whether directory's filesystem keeps user.* xattrs (tmpfs does from Linux 6.6 only;
    the aufs guest runs 6.1)."""
    probe = directory / ".user-xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        return False
    finally:
        probe.unlink()
    return True


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


# ---- the driver harness: one suite, every backend that works here ----------------------------

# On a kernel with aufs (tests/guest/run boots one), the real aufs backend takes the place of
# the recorded one: the whole driver suite mounts it for real.
KERNEL_HAS_AUFS = kernel_has_filesystem("aufs")
AUFS_HARNESS = "aufs" if KERNEL_HAS_AUFS else "aufs-recorded"
BACKEND_NAMES = ["overlay", "fuse-overlayfs", AUFS_HARNESS]
NO_AUFS_REASON = "the kernel has no aufs; tests/guest/run boots one that has (-m aufs_kernel)"
requires_aufs = pytest.mark.skipif(not (KERNEL_HAS_AUFS and IS_ROOT),
                                   reason=NO_AUFS_REASON if not KERNEL_HAS_AUFS
                                   else "needs root to mount aufs")


class Harness:
    """Builds drivers for one backend. `real_union` says whether reads see a union mount."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.real_union = name != "aufs-recorded"
        self.recorder = aufs.RecordingMounter() if not self.real_union else None

    def backend(self) -> str | aufs.Backend:
        if self.recorder is not None:
            return aufs.AufsBackend(
                self.recorder, kernel=Kernel(frozenset({"aufs"}), False), dirperm1=False,
                auplink=None,
            )
        return self.name

    def driver(self, root: Path | str, **kwargs: Any) -> aufs.Driver:
        return aufs.Driver(root, backend=self.backend(), **kwargs)

    def is_mounted(self, path: str) -> bool:
        if self.recorder is not None:
            return self.recorder.is_mounted(path)
        return aufs.store.mounters.SYSCALLS.is_mounted(path)

    def require_union(self) -> None:
        if not self.real_union:
            pytest.skip("aufs is recorded, not mounted, on this kernel: this test reads the union")


def backend_unavailable(name: str) -> str | None:
    """Why a backend cannot run its tests here, or None."""
    if name == "aufs-recorded":
        return None
    if not IS_ROOT:
        return f"{name} tests mount filesystems: they need root"
    if name == "aufs" and not KERNEL_HAS_AUFS:
        return NO_AUFS_REASON
    if name == "overlay" and not kernel_has_filesystem("overlay"):
        return "the kernel has no overlayfs"
    if name == "fuse-overlayfs":
        if shutil.which("fuse-overlayfs") is None:
            return "fuse-overlayfs is not installed (apt-get install fuse-overlayfs)"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
    return None


@pytest.fixture(params=BACKEND_NAMES)
def harness(request: pytest.FixtureRequest) -> Harness:
    reason = backend_unavailable(request.param)
    if reason:
        pytest.skip(reason)
    return Harness(request.param)


@pytest.fixture
def driver(harness: Harness, scratch: Path) -> Iterator[aufs.Driver]:
    """A driver on a fresh root; cleaned up (all mounts released) afterwards."""
    instance = harness.driver(scratch / "aufs")
    try:
        yield instance
    finally:
        instance.cleanup()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "aufs_kernel: mounts a real aufs; CI runs these inside tests/guest/run")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every driver-suite case on the real aufs backend carries the aufs_kernel marker."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("harness") == "aufs":
            item.add_marker(pytest.mark.aufs_kernel)
