"""apply_diff's result on the fast path into an empty layer is summed while unpacking, not
walked afterwards: it must equal the walk (Docker's directory.Size rules) for any archive.
Archives that remove or replace something on the way fall back to the walk."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aufs
from aufs import _implementation as native
from aufs.archive import extract as extraction
from aufs.archive.whiteouts import OPAQUE_MARKER, PREFIX
from conftest import Harness
from tarbuild import archive, directory, member

NAMES = st.sampled_from(["a", "b", "d/c", "d/e", "d/f/g", "h", "é", "d/f/i"])


@st.composite
def entries(draw: st.DrawFn) -> list[tuple[tarfile.TarInfo, bytes]]:
    made: list[str] = []
    out = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(NAMES)
        kind = draw(st.sampled_from(["file", "file", "dir", "symlink", "hardlink", "fifo",
                                     "whiteout", "opaque"]))
        if kind == "file":
            out.append(member(name, data=draw(st.binary(max_size=3000))))
            made.append(name)
        elif kind == "dir":
            out.append(directory(name))
        elif kind == "symlink":
            target = draw(st.text(min_size=1, max_size=40).filter(lambda text: "\0" not in text))
            out.append(member(name, tarfile.SYMTYPE, linkname=target))
        elif kind == "hardlink" and made:
            out.append(member(name, tarfile.LNKTYPE, linkname=draw(st.sampled_from(made))))
        elif kind == "fifo":
            out.append(member(name, tarfile.FIFOTYPE))
        elif kind == "whiteout":
            parent, _, base = name.rpartition("/")
            out.append(member(f"{parent}/{PREFIX}{base}".lstrip("/")))
        elif kind == "opaque":
            parent = name.rpartition("/")[0] or "d"
            out.append(member(f"{parent}/{OPAQUE_MARKER}"))
    return out


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=entries())
def test_the_summed_size_is_the_walked_size(driver: aufs.Driver, members: list[
        tuple[tarfile.TarInfo, bytes]]) -> None:
    layer = f"layer-{len(driver.layer_ids())}"
    driver.create(layer)
    try:
        size = driver.apply_diff(layer, "", io.BytesIO(archive(members)))
    except aufs.DiffError:
        return  # a hardlink to something replaced since, a file over a directory...
    assert size == native.directory_size(driver.store.diff_path(layer))


def test_the_walk_is_skipped_only_when_nothing_was_removed(harness: Harness, scratch: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    driver = harness.driver(scratch / "store")
    walks = []
    walk = native.directory_size
    monkeypatch.setattr(native, "directory_size", lambda path: walks.append(path) or walk(path))
    driver.create("plain")
    assert driver.apply_diff("plain", "", io.BytesIO(archive([
        member("f", data=b"12345"), member("l", tarfile.SYMTYPE, linkname="f"),
        member("h", tarfile.LNKTYPE, linkname="f")]))) == 5 + 1
    assert walks == []
    driver.create("whiteout")  # a whiteout of nothing removes nothing: still summed
    assert driver.apply_diff("whiteout", "", io.BytesIO(archive([
        member("f", data=b"123"), member(PREFIX + "gone")]))) == 3
    assert walks == []
    driver.create("twice")
    assert driver.apply_diff("twice", "", io.BytesIO(archive([
        member("f", data=b"12345"), member("f", data=b"1")]))) == 1
    assert walks == [driver.store.diff_path("twice")]
    driver.create("again")
    driver.apply_diff("again", "", io.BytesIO(archive([member("f", data=b"12")])))
    assert driver.apply_diff("again", "", io.BytesIO(archive([member("g", data=b"1")]))) == 3
    assert walks[-1] == driver.store.diff_path("again")  # not empty before: walked
    source = scratch / "sparse-source"
    source.mkdir()
    with open(source / "holes", "wb") as handle:
        handle.truncate(1 << 20)
        handle.seek(512 << 10)
        handle.write(b"x" * 4096)
    sparse = subprocess.run(["tar", "--sparse", "--format=posix", "-cf", "-", "-C", str(source),
                             "holes"], check=True, capture_output=True).stdout
    driver.create("sparse")
    assert driver.apply_diff("sparse", "", io.BytesIO(sparse)) == 1 << 20
    assert walk(driver.store.diff_path("sparse")) == 1 << 20
    assert walks[-1] == driver.store.diff_path("again")  # summed, not walked
    result = extraction.ExtractResult()
    assert (result.added_size, result.removed_something) == (0, False)
    driver.cleanup()
