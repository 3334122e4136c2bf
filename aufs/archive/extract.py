"""Unpacking an untrusted layer archive into a directory, with nothing escaping it.

Three whiteout modes:
- LITERAL: `.wh.` entries are written as files (an AUFS-format branch, Docker's fast path);
- OVERLAY: they become 0/0 character devices and trusted.overlay.opaque (an overlay branch);
- APPLY: they delete what they name (unpacking into a mounted union, Docker's naive path).

Every failure is a DiffError that names the entry. The caller unpacks into a staging copy
and swaps it in only on success, so a failed apply changes nothing.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from aufs import _implementation as native
from aufs import machine
from aufs.archive import whiteouts
from aufs.archive.beneath import BeneathRoot
from aufs.archive.format import (
    BLOCK_DEVICE,
    CHAR,
    CONTIGUOUS,
    DIRECTORY,
    FIFO,
    GNU_SPARSE,
    HARDLINK,
    HEADER_ONLY_TYPES,
    REGULAR,
    REGULAR_OLD,
    SYMLINK,
    TarFormatError,
    TarHeader,
)
from aufs.archive.idmap import IdentityMapping
from aufs.archive.reader import TarReader
from aufs.archive.tarsplit import TarSplitRecorder
from aufs.errors import DiffError

log = logging.getLogger(__name__)

PATH_MAX = 4096
ENVIRONMENT_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# while recording tar-split: readable, for the recorder to read a file's CRC back from its fd
# (TarSplitCollector.defer_crc; O_NOATIME is set apart, see _no_access_times)
RECORDED_FILE_FLAGS = FILE_FLAGS & ~os.O_WRONLY | os.O_RDWR
# plain members go through native runs when they can (tests turn it off to compare with the
# entry-by-entry path, the spec)
UNPACK_RUNS = True


class WhiteoutMode(enum.Enum):
    LITERAL = "literal"
    OVERLAY = "overlay"
    APPLY = "apply"


@dataclass
class ExtractOptions:
    whiteouts: WhiteoutMode
    id_mapping: IdentityMapping = field(default_factory=IdentityMapping)
    allow_devices: bool = True
    tar_split: TarSplitRecorder | None = None  # records the archive's layout while unpacking


@dataclass
class ExtractResult:
    entries: int = 0
    header_bytes: int = 0  # the sum of member sizes: Docker's naive ApplyDiff result
    # what the entries made adds to the tree's apparent size by Docker's rules (directory.Size:
    # files, symlinks by their target's length, a hardlinked inode once); it is the tree's
    # whole size only when the tree was empty and nothing was removed or replaced on the way
    added_size: int = 0
    removed_something: bool = False


def split_name(name: str, what: str = "name") -> list[str]:
    """An archive name as path components; refuses what could point outside."""
    if name.startswith("/"):
        raise ValueError(f"absolute {what}")
    if "\0" in name:
        raise ValueError(f"{what} holds a NUL byte")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{what} climbs out with '..'")
    if len(os.fsencode(name)) >= PATH_MAX:
        raise ValueError(f"{what} is longer than PATH_MAX ({PATH_MAX} bytes)")
    return parts


def _no_access_times(fd: int) -> bool:
    """Makes reads through fd leave the file's access time alone (O_NOATIME): False when the
    filesystem refuses, as it may for a file it gave another owner."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NOATIME)
    except OSError:
        return False
    return True


