"""Crash-safe file operations: atomic replace and Docker's "-removing" delete."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import time

from aufs.archive import beneath
from aufs.ids import REMOVING_SUFFIX

log = logging.getLogger(__name__)


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, *, temp_dir: str, mode: int = 0o644) -> None:
    """Replaces path with data: write a temp file in temp_dir (same filesystem), fsync it,
    rename it over path, fsync the directory. A crash leaves the old file or the new one."""
    fd, temp_path = tempfile.mkstemp(dir=temp_dir, prefix=".write-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.rename(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise
    fsync_directory(os.path.dirname(path))


def _rmtree_ignoring_missing(path: str) -> None:
    # not shutil.rmtree: before Python 3.13 it recurses once per level, and a layer from an
    # archive can be 2,000 directories deep
    parent, name = os.path.split(os.path.abspath(path))
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        beneath.remove_tree(parent_fd, name, missing_ok=True)
    finally:
        os.close(parent_fd)


def remove_tree(path: str, *, busy_attempts: int = 50, busy_delay: float = 0.1) -> None:
    """rm -rf that tolerates entries vanishing and retries EBUSY, like Docker's
    EnsureRemoveAll but without unmounting: callers unmount first, on purpose."""
    for attempt in range(1, busy_attempts + 1):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                _rmtree_ignoring_missing(path)
            else:
                os.unlink(path)
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno != errno.EBUSY or attempt == busy_attempts:
                raise
            log.debug("removing %s: busy (retrying %d/%d)", path, attempt, busy_attempts)
            time.sleep(busy_delay)


def atomic_remove(source: str) -> None:
    """Docker's atomicRemove: rename source to source-removing (it leaves the store at once,
    and the next start finishes the job if we crash), then delete the renamed tree."""
    target = source + REMOVING_SUFFIX
    try:
        os.rename(source, target)
    except FileNotFoundError:
        pass
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        if os.path.lexists(source):
            raise OSError(
                error.errno, f"{target} exists but should not; remove it by hand, then retry",
                source,
            ) from error
    remove_tree(target)
