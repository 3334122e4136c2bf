"""An entry swapped between the walk's listing and its open: the archive never takes another
file's content under its name, and a FIFO put in its place never hangs the walk."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from aufs.archive.export import ExportOptions, TarWriter


@pytest.mark.parametrize("swap", ["file", "fifo"])
def test_an_entry_swapped_after_it_was_listed_is_refused(tmp_path: Path, swap: str) -> None:
    (tmp_path / "f").write_bytes(b"listed")
    listed = os.lstat(tmp_path / "f")  # what the walk saw
    (tmp_path / "f").rename(tmp_path / "kept")  # kept: its inode number is not reused
    if swap == "fifo":
        os.mkfifo(tmp_path / "f")  # a blocking open would wait for a writer forever
    else:
        (tmp_path / "f").write_bytes(b"another")
    out = os.open(os.devnull, os.O_WRONLY)
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    writer = TarWriter(out, ExportOptions())
    try:
        with pytest.raises(OSError) as caught:
            writer.add(parent, "f", "f", listed)
        assert caught.value.errno == errno.ESTALE
        assert caught.value.filename == "f"
    finally:
        writer.abort()
        os.close(parent)
        os.close(out)
