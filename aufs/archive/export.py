"""Writing a layer as a tar stream in AUFS whiteout format, the format of image archives.

A branch's own whiteouts are converted on the way out: 0/0 character devices become
`.wh.<name>`, an opaque directory gets a `.wh..wh..opq` entry, and the aufs metadata at the
top (`.wh..wh.aufs`, `.wh..wh.plnk/`, `.wh..wh.orph/`) is left out, as Docker's Diff does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from aufs import _implementation as native
from aufs.archive import whiteouts
from aufs.archive.format import (
    BLOCK_DEVICE,
    CHAR,
    DIRECTORY,
    FIFO,
    HARDLINK,
    REGULAR,
    SYMLINK,
    ZERO_BLOCK,
    TarHeader,
    build_header,
)
from aufs.archive.idmap import IdentityMapping
from aufs.errors import DiffError

log = logging.getLogger(__name__)

# O_NONBLOCK: a FIFO swapped in after the entry was listed must not hang the walk
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FLUSH_AT = 64 * 1024
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


@dataclass
class ExportOptions:
    id_mapping: IdentityMapping = field(default_factory=IdentityMapping)
    convert_whiteouts: bool = True  # read 0/0 devices and opaque xattrs as whiteouts
    skip_aufs_metadata: bool = True  # leave out the top-level .wh..wh.* but .wh..wh..opq


class TarWriter:
    """The walking thread builds headers and opens files; a background thread writes them
    out in order, file data straight from the file with sendfile(2)."""

    def __init__(self, out_fd: int, options: ExportOptions) -> None:
        self.out_fd = out_fd
        self.options = options
        self._pending = bytearray()
        self._links: dict[tuple[int, int], str] = {}
        self._io = native.IOQueue()
        self._padding_due = 0  # zeros owed after the last file's data, sent with what follows

    def _emit(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) >= FLUSH_AT:
            self._submit(bytes(self._pending))
            self._pending.clear()

    def _submit(self, headers: bytes, fd: int = -1, size: int = 0, name: str = "") -> None:
        """Queues headers (after the previous file's padding) and a file's data."""
        try:
            self._io.write(self.out_fd, bytes(self._padding_due) + headers, fd, size, 0, name)
        except OSError as error:
            raise _io_failure(error) from error
        self._padding_due = -size % 512

    def close(self) -> None:
        self._emit(ZERO_BLOCK * 2)
        self._submit(bytes(self._pending))
        self._pending.clear()
        try:
            self._io.close()
        except OSError as error:
            raise _io_failure(error) from error

    def abort(self) -> None:
        """Stops after an error elsewhere; queued jobs still close their fds."""
        with contextlib.suppress(OSError):
            self._io.close()

    def add_whiteout(self, name: str, info: os.stat_result | None = None) -> None:
        """A `.wh.` entry; Docker gives converted ones mode 0600 and the device's owner."""
        owner = (info.st_uid, info.st_gid) if info is not None else (0, 0)
        mtime = info.st_mtime_ns if info is not None else time.time_ns()
        self._emit(build_header(TarHeader(name=name, typeflag=REGULAR,
                                          mode=0o600 if info is not None else 0,
                                          uid=owner[0], gid=owner[1],
                                          mtime_ns=mtime - mtime % 1_000_000_000)))

    def add_opaque_marker(self, directory: str, info: os.stat_result) -> None:
        """`.wh..wh..opq` after an opaque directory: its permission bits and owner (Docker)."""
        self._emit(build_header(TarHeader(
            name=f"{directory}/{whiteouts.OPAQUE_MARKER}", typeflag=REGULAR,
            mode=stat.S_IMODE(info.st_mode) & 0o777, uid=info.st_uid, gid=info.st_gid)))

    def add(self, parent_fd: int, base: str, name: str, info: os.stat_result) -> None:
        """One entry read from base in parent_fd, archived as name."""
        mapping = self.options.id_mapping
        is_whiteout_name = base.startswith(whiteouts.PREFIX)
        try:
            uid = info.st_uid if is_whiteout_name else mapping.uids.to_container(info.st_uid)
            gid = info.st_gid if is_whiteout_name else mapping.gids.to_container(info.st_gid)
        except ValueError as error:
            raise DiffError(f"entry {name!r}: {error}") from None
        header = TarHeader(name=name, typeflag=REGULAR, mode=stat.S_IMODE(info.st_mode),
                           uid=uid, gid=gid,
                           mtime_ns=info.st_mtime_ns - info.st_mtime_ns % 1_000_000_000)
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            header.typeflag = DIRECTORY
            header.name = name.rstrip("/") + "/"
        elif stat.S_ISLNK(mode):
            header.typeflag = SYMLINK
            header.linkname = os.readlink(base, dir_fd=parent_fd)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            header.typeflag = CHAR if stat.S_ISCHR(mode) else BLOCK_DEVICE
            header.devmajor, header.devminor = os.major(info.st_rdev), os.minor(info.st_rdev)
        elif stat.S_ISFIFO(mode):
            header.typeflag = FIFO
        elif stat.S_ISSOCK(mode):
            log.debug("leaving out socket %s: tar cannot hold it", name)
            return
        if not stat.S_ISDIR(mode) and info.st_nlink > 1 and not is_whiteout_name:
            first = self._links.get((info.st_dev, info.st_ino))
            if first is not None:
                header.typeflag, header.linkname = HARDLINK, first
                self._emit(build_header(header))
                return
            self._links[(info.st_dev, info.st_ino)] = name
        if not stat.S_ISREG(mode):
            header.xattrs = _exported_xattrs(None, parent_fd, base, mode)
            self._emit(build_header(header))
            return
        header.size = info.st_size
        data_fd = os.open(base, READ_FLAGS, dir_fd=parent_fd)
        opened = os.fstat(data_fd)
        if (not stat.S_ISREG(opened.st_mode)
                or (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino)):
            os.close(data_fd)  # another entry took its name since it was listed
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), name)
        try:
            header.xattrs = _exported_xattrs(data_fd, parent_fd, base, mode)
            self._emit(build_header(header))
        except BaseException:
            os.close(data_fd)
            raise
        headers = bytes(self._pending)
        self._pending.clear()
        self._submit(headers, data_fd, info.st_size, name)


