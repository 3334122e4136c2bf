"""The C API: a consumer extension compiled here cimports aufs and calls it without the GIL."""

from __future__ import annotations

import errno
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import aufs
from conftest import NATIVE

CONSUMER = Path(__file__).parent / "consumer" / "walker_consumer.pyx"

SETUP = """
from Cython.Build import cythonize
from setuptools import Extension, setup
setup(ext_modules=cythonize([Extension("walker_consumer", ["walker_consumer.pyx"])],
                            include_path={include!r}, quiet=True))
"""


@pytest.fixture(scope="module")
def consumer(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    if NATIVE is None:
        pytest.skip("the native extension was not built, so there is no C API to link against")
    pytest.importorskip("Cython", reason="Cython is needed to compile the consumer")
    build = tmp_path_factory.mktemp("consumer")
    (build / "walker_consumer.pyx").write_text(CONSUMER.read_text())
    (build / "setup.py").write_text(SETUP.format(include=aufs.get_include()))
    subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=build, check=True, capture_output=True,
    )
    built = next(build.glob("walker_consumer*.so"))
    spec = importlib.util.spec_from_file_location("walker_consumer", built)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_get_include_finds_the_pxd_files() -> None:
    (include,) = aufs.get_include()
    for name in ("__init__.pxd", "_native.pxd"):
        assert (Path(include) / "aufs" / name).is_file()


def test_consumer_walks_without_the_gil(consumer: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "file").write_bytes(b"x" * 1234)
    (tmp_path / "b").write_bytes(b"y" * 66)
    for threads in (1, 2):
        assert consumer.size_without_gil(os.fsencode(tmp_path), threads) == (0, 1300)
    rc, _ = consumer.size_without_gil(os.fsencode(tmp_path / "missing"), 2)
    assert rc == -errno.ENOENT


def test_consumer_statfs_and_mountpoint(consumer: ModuleType) -> None:
    assert consumer.magic_without_gil(b"/proc") == (0, 0x9FA0)  # PROC_SUPER_MAGIC
    assert consumer.magic_without_gil(b"/no/such/path")[0] == -errno.ENOENT
    assert consumer.mountpoint_without_gil(b"/proc") == 1
    assert consumer.mountpoint_without_gil(b"/proc/self") == 0


def test_consumer_builds_mount_data(consumer: ModuleType) -> None:
    length, consumed, data = consumer.first_mount_data_without_gil(b"/r/3", b"/r/2", b"/r/1")
    expected = aufs.aufs_mount_data("/r/3", ["/r/2", "/r/1"], page_size=4096)[0].encode()
    assert (length, consumed, data) == (len(expected), 2, expected)
    assert consumer.first_mount_data_without_gil(b"/r:3", b"/r/2", b"/r/1")[0] == -errno.EINVAL