class Extractor:
    """Unpacks one archive into `target`; not reusable."""

    def __init__(self, target: str, options: ExtractOptions) -> None:
        self.options = options
        self.tree = BeneathRoot(target)
        self.result = ExtractResult()
        # root inside a user namespace cannot give files ids outside its map: like an
        # unprivileged user, it keeps what it may and warns once about the rest
        self.is_root = os.geteuid() == 0 and not machine.in_user_namespace()
        self._dir_times: list[tuple[str, int, int]] = []
        self._unpacked: set[str] = set()  # APPLY mode: what this layer put there
        self._warned: set[str] = set()
        self._owner_of_new_dirs = options.id_mapping.root_pair
        self._file_flags = FILE_FLAGS if options.tar_split is None else RECORDED_FILE_FLAGS

    def run(self, stream: BinaryIO) -> ExtractResult:
        reader = TarReader(stream, recorder=self.options.tar_split)
        name = "(start of archive)"
        runs = UNPACK_RUNS and self._runs_fit()
        try:
            while True:
                try:
                    if runs:  # it first skips what the last entry left unread: it may be cut
                        name = self._unpack_runs(reader) or name
                    header = reader.next()
                except TarFormatError as error:
                    where = "the archive" if name.startswith("(") else f"after entry {name!r}"
                    raise DiffError(f"{where}: {error}") from None
                if header is None:
                    break
                name = header.name
                try:
                    self._entry(header, reader)
                except TarFormatError as error:
                    raise DiffError(f"entry {name!r}: {error}") from None
                except (ValueError, OverflowError) as error:
                    raise DiffError(f"entry {name!r}: {error}") from None
                except OSError as error:
                    raise self._failure(name, error) from error
                finally:
                    self.tree.settle()  # no directory fd is held from one entry to the next
                self.result.entries += 1
                self.result.header_bytes += header.realsize or header.size
            if self.options.tar_split is not None:  # its last batch compresses meanwhile
                self.options.tar_split.archive_read()
            self._set_directory_times()
        finally:
            self.tree.close()
        return self.result

    def _failure(self, name: str, error: OSError) -> Exception:
        if error.errno in ENVIRONMENT_ERRORS:  # the disk, not the archive
            return OSError(error.errno, f"{error.strerror} while unpacking entry {name!r}",
                           self.tree.path)
        return DiffError(f"entry {name!r}: {error.strerror or error}")

    # ---- runs of plain members, in C -------------------------------------------------------

    def _runs_fit(self) -> bool:
        """Whether runs make what the entry-by-entry path would: as root, with no id mapping
        (so each owner is the header's), and not into a union (APPLY mode tracks names)."""
        return (self.is_root and self.options.id_mapping.is_identity
                and self.options.whiteouts is not WhiteoutMode.APPLY)

    def _unpack_runs(self, reader: TarReader) -> str | None:
        """The plain files, symlinks and directories that follow, a directory at a time, in
        one native call each (reader.unpack_run); returns at the first member that is not
        one of those, for the entry-by-entry path, which also says what is wrong with it.
        Returns the name of the last member made, if any."""
        prefix: bytes | None = None
        parent_fd, parent = -1, ""
        last: str | None = None
        while True:
            run = reader.unpack_run(parent_fd, prefix, parent, self._dir_times)
            if run.last_name:
                last = os.fsdecode(run.last_name)
            self.result.entries += run.entries
            self.result.header_bytes += run.data_bytes
            self.result.added_size += run.added_size
            if run.status == native.UNPACK_ERROR:
                raise self._failure(os.fsdecode(run.stop_name),
                                    OSError(run.error, os.strerror(run.error)))
            if run.status != native.UNPACK_PARENT:
                return last
            self.tree.settle()  # the last run's directory is done with
            try:
                parts = split_name(os.fsdecode(run.stop_directory))
                parent = "/".join(parts)
                parent_fd = self.tree.open_dir(parent, create=True,
                                               owner=self._owner_of_new_dirs)
            except (ValueError, OSError):
                return last
            prefix = run.stop_directory

    # ---- one entry ------------------------------------------------------------------------

    def _entry(self, header: TarHeader, reader: TarReader) -> None:
        parts = split_name(header.name)
        kind = header.typeflag
        if kind not in HEADER_ONLY_TYPES | {REGULAR, REGULAR_OLD, CONTIGUOUS, GNU_SPARSE}:
            raise ValueError(f"unsupported entry type {kind!r}")
        if kind in HEADER_ONLY_TYPES and header.size:
            raise ValueError(f"a {_describe(kind)} entry carries {header.size} bytes of data")
        if not parts:
            if kind != DIRECTORY:
                raise ValueError("the layer root itself can only be a directory")
            return  # Docker keeps the layer root's own mode and owner
        base = parts[-1]
        parent = "/".join(parts[:-1])
        header_path = "/".join(parts)
        if base.startswith(whiteouts.PREFIX) and self.options.whiteouts is not WhiteoutMode.LITERAL:
            self._whiteout(parent, base, header)
            return
        if base.startswith(whiteouts.META_PREFIX) and base != whiteouts.OPAQUE_MARKER:
            raise ValueError("an aufs metadata name (.wh..wh.*) is not layer content")
        if base.startswith(whiteouts.PREFIX) and base != whiteouts.OPAQUE_MARKER:
            _check_whiteout_target(base)
        uid, gid = self._host_owner(header)
        parent_fd = self.tree.open_dir(parent, create=True, owner=self._owner_of_new_dirs)
        if self.options.whiteouts is WhiteoutMode.APPLY:
            self._mark_unpacked(parts)
        if kind in (REGULAR, REGULAR_OLD, CONTIGUOUS, GNU_SPARSE):
            # the common case costs no lstat: O_EXCL tells whether something is in the way
            try:
                fd = os.open(base, self._file_flags, 0o600, dir_fd=parent_fd)
            except FileExistsError:
                self._remove(parent_fd, header_path)
                fd = os.open(base, self._file_flags, 0o600, dir_fd=parent_fd)
            self._regular_file(fd, header, reader, uid, gid)
            self.result.added_size += (header.realsize if header.sparse is not None
                                       and header.realsize is not None else header.size)
            return
        existing = self.tree.lstat(parent_fd, base)
        if existing is not None:
            if kind == DIRECTORY and stat.S_ISDIR(existing.st_mode):
                self._finish_directory(parent_fd, base, parts, header, uid, gid)
                return
            self._remove(parent_fd, header_path, existing)
        if kind == DIRECTORY:
            os.mkdir(base, 0o700, dir_fd=parent_fd)
            self._finish_directory(parent_fd, base, parts, header, uid, gid)
        elif kind == SYMLINK:
            os.symlink(header.linkname, base, dir_fd=parent_fd)
            self.result.added_size += len(os.fsencode(header.linkname))
            self._chown_entry(parent_fd, base, uid, gid)
            os.utime(base, ns=self._times(header), dir_fd=parent_fd, follow_symlinks=False)
        elif kind == HARDLINK:
            self._hardlink(parent_fd, base, header)
        elif kind in (CHAR, BLOCK_DEVICE):
            self._device(parent_fd, base, header, uid, gid)
        elif kind == FIFO:
            os.mkfifo(base, 0o600, dir_fd=parent_fd)
            self._finish_special(parent_fd, base, header, uid, gid)

    def _regular_file(self, fd: int, header: TarHeader, reader: TarReader, uid: int,
                      gid: int) -> None:
        """Files that fit in the reader's buffer: data and metadata in one native call;
        bigger and sparse ones are written streaming."""
        if header.sparse is None and not header.xattrs:
            try:
                data = reader.buffered_data()  # no copy: a view into the reader's buffer
            except TarFormatError:  # cut short: fd is still ours
                os.close(fd)
                raise
            if data is not None:
                owner = (uid, gid) if self.is_root else self._owner_we_may_set(uid, gid)
                native.finish_file(fd, data, owner, header.mode, *self._times(header),
                                   header.name)
                return
        recorder = self.options.tar_split
        deferred = False
        try:
            if header.sparse is not None:
                self._write_sparse(fd, header, reader)
            else:
                # the recorder reads the CRC back from the file, on its own thread
                deferred = (recorder is not None and _no_access_times(fd)
                            and recorder.defer_crc())
                for piece in reader.chunks():
                    _write_all(fd, piece)
            # in this order: chown and writes drop file capabilities, chown drops setuid
            self._chown_fd(fd, uid, gid)
            os.fchmod(fd, header.mode)
            self._set_xattrs(fd, header)
            os.utime(fd, ns=self._times(header))
            if deferred:
                assert recorder is not None
                recorder.take_fd(fd)  # the recorder's from now on
                fd = -1
        finally:
            if fd >= 0:
                os.close(fd)

    def _owner_we_may_set(self, uid: int, gid: int) -> tuple[int, int] | None:
        if (uid, gid) == (os.getuid(), os.getgid()):
            return None
        self._warn_once("chown", "cannot chown as an unprivileged user; files keep our own "
                                 "owner, first: uid %s", uid)
        return None

    def _write_sparse(self, fd: int, header: TarHeader, reader: TarReader) -> None:
        """Writes each stored segment at its offset; the gaps stay holes."""
        assert header.sparse is not None
        realsize = header.realsize if header.realsize is not None else header.size
        stored = sum(length for _, length in header.sparse)
        if stored != header.size:
            raise ValueError(f"sparse map covers {stored} bytes but {header.size} are stored")
        end = 0
        for offset, length in header.sparse:
            if offset < end or length < 0 or offset + length > realsize:
                raise ValueError("sparse map segments overlap or pass the file's size")
            end = offset + length
            position = offset
            for piece in reader.chunks(length):
                written = 0
                while written < len(piece):
                    written += os.pwrite(fd, piece[written:], position + written)
                position += len(piece)
        os.ftruncate(fd, realsize)

    def _finish_directory(self, parent_fd: int, base: str, parts: list[str],
                          header: TarHeader, uid: int, gid: int) -> None:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent_fd)
        try:
            self._chown_fd(fd, uid, gid)
            os.fchmod(fd, header.mode)
            self._set_xattrs(fd, header)
        finally:
            os.close(fd)
        self._dir_times.append(("/".join(parts), *self._times(header)))

    def _remove(self, parent_fd: int, path: str, info: os.stat_result | None = None) -> bool:
        """tree.remove, noting when the tree's size is no longer the sum of what was added
        (not when nothing was there, as for most whiteouts)."""
        before = self.result.removed_something
        self.result.removed_something = True  # if it fails half-way, part of it is gone
        removed = self.tree.remove(parent_fd, path, info)
        self.result.removed_something = before or removed
        return removed

    def _hardlink(self, parent_fd: int, base: str, header: TarHeader) -> None:
        try:
            target = split_name(header.linkname, "hardlink target")
        except ValueError as error:
            raise ValueError(f"{error}: {header.linkname!r}") from None
        if not target:
            raise ValueError("a hardlink to the layer root")
        target_parent = self.tree.open_dir("/".join(target[:-1]))
        try:
            os.link(target[-1], base, src_dir_fd=target_parent, dst_dir_fd=parent_fd,
                    follow_symlinks=False)
        except FileNotFoundError:
            raise ValueError(f"hardlink target {header.linkname!r} is not in the layer") from None
        except PermissionError as error:
            raise ValueError(f"cannot hardlink to {header.linkname!r}: {error.strerror}") from None

    def _device(self, parent_fd: int, base: str, header: TarHeader, uid: int, gid: int) -> None:
        if not self.options.allow_devices:
            raise ValueError("device nodes are not allowed in this archive (allow_devices=False)")
        kind = stat.S_IFCHR if header.typeflag == CHAR else stat.S_IFBLK
        try:
            os.mknod(base, kind | 0o600, os.makedev(header.devmajor, header.devminor),
                     dir_fd=parent_fd)
        except PermissionError:
            self._warn_once("devices", "cannot create device nodes here (no CAP_MKNOD); "
                                       "skipping them, first: %s", header.name)
            return
        self._finish_special(parent_fd, base, header, uid, gid)

    def _finish_special(self, parent_fd: int, base: str, header: TarHeader, uid: int,
                        gid: int) -> None:
        self._chown_entry(parent_fd, base, uid, gid)
        os.chmod(base, header.mode, dir_fd=parent_fd)  # not a symlink: it cannot redirect
        os.utime(base, ns=self._times(header), dir_fd=parent_fd, follow_symlinks=False)

    # ---- whiteouts ------------------------------------------------------------------------

    def _whiteout(self, parent: str, base: str, header: TarHeader) -> None:
        mode = self.options.whiteouts
        if base == whiteouts.OPAQUE_MARKER:
            if mode is WhiteoutMode.OVERLAY:
                directory = self.tree.open_dir(parent, create=True,
                                               owner=self._owner_of_new_dirs)
                os.setxattr(directory, whiteouts.OVERLAY_OPAQUE_XATTR, b"y")
            else:
                self._make_opaque(parent)
            return
        if base.startswith(whiteouts.META_PREFIX):
            raise ValueError("an aufs metadata name (.wh..wh.*) is not layer content")
        target = _check_whiteout_target(base)
        if mode is WhiteoutMode.OVERLAY:
            parent_fd = self.tree.open_dir(parent, create=True, owner=self._owner_of_new_dirs)
            self._remove(parent_fd, _join(parent, target))
            os.mknod(target, stat.S_IFCHR, 0, dir_fd=parent_fd)
            uid, gid = self._host_owner(header)
            self._chown_entry(parent_fd, target, uid, gid)
            return
        try:
            parent_fd = self.tree.open_dir(parent)
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing there to delete
        self._remove(parent_fd, _join(parent, target))

    def _make_opaque(self, parent: str) -> None:
        """APPLY mode: drop everything under parent that this layer did not unpack. A walk
        with a list of pending directories, one fd open at a time: no recursion, whatever
        the depth."""
        try:
            self.tree.open_dir(parent)
        except FileNotFoundError:
            raise ValueError(f"opaque marker for a directory {parent!r} that does not exist"
                             ) from None
        pending = [parent]
        while pending:
            relative = pending.pop()
            directory = self.tree.open_new(relative)
            try:
                for name in sorted(os.listdir(directory)):
                    child = _join(relative, name)
                    info = self.tree.lstat(directory, name)
                    if info is None:
                        continue
                    if child not in self._unpacked:
                        self._remove(directory, child, info)
                    elif stat.S_ISDIR(info.st_mode):
                        pending.append(child)
            finally:
                os.close(directory)

    def _mark_unpacked(self, parts: list[str]) -> None:
        for depth in range(1, len(parts) + 1):
            self._unpacked.add("/".join(parts[:depth]))

    # ---- attributes -----------------------------------------------------------------------

    def _host_owner(self, header: TarHeader) -> tuple[int, int]:
        mapping = self.options.id_mapping
        try:
            return mapping.uids.to_host(header.uid), mapping.gids.to_host(header.gid)
        except ValueError as error:
            raise ValueError(f"owner {header.uid}:{header.gid} has no host id ({error})"
                             ) from None

    def _chown_fd(self, fd: int, uid: int, gid: int) -> None:
        try:
            os.fchown(fd, uid, gid)
        except OSError as error:
            if self.is_root or error.errno not in (errno.EPERM, errno.EINVAL):
                raise
            self._warn_once("chown", "cannot chown as an unprivileged user; files keep our "
                                     "own owner, first: uid %s", uid)

    def _chown_entry(self, parent_fd: int, base: str, uid: int, gid: int) -> None:
        try:
            os.chown(base, uid, gid, dir_fd=parent_fd, follow_symlinks=False)
        except OSError as error:
            if self.is_root or error.errno not in (errno.EPERM, errno.EINVAL):
                raise
            self._warn_once("chown", "cannot chown as an unprivileged user; files keep our "
                                     "own owner, first: uid %s", uid)

    def _set_xattrs(self, fd: int, header: TarHeader) -> None:
        for name, value in header.xattrs.items():
            if whiteouts.is_internal_xattr(name):
                continue
            try:
                os.setxattr(fd, name, value)
            except OSError as error:
                if error.errno not in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
                    raise
                self._warn_once(f"xattr:{name}", "ignored xattr %s: the filesystem does not "
                                                 "support it (%s)", name, error.strerror)

    @staticmethod
    def _times(header: TarHeader) -> tuple[int, int]:
        atime = header.atime_ns if header.atime_ns is not None else header.mtime_ns
        return max(atime, header.mtime_ns), header.mtime_ns

    def _set_directory_times(self) -> None:
        """Directory times go last, deepest first: creating entries inside moves them."""
        for relative, atime, mtime in reversed(self._dir_times):
            try:
                fd = self.tree.open_dir(relative)
            except OSError:
                continue  # removed by a later entry
            os.utime(fd, ns=(atime, mtime))
            self.tree.settle()

    def _warn_once(self, key: str, message: str, *arguments: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *arguments)


def _check_whiteout_target(base: str) -> str:
    target = base[len(whiteouts.PREFIX):]
    if target in ("", ".", ".."):
        raise ValueError(f"whiteout {base!r} names no entry it could delete")
    return target


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _describe(kind: bytes) -> str:
    return {HARDLINK: "hardlink", SYMLINK: "symlink", CHAR: "character device",
            BLOCK_DEVICE: "block device", DIRECTORY: "directory", FIFO: "fifo"}.get(kind, "?")


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def extract(stream: BinaryIO, target: str, options: ExtractOptions) -> ExtractResult:
    """Unpacks the tar stream into the directory target."""
    return Extractor(target, options).run(stream)


def iter_names(stream: BinaryIO) -> Iterator[str]:
    """The member names of an archive, for inspection; skips the data."""
    reader = TarReader(stream)
    while (header := reader.next()) is not None:
        yield header.name