def _io_failure(error: OSError) -> Exception:
    """A failed write of the archive: the reader left (EPIPE, kept as is) or an entry failed."""
    if error.errno == errno.EPIPE:
        return error
    if error.errno == errno.ENODATA:
        return DiffError(f"entry {error.filename!r}: the file shrank while it was archived")
    return DiffError(f"entry {error.filename!r}: {error.strerror}")


def _exported_xattrs(fd: int | None, parent_fd: int, base: str, mode: int) -> dict[str, bytes]:
    """Every xattr that belongs to the content (not to overlayfs, fuse-overlayfs or the
    host's SELinux policy)."""
    if stat.S_ISLNK(mode) or (fd is None and not stat.S_ISDIR(mode)):
        return {}
    opened = -1
    if fd is None:
        opened = fd = os.open(base, DIR_FLAGS, dir_fd=parent_fd)
    try:
        names = os.listxattr(fd)
        return {name: os.getxattr(fd, name) for name in names
                if not whiteouts.is_internal_xattr(name)}
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    finally:
        if opened >= 0:
            os.close(opened)


def _sorted_entries(fd: int) -> list[os.DirEntry[str]]:
    with os.scandir(fd) as entries:
        return sorted(entries, key=lambda entry: os.fsencode(entry.name))


# Directory fds a walk keeps open at once: the deepest levels of its path (and the root).
# Shallower ones are closed on the way down and opened again, without following a link, on
# the way back up, so a path of any depth walks within a small fd budget.
OPEN_LEVELS = 64


class _Level:
    __slots__ = ("entries", "fd", "prefix")

    def __init__(self, fd: int, prefix: str, entries: Iterator[os.DirEntry[str]]) -> None:
        self.fd = fd  # -1 while closed to save fds
        self.prefix = prefix  # the directory's name in the archive, with a slash ("" at root)
        self.entries = entries


def _reopen(stack: list[_Level]) -> int:
    """The fd of the deepest level, opened again below its nearest open ancestor one level at
    a time. The deepest OPEN_LEVELS levels on the way stay open, so that the walk back up opens
    again once every OPEN_LEVELS levels, not at each one."""
    index = len(stack) - 1
    while stack[index].fd < 0:
        index -= 1
    keep_from = len(stack) - OPEN_LEVELS
    fd = stack[index].fd
    for level in range(index + 1, len(stack)):
        component = stack[level].prefix[len(stack[level - 1].prefix):-1]
        try:
            next_fd = os.open(component, DIR_FLAGS, dir_fd=fd)
        finally:
            if level - 1 > index:  # an fd opened here: kept for its level, or closed
                if level - 1 >= keep_from:
                    stack[level - 1].fd = fd
                else:
                    os.close(fd)
        fd = next_fd
    stack[-1].fd = fd
    return fd


def write_tree(root: str | int, out_fd: int, options: ExportOptions) -> None:
    """Archives the tree at root (not root itself), in lexical order like Go's Walk. root is
    a path, or the fd of a directory (the caller keeps it).

    The native walker (csrc/tartree.c) writes the same bytes without the GIL; walk_tree below
    is its readable version, which runs when the extension is missing."""
    if native.tar_tree is not None:
        mapping = options.id_mapping
        root_fd = os.dup(root) if isinstance(root, int) else os.open(root, DIR_FLAGS)
        try:
            failure = native.tar_tree(
                root_fd, out_fd, options.convert_whiteouts, options.skip_aufs_metadata,
                OPEN_LEVELS, [(r.container_id, r.host_id, r.size) for r in mapping.uids.ranges],
                [(r.container_id, r.host_id, r.size) for r in mapping.gids.ranges])
        finally:
            os.close(root_fd)
        if failure is not None:
            raise _io_failure(failure) from failure
        return
    walk_tree(root, out_fd, options)


