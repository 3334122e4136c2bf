"""Overlay2's short links (ROOT/l/<26 chars> -> ../diff/<id>): one classic mount(2) while the
chain fits a page, fsmount beyond; the cached chains and how they follow changes; links made
lazily, removed with their layer, checked and repaired by fsck."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import aufs
from aufs.store import fsck
from aufs.store.layout import SHORT_LINK_LENGTH, Store, short_link_name
from aufs.store.migrate import migrate
from conftest import backend_unavailable

pytestmark = pytest.mark.skipif(bool(backend_unavailable("overlay")),
                                reason=str(backend_unavailable("overlay")))


def chain(driver: aufs.Driver, depth: int, width: int = 8) -> list[str]:
    """A base and depth children, ids `width` characters long; returns them, base first."""
    layers: list[str] = []
    for index in range(depth + 1):
        layer = f"{index:04d}".ljust(width, "f")
        driver.create(layer, layers[-1] if layers else "")
        Path(driver.store.diff_path(layer), f"file{index}").write_text(str(index))
        layers.append(layer)
    return layers


def recorded(root: Path) -> tuple[aufs.Driver, aufs.RecordingMounter]:
    mounter = aufs.RecordingMounter()
    backend = aufs.OverlayBackend(mounter, lowerdir_append=True)
    return aufs.Driver(root, backend=backend), mounter


def test_link_names_are_overlay2_length_and_stable() -> None:
    name = short_link_name("a" * 64)
    assert len(name) == SHORT_LINK_LENGTH and name.isalnum() and name.isupper()
    assert short_link_name("a" * 64) == name != short_link_name("b" * 64)


def test_a_chain_that_fits_a_page_is_one_mount_with_relative_links(scratch: Path) -> None:
    driver, mounter = recorded(scratch / "root")
    layers = chain(driver, 100, width=64)
    driver.get(layers[-1])
    (call,) = mounter.mount_calls()
    assert (call.operation, call.fstype, call.directory) == ("mount", "overlay", driver.root)
    assert isinstance(call.data, str) and len(call.data.encode()) < os.sysconf("SC_PAGE_SIZE")
    lowerdir = call.data.split(",")[0].removeprefix("lowerdir=").split(":")
    assert len(lowerdir) == 100
    for name, parent in zip(lowerdir, reversed(layers[:-1]), strict=True):
        assert name.startswith("l/")
        assert os.path.realpath(os.path.join(driver.root, name)) == driver.store.diff_path(parent)
    driver.put(layers[-1])


def test_beyond_a_page_the_chain_mounts_with_lowerdir_plus(scratch: Path) -> None:
    driver, mounter = recorded(scratch / "root")
    layers = chain(driver, 150, width=64)
    driver.get(layers[-1])
    (call,) = mounter.mount_calls()
    assert call.operation == "fsmount"
    assert isinstance(call.data, tuple)
    lowers = [value for key, value in call.data if key == "lowerdir+"]
    assert lowers == [driver.store.diff_path(parent) for parent in reversed(layers[:-1])]
    driver.put(layers[-1])


def test_real_mount_over_links_leaves_the_callers_cwd_alone(scratch: Path) -> None:
    driver = aufs.Driver(scratch / "root", backend="overlay")
    layers = chain(driver, 100, width=64)
    before = os.getcwd()
    with driver.mounted(layers[-1]) as path:
        assert os.getcwd() == before
        assert len(os.listdir(path)) == 101
        assert Path(path, "file0").read_text() == "0"
    driver.cleanup()


_ONE_THREAD_GET = """
import json, os, sys
import aufs
driver = aufs.Driver(sys.argv[1], backend="overlay")
top = sys.argv[2]
before = os.getcwd()
with driver.mounted(top) as path:
    seen = sorted(os.listdir(path))
print(json.dumps({"threads": os.stat("/proc/self/task").st_nlink - 2, "files": len(seen),
                  "cwd_kept": os.getcwd() == before}))