def walk_tree(root: str | int, out_fd: int, options: ExportOptions) -> None:
    """write_tree in Python, one entry at a time."""
    writer = TarWriter(out_fd, options)
    root_fd = os.dup(root) if isinstance(root, int) else os.open(root, DIR_FLAGS)
    stack = [_Level(root_fd, "", iter(_sorted_entries(root_fd)))]
    try:
        while stack:
            level = stack[-1]
            entry = next(level.entries, None)
            if entry is None:
                stack.pop()
                if level.fd >= 0:
                    os.close(level.fd)
                continue
            parent_fd = level.fd if level.fd >= 0 else _reopen(stack)
            prefix = level.prefix
            base = entry.name
            name = prefix + base
            if (options.skip_aufs_metadata and not prefix
                    and base.startswith(whiteouts.META_PREFIX) and base != whiteouts.OPAQUE_MARKER):
                continue
            try:  # not entry.stat(): it keeps the fd of the listing, which may be closed
                info = os.lstat(base, dir_fd=parent_fd)
            except FileNotFoundError:
                continue
            if options.convert_whiteouts and whiteouts.is_overlay_whiteout(info):
                if not base.startswith(whiteouts.PREFIX):  # fuse-overlayfs' .wh..opq device
                    writer.add_whiteout(prefix + whiteouts.PREFIX + base, info)
                continue
            writer.add(parent_fd, base, name, info)
            if stat.S_ISDIR(info.st_mode):
                child_fd = os.open(base, DIR_FLAGS, dir_fd=parent_fd)
                children = _sorted_entries(child_fd)
                if (options.convert_whiteouts and whiteouts.is_opaque(child_fd)
                        and not any(c.name == whiteouts.OPAQUE_MARKER for c in children)):
                    writer.add_opaque_marker(name, info)
                stack.append(_Level(child_fd, f"{name}/", iter(children)))
                if len(stack) > OPEN_LEVELS + 1:  # the root stays open: the anchor
                    shallow = stack[-OPEN_LEVELS - 1]
                    if shallow.fd >= 0:
                        os.close(shallow.fd)
                        shallow.fd = -1
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        for level in stack:
            if level.fd >= 0:
                os.close(level.fd)


def write_entries(root: str, names: Iterable[tuple[str, bool]], out_fd: int,
                  options: ExportOptions) -> None:
    """Archives chosen paths of root: (path, deleted) pairs, sorted by the caller. A deleted
    path becomes a `.wh.` entry; the others are archived from root, without recursion."""
    writer = TarWriter(out_fd, options)
    root_fd = os.open(root, DIR_FLAGS)
    try:
        for path, deleted in names:
            parent, _, base = path.strip("/").rpartition("/")
            if deleted:
                writer.add_whiteout(f"{parent}/{whiteouts.PREFIX}{base}".lstrip("/"))
                continue
            parent_fd = os.open(parent, DIR_FLAGS, dir_fd=root_fd) if parent else root_fd
            try:
                info = os.lstat(base, dir_fd=parent_fd)
                writer.add(parent_fd, base, path.strip("/"), info)
            except FileNotFoundError:
                log.debug("%s vanished before it was archived", path)
            finally:
                if parent_fd != root_fd:
                    os.close(parent_fd)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        os.close(root_fd)


class TarPipe(io.RawIOBase):
    """A readable stream fed by a thread that writes the tar into a pipe. An error in the
    writer is raised by read() instead of looking like a short archive; close() stops the
    writer and runs the cleanup (such as putting the layers that were mounted)."""

    def __init__(self, produce: Callable[[int], None],
                 on_close: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # fewer wake-ups with a 1 MiB pipe
            fcntl.fcntl(write_fd, F_SETPIPE_SZ, PIPE_SIZE)
        self._error: BaseException | None = None
        self._on_close = on_close
        self._thread = threading.Thread(target=self._run, args=(produce, write_fd),
                                        name="aufs-diff", daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[int], None], write_fd: int) -> None:
        try:
            produce(write_fd)
        except BrokenPipeError:
            pass  # the reader closed early
        except BaseException as error:
            self._error = error
        finally:
            os.close(write_fd)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = os.readv(self._read_fd, [buffer])
        if count == 0:
            self._thread.join()
            if self._error is not None:
                error, self._error = self._error, None
                if isinstance(error, DiffError):
                    raise error
                raise DiffError(f"writing the layer archive failed: {error}") from error
        return count

    def fileno(self) -> int:
        return self._read_fd

    def close(self) -> None:
        if self.closed:
            return
        try:
            os.close(self._read_fd)
            self._thread.join()
        finally:
            super().close()
            if self._on_close is not None:
                callback, self._on_close = self._on_close, None
                callback()