driver.cleanup()
"""


@pytest.mark.parametrize("extensions", ["native", "fallback"])
def test_a_process_of_one_thread_mounts_over_links_in_that_thread(scratch: Path,
                                                                  extensions: str) -> None:
    """No thread of its own cwd is started while the process has one thread: the chdir there
    and back is invisible then (Docker's mounting child does the same), and a hand-over to
    another thread cost more than the rest of get and put together."""
    driver = aufs.Driver(scratch / "root", backend="overlay")
    layers = chain(driver, 100, width=64)
    environment = dict(os.environ, AUFS_NO_EXTENSIONS="1" if extensions == "fallback" else "0")
    found = subprocess.run([sys.executable, "-c", _ONE_THREAD_GET, driver.root, layers[-1]],
                           capture_output=True, text=True, check=True, env=environment)
    assert json.loads(found.stdout) == {"threads": 1, "files": 101, "cwd_kept": True}


def test_real_mount_over_links_with_other_threads_running(scratch: Path) -> None:
    """Another thread shares the working directory: the mount goes through the thread of
    its own cwd, and neither thread sees the cwd move."""
    driver = aufs.Driver(scratch / "root", backend="overlay")
    layers = chain(driver, 100, width=64)
    before = os.getcwd()
    seen: list[str] = []
    release = threading.Event()

    def watch() -> None:
        while not release.is_set():
            seen.append(os.getcwd())
            release.wait(0.0005)

    other = threading.Thread(target=watch)
    other.start()
    try:
        for _ in range(3):
            with driver.mounted(layers[-1]) as path:
                assert os.getcwd() == before
                assert Path(path, "file0").read_text() == "0"
    finally:
        release.set()
        other.join()
    assert set(seen) == {before}
    driver.cleanup()


def test_a_link_removed_under_the_cache_is_made_again(scratch: Path) -> None:
    driver = aufs.Driver(scratch / "root", backend="overlay")
    base, child = chain(driver, 1)
    with driver.mounted(child):
        pass
    link = driver.store.short_link_path(base)
    assert os.readlink(link) == f"../diff/{base}"
    os.unlink(link)  # by hand, or by another process's fsck
    with driver.mounted(child) as path:
        assert Path(path, "file0").read_text() == "0"
    assert os.readlink(link) == f"../diff/{base}"
    driver.cleanup()


def test_the_cached_chain_follows_the_layers_file(scratch: Path) -> None:
    driver = aufs.Driver(scratch / "root", backend="overlay")
    driver.create("a")
    driver.create("b")
    driver.create("c", "a")
    first = driver.store.mount_chain("c", short_links=True)
    assert first.parents == ("a",)
    assert driver.store.mount_chain("c", short_links=True) is first  # cached
    Store(driver.root).write_layer_file("c", ["b"])  # another process rewrites it
    again = driver.store.mount_chain("c", short_links=True)
    assert again.parents == ("b",)
    assert again.short_lowerdir == f"l/{short_link_name('b')}"
    assert driver.parent_ids("c") == ["b"]


def test_links_go_with_their_layer(scratch: Path) -> None:
    driver = aufs.Driver(scratch / "root", backend="overlay")
    base, child = chain(driver, 1)
    with driver.mounted(child):
        pass
    assert os.path.islink(driver.store.short_link_path(base))
    driver.remove(child)
    driver.remove(base)
    assert os.listdir(driver.store.link_dir) == []


def test_a_wrong_link_is_replaced_in_one_rename(scratch: Path) -> None:
    store = Store(str(scratch))
    os.makedirs(store.link_dir)
    os.symlink("../diff/other", store.short_link_path("mine"))
    store.ensure_short_link("mine")
    assert os.readlink(store.short_link_path("mine")) == "../diff/mine"
    assert os.listdir(store.link_dir) == [short_link_name("mine")]  # no temporary left


def test_fsck_finds_and_repairs_bad_and_orphan_links(scratch: Path) -> None:
    driver = aufs.Driver(scratch / "root", backend="overlay")
    base, _middle, top = chain(driver, 2)
    with driver.mounted(top):
        pass
    driver.cleanup()
    store = driver.store
    os.unlink(store.short_link_path(base))
    os.symlink("../diff/elsewhere", store.short_link_path(base))
    os.symlink("../diff/gone", os.path.join(store.link_dir, "ZZZZZZZZZZZZZZZZZZZZZZZZZZ"))
    os.symlink("../diff/x", os.path.join(store.link_dir, ".leftover.1.2"))  # a crashed make
    problems = fsck.check(driver.root)
    assert sorted(problem.code for problem in problems) == [
        "bad-short-link", "orphan-short-link", "orphan-short-link"]
    assert all(problem.safe for problem in problems)
    repaired, left = fsck.repair(driver.root)
    assert len(repaired) == 3 and left == []
    assert store.short_link_ok(base)
    with aufs.Driver(driver.root, backend="overlay").mounted(top) as path:
        assert Path(path, "file0").read_text() == "0"


def test_a_docker_root_migrated_to_overlay_gains_links_on_first_mount(scratch: Path) -> None:
    root = scratch / "docker" / "aufs"
    for name in ("layers", "diff", "mnt"):
        (root / name).mkdir(parents=True, mode=0o710)
    base, child = "a" * 64, "b" * 64
    (root / "layers" / base).write_bytes(b"")
    (root / "layers" / child).write_bytes(f"{base}\n".encode())
    for layer in (base, child):
        (root / "diff" / layer).mkdir()
        (root / "mnt" / layer).mkdir()
    (root / "diff" / base / "from-base").write_text("base\n")
    migrate(Store(str(root)), "overlay")
    assert not (root / "l").exists()
    driver = aufs.Driver(root, backend="overlay")
    with driver.mounted(child) as path:
        assert Path(path, "from-base").read_text() == "base\n"
    assert os.readlink(root / "l" / short_link_name(base)) == f"../diff/{base}"
    assert fsck.check(str(root)) == []
    driver.cleanup()
