"""The pure-Python twin of aufs._native, and the readable spec of every low-level function.

Each function here behaves exactly like its native counterpart: same results, same exception
types. Syscalls that the standard library lacks (mount, statfs, statx, the new mount API) go
through ctypes.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import operator
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Union

from aufs.errors import DiffError

_json_string = json.encoder.encode_basestring_ascii

IMPLEMENTATION = "fallback"

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

# Docker keeps this much of each page for the options that follow the branches (54) and for
# ",dirperm1" (9); see reference notes §1.8.
_MOUNT_DATA_RESERVE = 54
_DIRPERM1_RESERVE = 9
_XINO_OPTIONS = b",dio,xino=/dev/shm/aufs.xino"
_DIRPERM1_OPTION = b",dirperm1"
_BRANCH_SEPARATORS = frozenset(b":,=")
_PATH_MAX = 4096

_libc = ctypes.CDLL(None, use_errno=True)


def _encode(value: PathArg, what: str) -> bytes:
    raw = os.fsencode(value)
    if b"\0" in raw:
        raise ValueError(f"{what} contains a NUL byte: {value!r}")
    return raw


def _optional(value: PathArg | None, what: str) -> bytes | None:
    return None if value is None else _encode(value, what)


def _os_error(error: int | None, path: PathArg, detail: str = "") -> OSError:
    error = error or errno.EIO
    message = os.strerror(error)
    if detail:
        message = f"{message}: {detail}"
    return OSError(error, message, os.fsdecode(path) if isinstance(path, bytes) else path)


def _last_errno() -> int:
    return ctypes.get_errno() or errno.EIO


# ---- mount data -----------------------------------------------------------------------------


def _check_branch(path: bytes, what: str) -> None:
    bad = sorted({chr(byte) for byte in path if byte in _BRANCH_SEPARATORS})
    if bad:
        raise ValueError(
            f"{what} {os.fsdecode(path)!r} holds {' '.join(map(repr, bad))}, which aufs reads "
            "as option separators; move the store to a path without them"
        )


def _check_label(label: bytes) -> None:
    for byte in label:
        if byte in b'"\\' or byte < 0x20 or byte == 0x7F:
            raise ValueError(
                f"mount label {os.fsdecode(label)!r} holds {chr(byte)!r}, which cannot go "
                'inside context="..."'
            )


def _with_label(data: bytes, label: bytes) -> bytes:
    return data + b',context="' + label + b'"' if label else data


def aufs_mount_data(
    rw: PathArg,
    layers: Iterable[PathArg],
    mount_label: str | bytes = "",
    *,
    dirperm1: bool = False,
    page_size: int | None = None,
) -> list[str]:
    """Docker's aufs mount data: the first mount(2) string, then one per MS_REMOUNT.

    The first string is "br:<rw>=rw" followed by ":<layer>=ro+wh" for as many layers
    (nearest parent first) as fit in the page minus what Docker reserves, then
    ",dio,xino=/dev/shm/aufs.xino", ",dirperm1" and ',context="<label>"'. The layers left
    over go in "append:<layer>=ro+wh," chunks of the same capacity, each followed by the label.
    """
    rw_bytes = _encode(rw, "rw branch")
    ro = [_encode(layer, "layer branch") for layer in layers]
    label = _encode(mount_label, "mount label")
    page = os.sysconf("SC_PAGE_SIZE") if page_size is None else operator.index(page_size)
    if page <= 0:
        raise ValueError(f"page_size must be positive, not {page}")
    _check_branch(rw_bytes, "rw branch")
    for branch in ro:
        _check_branch(branch, "layer branch")
    _check_label(label)

    capacity = page - len(label) - _MOUNT_DATA_RESERVE - (_DIRPERM1_RESERVE if dirperm1 else 0)
    if capacity <= 0:
        raise ValueError(
            f"a mount label of {len(label)} bytes leaves no room in a {page}-byte page"
        )
    first = b"br:" + rw_bytes + b"=rw"
    if len(first) > capacity:
        raise ValueError(f"rw branch {os.fsdecode(rw_bytes)!r} does not fit in one mount page")

    taken = 0
    while taken < len(ro):
        item = b":" + ro[taken] + b"=ro+wh"
        if len(first) + len(item) > capacity:
            break
        first += item
        taken += 1
    first += _XINO_OPTIONS + (_DIRPERM1_OPTION if dirperm1 else b"")
    result = [_with_label(first, label)]

    while taken < len(ro):
        chunk = b""
        while taken < len(ro):
            item = b"append:" + ro[taken] + b"=ro+wh,"
            if len(chunk) + len(item) > capacity:
                break
            chunk += item
            taken += 1
        if not chunk:
            raise ValueError(
                f"layer branch {os.fsdecode(ro[taken])!r} does not fit in one mount page"
            )
        result.append(_with_label(chunk, label))
    return [os.fsdecode(data) for data in result]


# ---- syscalls -------------------------------------------------------------------------------

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                        ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long


def mount(
    source: PathArg | None,
    target: PathArg,
    fstype: str | bytes | None,
    flags: int = 0,
    data: str | bytes | None = "",
) -> None:
    """mount(2). source, fstype and data may be None."""
    arguments = (
        _optional(source, "mount source"),
        _encode(target, "mount target"),
        _optional(fstype, "filesystem type"),
        ctypes.c_ulong(flags),
        _optional(data, "mount data"),
    )
    if _libc.mount(*arguments) != 0:
        raise _os_error(_last_errno(), target)


CLONE_FS = 0x200
_libc.unshare.argtypes = [ctypes.c_int]


def unshare(flags: int) -> None:
    """unshare(2) for the calling thread (CLONE_FS: a working directory of its own). Pure
    Python on both paths: it is called once per thread, never in a hot loop."""
    if _libc.unshare(flags) != 0:
        raise _os_error(_last_errno(), "unshare")


MNT_DETACH = 0x2


def single_threaded() -> bool:
    """Whether the caller is the process's only thread: /proc/self/task holds ".", ".." and
    one entry per thread, so its link count is 2 + threads. False when /proc cannot tell."""
    try:
        return os.stat("/proc/self/task").st_nlink == 3
    except OSError:
        return False


class _CwdThread:
    """A thread whose working directory is its own (it unshares CLONE_FS when it starts), for
    mounts with relative paths while other threads share the process's. Started on first
    use; a forked child starts its own."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the thread does not cross a fork

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[tuple[PathArg, PathArg | None, PathArg,
                                                str | bytes | None, int, str | bytes | None]
                                          ] = queue.SimpleQueue()
        self._replies: queue.SimpleQueue[OSError | None] = queue.SimpleQueue()
        self._status: int | None = None  # 0 running, else the errno unshare gave

    def mount(self, directory: PathArg, source: PathArg | None, target: PathArg,
              fstype: str | bytes | None, flags: int, data: str | bytes | None) -> int:
        with self._lock:
            if self._status is None:
                try:
                    threading.Thread(target=self._serve, name="aufs-mount-from",
                                     daemon=True).start()
                except RuntimeError:  # worth another try later, as the native twin
                    raise _os_error(errno.EAGAIN, target, "cannot start the thread that mounts "
                                    "from a directory") from None
                refused = self._replies.get()
                self._status = 0 if refused is None else refused.errno or errno.EPERM
            if self._status:
                return self._status
            self._requests.put((directory, source, target, fstype, flags, data))
            error = self._replies.get()
        if error is not None:
            raise error
        return 0

    def _serve(self) -> None:
        try:
            unshare(CLONE_FS)
        except OSError as error:
            self._replies.put(error)
            return
        self._replies.put(None)
        while True:
            directory, source, target, fstype, flags, data = self._requests.get()
            try:
                os.chdir(directory)
            except OSError as error:
                self._replies.put(error)
                continue
            try:
                mount(source, target, fstype, flags, data)
            except OSError as error:
                self._replies.put(error)
            else:
                self._replies.put(None)


_CWD_THREAD = _CwdThread()


def mount_from(
    directory: PathArg,
    source: PathArg | None,
    target: PathArg,
    fstype: str | bytes | None,
    flags: int = 0,
    data: str | bytes | None = "",
) -> int:
    """mount(2) with the relative paths in data (and target, if relative) resolved from
    directory, as Docker's overlay2 mounts its short links. Threads share a working
    directory: while the caller is the process's only one, it moves there and back around
    the call (as Docker's mounting child does); else the mount runs on a thread whose working
    directory is its own. Returns 0 once mounted, or the errno that kept such a thread from
    being made (nothing was done then). A failed return to the previous directory undoes the
    mount. (The native twin makes the three steps in one C call; here a Python signal handler
    could run in between and see the moved directory.)"""
    if not single_threaded():
        return _CWD_THREAD.mount(directory, source, target, fstype, flags, data)
    try:
        previous = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return _CWD_THREAD.mount(directory, source, target, fstype, flags, data)
    try:
        os.chdir(directory)
        try:
            mount(source, target, fstype, flags, data)
        except BaseException:
            os.fchdir(previous)
            raise
        try:
            os.fchdir(previous)
        except OSError as error:
            unmount(target, MNT_DETACH)  # still resolved from directory
            raise _os_error(error.errno, ".", "cannot return to the working directory"
                            ) from None
    finally:
        os.close(previous)
    return 0


def unmount(target: PathArg, flags: int = 0) -> None:
    """umount2(2) with the given MNT_* flags."""
    if _libc.umount2(_encode(target, "unmount target"), flags) != 0:
        raise _os_error(_last_errno(), target)


# The new mount API has the same syscall numbers on every architecture.
_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG, _FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 0, 1, 6
_FSMOUNT_CLOEXEC = 0x1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4


def _syscall(number: int, *arguments: object) -> int:
    result = int(_libc.syscall(ctypes.c_long(number), *arguments))
    if result < 0:
        raise OSError(_last_errno(), "")
    return result


def _kernel_message(context: int) -> str:
    """The last error the kernel wrote into an fs context ("e <text>" lines)."""
    message = ""
    while True:
        try:
            line = os.read(context, 511)
        except OSError:
            return message
        if not line:
            return message
        text = line.decode("utf-8", "replace")
        if text.startswith("e ") or (not message and len(text) > 2):
            message = text[2:]


def fsmount(
    fstype: str | bytes,
    target: PathArg,
    options: Sequence[tuple[str | bytes, str | bytes | None]] = (),
    *,
    source: PathArg | None = None,
    attr_flags: int = 0,
) -> None:
    """Mount through fsopen/fsconfig/fsmount/move_mount.

    options is a sequence of (key, value) pairs, applied in order; a value of None sets a flag.
    A key may repeat (overlay's "lowerdir+"). Errors carry the kernel's own explanation.
    """
    fstype_bytes = _encode(fstype, "filesystem type")
    target_bytes = _encode(target, "mount target")
    source_bytes = _optional(source, "mount source")
    steps = [
        (_encode(key, "mount option"), _optional(value, "mount option value"))
        for key, value in options
    ]
    try:
        context = _syscall(_SYS_FSOPEN, fstype_bytes, ctypes.c_uint(_FSOPEN_CLOEXEC))
    except OSError as error:
        raise _os_error(error.errno, target) from None
    mount_fd = -1
    try:
        if source_bytes is not None:
            steps.insert(0, (b"source", source_bytes))
        for key, value in steps:
            command = _FSCONFIG_SET_FLAG if value is None else _FSCONFIG_SET_STRING
            _syscall(_SYS_FSCONFIG, context, ctypes.c_uint(command), key, value, 0)
        _syscall(_SYS_FSCONFIG, context, ctypes.c_uint(_FSCONFIG_CMD_CREATE), None, None, 0)
        mount_fd = _syscall(_SYS_FSMOUNT, context, ctypes.c_uint(_FSMOUNT_CLOEXEC),
                            ctypes.c_uint(attr_flags))
        _syscall(_SYS_MOVE_MOUNT, mount_fd, b"", -100, target_bytes,  # -100: AT_FDCWD
                 ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH))
    except OSError as error:
        raise _os_error(error.errno, target, _kernel_message(context)) from None
    finally:
        if mount_fd >= 0:
            os.close(mount_fd)
        os.close(context)


_SYS_OPENAT2 = 437  # the same on every architecture
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: PathArg, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2): open path relative to dirfd with RESOLVE_* flags; returns the fd."""
    how = _OpenHow(flags & 0xFFFFFFFF, mode, resolve)
    try:
        return _syscall(_SYS_OPENAT2, dirfd, _encode(path, "path"), ctypes.byref(how),
                        ctypes.c_size_t(ctypes.sizeof(how)))
    except OSError as error:
        raise _os_error(error.errno, path) from None


def renameat2(
    old_dirfd: int, old_path: PathArg, new_dirfd: int, new_path: PathArg, flags: int = 0
) -> None:
    """renameat2(2); flags=2 (RENAME_EXCHANGE) swaps the two paths atomically."""
    arguments = (old_dirfd, _encode(old_path, "path"), new_dirfd, _encode(new_path, "path"),
                 flags)
    if _libc.renameat2(*arguments) != 0:
        raise _os_error(_last_errno(), old_path)


def fs_magic(path: PathArg) -> int:
    """statfs(2) f_type of the filesystem holding path."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes; f_type comes first
    if _libc.statfs(_encode(path, "path"), buffer) != 0:
        raise _os_error(_last_errno(), path)
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def mounted(magic: int, path: PathArg) -> bool:
    """Docker's rule: True when path's filesystem has this f_type; a missing path is False."""
    try:
        return fs_magic(path) == magic & 0xFFFFFFFF
    except FileNotFoundError:
        return False


_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_NO_AUTOMOUNT = 0x800
_STATX_TYPE, _STATX_INO, _STATX_MNT_ID = 0x1, 0x100, 0x1000
_STATX_ATTR_MOUNT_ROOT = 0x2000


class _Statx(ctypes.Structure):
    _fields_ = [
        ("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32),
        ("attributes", ctypes.c_uint64), ("nlink", ctypes.c_uint32),
        ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("mode", ctypes.c_uint16),
        ("spare0", ctypes.c_uint16), ("ino", ctypes.c_uint64), ("size", ctypes.c_uint64),
        ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
        ("times", ctypes.c_uint8 * 64), ("rdev_major", ctypes.c_uint32),
        ("rdev_minor", ctypes.c_uint32), ("dev_major", ctypes.c_uint32),
        ("dev_minor", ctypes.c_uint32), ("mnt_id", ctypes.c_uint64),
        ("spare", ctypes.c_uint8 * 104),
    ]


def _statx(path: bytes, flags: int) -> _Statx:
    info = _Statx()
    mask = _STATX_TYPE | _STATX_INO | _STATX_MNT_ID
    if _libc.statx(_AT_FDCWD, path, flags, mask, ctypes.byref(info)) != 0:
        raise OSError(_last_errno(), "")
    return info


def is_mountpoint(path: PathArg) -> bool:
    """True when path is the root of a mount (statx STATX_ATTR_MOUNT_ROOT)."""
    raw = _encode(path, "path")
    try:
        info = _statx(raw, _AT_SYMLINK_NOFOLLOW | _AT_NO_AUTOMOUNT)
        if int(info.attributes_mask) & _STATX_ATTR_MOUNT_ROOT:
            return bool(int(info.attributes) & _STATX_ATTR_MOUNT_ROOT)
        if stat.S_ISLNK(info.mode):
            return False
        # Before Linux 5.8: compare with the parent directory.
        above = _statx(raw + b"/..", _AT_NO_AUTOMOUNT)
    except OSError as error:
        raise _os_error(error.errno, path) from None
    if int(info.mask) & int(above.mask) & _STATX_MNT_ID:
        return bool(info.mnt_id != above.mnt_id)
    if (info.dev_major, info.dev_minor) != (above.dev_major, above.dev_minor):
        return True
    return bool(info.ino == above.ino)


# ---- the directory-size walker --------------------------------------------------------------

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_directory_stepwise(start_fd: int, components: Iterable[str | bytes]) -> int:
    """The directory below start_fd reached one component at a time, never following a
    symlink: the way past PATH_MAX, and the way to stay beneath a root without openat2.
    Pure Python on both paths; the caller closes the fd."""
    fd = os.dup(start_fd)
    try:
        for component in components:
            next_fd = os.open(component, _DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except OSError:
        os.close(fd)
        raise
    return fd


def _open_relative(root_fd: int, relative: bytes) -> int:
    if not relative:
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    if len(relative) < _PATH_MAX:
        return os.open(relative, _DIRECTORY_FLAGS, dir_fd=root_fd)
    return open_directory_stepwise(root_fd, relative.split(b"/"))  # longer than PATH_MAX


def directory_size(path: PathArg, *, threads: int = 0) -> int:
    """Apparent bytes under path, following Docker's directory.Size.

    Directories and empty files count nothing; symlinks are not followed and count their own
    size; each (st_dev, st_ino) with more than one link counts once; entries that vanish
    during the walk are skipped; a missing root raises FileNotFoundError. `threads` is
    accepted for parity with the native walker and ignored: this walk is single-threaded.
    """
    root = _encode(path, "path")
    try:
        info = os.lstat(root)
        if not stat.S_ISDIR(info.st_mode):
            return max(info.st_size, 0)
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise _os_error(error.errno, root) from None

    total = 0
    linked: set[tuple[int, int]] = set()
    pending = [b""]
    try:
        while pending:
            relative = pending.pop()
            try:
                fd = _open_relative(root_fd, relative)
            except OSError as error:
                if relative and error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # gone, or replaced since its parent was read
                failed = os.path.join(root, relative) if relative else root
                raise _os_error(error.errno, failed) from None
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        name = os.fsencode(entry.name)
                        child = relative + b"/" + name if relative else name
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                pending.append(child)
                                continue
                            entry_info = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        except OSError as error:
                            raise _os_error(error.errno, os.path.join(root, child)) from None
                        size = entry_info.st_size
                        if size <= 0:
                            continue
                        if entry_info.st_nlink > 1:
                            key = (entry_info.st_dev, entry_info.st_ino)
                            if key in linked:
                                continue
                            linked.add(key)
                        total += size
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    return total


# ---- ordered file I/O -----------------------------------------------------------------------


def finish_file(fd: int, data: bytes | memoryview, owner: tuple[int, int] | None, mode: int,
                atime_ns: int, mtime_ns: int, name: str) -> None:
    """Write data into fd, chown to owner (None: leave it), chmod, set times, close.
    Failures are OSError naming the entry."""

    def job() -> None:
        _write_all(fd, data)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        os.utime(fd, ns=(atime_ns, mtime_ns))

    _run_and_close(job, fd, name)


class IOQueue:
    """File I/O jobs in submission order. The native twin runs them on a C thread without
    the GIL; this one runs each job at once. Failures are OSError naming the job."""

    def __init__(self, max_pending: int = 256, max_pending_bytes: int = 64 << 20) -> None:
        self.closed = False

    def write(self, out_fd: int, data: bytes, fd: int = -1, copy_size: int = 0,
              padding: int = 0, name: str = "") -> None:
        """Write data to out_fd, then copy_size bytes of fd and padding zeros; close fd."""

        def job() -> None:
            _write_all(out_fd, data)
            sent = 0
            while sent < copy_size:
                count = os.sendfile(out_fd, fd, sent, copy_size - sent)
                if count == 0:  # the file shrank while it was read
                    raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
                sent += count
            _write_all(out_fd, bytes(padding))

        _run_and_close(job, fd, name)

    def close(self) -> None:
        """Waits for every job (there is none left here)."""
        self.closed = True


def _run_and_close(job: Callable[[], None], fd: int, name: str) -> None:
    failure: OSError | None = None
    try:
        job()
    except OSError as error:
        failure = error
    if fd >= 0:
        try:
            os.close(fd)
        except OSError as error:
            failure = failure or error
    if failure is not None:
        raise _os_error(failure.errno, name) from None


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---- tar header blocks ------------------------------------------------------------------------


def parse_tar_number(raw: bytes, what: str) -> int:
    """An octal field (digits between spaces, ended by NUL) or a GNU base-256 one."""
    if raw[:1] and raw[0] & 0x80:
        if raw[0] not in (0x80, 0xFF):
            raise ValueError(f"bad base-256 {what} field")
        value = int.from_bytes(raw[1:], "big")
        return value - (1 << (8 * (len(raw) - 1))) if raw[0] == 0xFF else value
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if text.strip(b"01234567"):
        raise ValueError(f"bad {what} field {raw!r}")
    return int(text, 8) if text else 0


def _tar_checksum_matches(block: bytes) -> bool:
    stored = block[148:156].split(b"\0", 1)[0].strip(b" ")
    if not stored or stored.strip(b"01234567"):
        return False
    expected = int(stored, 8)
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if expected == unsigned:
        return True
    # some old writers summed signed chars
    return expected == unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)


TarFields = tuple[bytes, bytes, int, int, int, int, int, bytes, int, int, bool]


def parse_tar_header(block: bytes | memoryview) -> TarFields:
    """(name, typeflag, mode, uid, gid, size, mtime, linkname, devmajor, devminor, gnu) of one
    512-byte header block; ValueError saying why it is not one."""
    block = bytes(block)
    if len(block) != 512:
        raise ValueError(f"a header block is 512 bytes, not {len(block)}")
    if not _tar_checksum_matches(block):
        raise ValueError("header checksum mismatch (not a tar archive, or corrupt)")
    typeflag = block[156:157]
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX prefix field
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    devices = typeflag in (b"3", b"4")
    return (
        name,
        typeflag,
        parse_tar_number(block[100:108], "mode") & 0o7777,
        parse_tar_number(block[108:116], "uid"),
        parse_tar_number(block[116:124], "gid"),
        parse_tar_number(block[124:136], "size"),
        parse_tar_number(block[136:148], "mtime"),
        block[157:257].split(b"\0", 1)[0],
        parse_tar_number(block[329:337], "devmajor") if devices else 0,
        parse_tar_number(block[337:345], "devminor") if devices else 0,
        block[257:265] == b"ustar  \0",
    )


# ---- tar-split's file checksum -----------------------------------------------------------------

_CRC64_ISO_REFLECTED = 0xD800000000000000


def _crc64_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC64_ISO_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC64_TABLE = _crc64_table()


def crc64_iso(crc: int, data: bytes | memoryview) -> int:
    """Go's crc64.Update with the ISO table (what tar-split stores for each file): pass 0
    first, then the previous result."""
    table = _CRC64_TABLE
    crc ^= 0xFFFFFFFFFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF


# ---- tar-split's JSON lines --------------------------------------------------------------------

TarSplitItem = bytes | tuple[str, int, int]


def tarsplit_lines(items: Sequence[TarSplitItem], position: int) -> bytes:
    """Docker's tar-split JSON lines for a run of entries numbered from position: a bytes item
    is a segment of raw archive bytes, a (name, size, crc) tuple a file, by its name as the
    archive had it (decoded with surrogateescape), the size of its data and the CRC-64 of it.
    A name that is not UTF-8 goes as "name_raw" (base64); ASCII-only JSON escapes otherwise."""
    lines = []
    for item in items:
        if isinstance(item, tuple):
            name, size, crc = item
            if name.isascii() or _is_utf8(name):
                named = b'"name":' + _json_string(name).encode()
            else:
                named = b'"name_raw":"' + base64.b64encode(
                    name.encode("utf-8", "surrogateescape")) + b'"'
            if size:
                lines.append(b'{"type":1,%s,"size":%d,"payload":"%s","position":%d}\n' % (
                    named, size, base64.b64encode(crc.to_bytes(8, "big")), position))
            else:
                lines.append(b'{"type":1,%s,"payload":null,"position":%d}\n' % (named,
                                                                                 position))
        else:
            lines.append(b'{"type":2,"payload":"%s","position":%d}\n' % (
                base64.b64encode(item), position))
        position += 1
    return b"".join(lines)


def _is_utf8(name: str) -> bool:
    """Whether the archive's bytes for this name (decoded with surrogateescape) are UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---- tar-split's collector ---------------------------------------------------------------------

# what a collector gathers before it calls batch_ready(): entries, raw bytes kept
TARSPLIT_BATCH_ITEMS = 2048
TARSPLIT_BATCH_BYTES = 256 << 10


class TarSplitCollector:
    """What a tar-split recorder keeps of an archive while a TarReader reads it: the reader
    hands over every byte it consumes (consume) and says where each member's data begins
    (begin_file) and ends (end_file). The bytes between members gather into one segment; a
    member's data only feeds its CRC-64. The entries gather in the archive's order, as
    tarsplit_lines takes them (here bytes for a segment, (name, size, crc) for a member; the
    native core packs them), until take() hands them out; batch_ready() is called whenever
    enough of them have gathered.

    Raises DiffError when one place brings more than max_entry_bytes of headers and padding,
    or the archive more than max_total_bytes in all. `unusable` says why the archive cannot be
    replayed (a sparse member, a name seen twice, too much after the end), if so."""

    def __init__(self, max_entry_bytes: int, max_total_bytes: int,
                 hash_update: Callable[[bytes | memoryview], object] | None = None) -> None:
        self.max_entry_bytes = max_entry_bytes
        self.max_total_bytes = max_total_bytes
        self.hash_update = hash_update  # sees every byte consumed, when given
        self.raw_bytes = 0  # kept so far, in all
        self.unusable: str | None = None
        self._items: list[TarSplitItem] = []
        self.position = 0  # of the first entry not taken yet
        self._handed_raw = 0  # raw_bytes when items were last taken
        self._pending = bytearray()  # the segment being gathered
        self._file: tuple[str, int] | None = None  # the member whose data is being read
        self._crc = 0
        self._names: set[str] = set()

    def consume(self, piece: bytes | memoryview) -> None:
        """Bytes the reader consumed: the current member's data, or raw archive bytes."""
        if self.hash_update is not None:
            self.hash_update(piece)
        if self._file is not None:
            self._crc = crc64_iso(self._crc, piece)
            return
        self._keep(len(piece))
        self._pending += piece

    def _keep(self, size: int) -> None:
        """The caps, checked before size more raw bytes are kept."""
        if len(self._pending) + size > self.max_entry_bytes:
            raise DiffError(f"tar-split: more than {self.max_entry_bytes} bytes of headers and "
                            "padding in one place (after entry "
                            f"#{self.position + len(self._items)}); refusing to record them")
        self.raw_bytes += size
        if self.raw_bytes > self.max_total_bytes:
            raise DiffError(f"tar-split: more than {self.max_total_bytes} bytes of headers and "
                            "padding in the archive; refusing to record them")

    def consume_trailing(self, piece: bytes | memoryview) -> None:
        """Bytes after the end-of-archive blocks, which apply ignores. Past the caps they
        make the archive unusable for replay, not an error: trailing data is valid (and the
        hash still sees it)."""
        if self.unusable is None and (
                len(self._pending) + len(piece) > self.max_entry_bytes
                or self.raw_bytes + len(piece) > self.max_total_bytes):
            self.unusable = f"more than {self.max_entry_bytes} bytes after the end of the archive"
            self._pending.clear()
        if self.unusable is not None:
            if self.hash_update is not None:
                self.hash_update(piece)
            return
        self.consume(piece)

    def begin_file(self, name: str, size: int, sparse: bool,
                   raw: bytes | memoryview = b"") -> None:
        """A member's data starts: its name as the archive has it (decoded with
        surrogateescape) and data size; raw: the last of the bytes before it, not yet
        consumed (its headers)."""
        if self._file is not None:
            self.end_file()
        if raw or self._pending:
            self.consume(raw)
            self._items.append(bytes(self._pending))
            self._pending.clear()
        if sparse and self.unusable is None:
            self.unusable = f"{name!r} is a sparse file"
        key = name.strip("/").removeprefix("./")
        if key in self._names and self.unusable is None:
            self.unusable = f"{name!r} is in the archive twice"
        self._names.add(key)
        self._file = (name, size)
        self._crc = 0

    def defer_crc(self) -> bool:
        """Whether the current member's CRC-64 may be read back later from its file, handed
        over with take_fd once written (still open, readable), instead of summed from its
        data. The native core does so on tar-split's compressing thread (csrc/crcfd.c), so
        that the applying thread neither sums nor closes the file; this one never."""
        return False

    def abandon(self) -> None:
        """Closes the files held for their CRCs (none here) and forgets what was not taken:
        the recording is given up (an apply that failed)."""
        self.position += len(self._items)
        self._items = []
        self._file = None
        self.unusable = "the recording was abandoned"

    def take_fd(self, fd: int) -> None:
        """The current member's written file, after defer_crc() said True."""
        raise ValueError("take_fd: the current member's CRC was not deferred")

    def end_file(self, data: bytes | memoryview = b"") -> None:
        """A member's data ends; data: the last of it, not yet consumed. Outside a member,
        data is raw bytes."""
        if data:
            self.consume(data)
        if self._file is None:
            return
        self._items.append((*self._file, self._crc))
        self._file = None
        if (len(self._items) >= TARSPLIT_BATCH_ITEMS
                or self.raw_bytes - self._handed_raw >= TARSPLIT_BATCH_BYTES):
            self.batch_ready()

    def end_segment(self) -> None:
        """Closes the segment being gathered (at the end of the archive)."""
        self.end_file()
        if self._pending:
            self._items.append(bytes(self._pending))
            self._pending.clear()

    def take(self) -> tuple[Sequence[TarSplitItem], int]:
        """The entries gathered since the last take, for tarsplit_lines, and the position
        of the first."""
        taken = self._items, self.position
        self.position += len(self._items)
        self._items = []
        self._handed_raw = self.raw_bytes
        return taken

    def batch_ready(self) -> None:
        """Called when enough items have gathered to be taken; a recorder overrides it."""


def tarsplit_fd_cap(cap: int | None = None) -> int:
    """How many files the process may hold open for their CRC to be read back: none here
    (see TarSplitCollector.defer_crc); the native core's cap can be set."""
    return 0


def tarsplit_fds_held() -> int:
    """How many files are open now for their CRC to be read back."""
    return 0


# ---- a run of plain members, unpacked from a tar reader's buffer ----------------------------

UNPACK_FULL, UNPACK_NEED_DATA, UNPACK_PARENT, UNPACK_OTHER, UNPACK_ERROR = 1, 2, 3, 4, 5
_ID_LIMIT = 2**32 - 1
_TIME_LIMIT_SECONDS = 2**33
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnpackRun(NamedTuple):
    """Where a run of members stopped, and what it did."""

    status: int  # UNPACK_*: why it stopped (never FULL: the run goes on until it stops)
    position: int  # the end of the last member's data (or where it started, if none)
    padding: int  # the padding after it, still to skip
    entries: int  # members created
    data_bytes: int  # the sum of their sizes
    added_size: int  # what they add to the tree's size (files' data, symlinks' targets)
    stop_directory: bytes  # the directory part of the member it stopped at, as spelled
    stop_name: bytes  # that member's name
    error: int  # errno of UNPACK_ERROR
    last_name: bytes  # the name of the last member created, if any


class _Member(NamedTuple):
    kind: bytes
    name: bytes
    directory_length: int
    base: bytes
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int
    linkname: bytes
    data_offset: int


def _left_to_the_spec(block: bytes) -> bool:
    """Whether the native header parser, strict, leaves this header to parse_tar_header: a
    checksum summed over signed chars, or a base-256 number that is negative or past int64
    in mode, uid, gid, size or mtime (the native run stops there, as this one must)."""
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if int(block[148:156].split(b"\0", 1)[0].strip(b" "), 8) != unsigned:
        return True
    for start, length in ((100, 8), (108, 8), (116, 8), (124, 12), (136, 12)):
        field = block[start:start + length]
        if field[0] & 0x80 and (field[0] != 0x80 or int.from_bytes(field[1:], "big") >> 63):
            return True
    return False


def _examine(buffer: memoryview, position: int, end: int, prefix: bytes | None,
             max_file_size: int) -> tuple[int, _Member | None]:
    """The member at position: (0, member) when a run may create it, else (status, member
    as far as it was read)."""
    if end - position < 512:
        return UNPACK_NEED_DATA, None
    block = bytes(buffer[position:position + 512])
    if block == bytes(512):
        return UNPACK_OTHER, None
    try:
        name, kind, mode, uid, gid, size, mtime, linkname, _, _, _ = parse_tar_header(block)
    except ValueError:
        return UNPACK_OTHER, None
    if _left_to_the_spec(block):
        return UNPACK_OTHER, None
    if kind in (b"\0", b"7"):
        kind = b"0"
    length = len(name)
    if kind == b"5" and name.endswith(b"/"):
        length -= 1
    directory_length = name.rfind(b"/", 0, length) + 1
    base = name[directory_length:length]
    member = _Member(kind, name, directory_length, base, mode, uid, gid, mtime, size, linkname,
                     position + 512)
    if kind not in (b"0", b"2", b"5"):
        return UNPACK_OTHER, member
    if ((kind != b"0" and size) or uid >= _ID_LIMIT or gid >= _ID_LIMIT
            or mtime >= _TIME_LIMIT_SECONDS or (kind == b"2" and not linkname)):
        return UNPACK_OTHER, member
    if (base in (b"", b".", b"..") or base.startswith(b".wh.") or b"/" in base
            or len(base) >= 256):  # before the directory: "a/f/" must not make "a/f" one
        return UNPACK_OTHER, member
    if prefix is None or name[:directory_length] != prefix:
        return UNPACK_PARENT, member
    if size > max_file_size:
        return UNPACK_OTHER, member
    if position + 512 + size + (-size % 512) > end:
        return UNPACK_NEED_DATA, member
    return 0, member


def _create_member(parent_fd: int, member: _Member, buffer: memoryview) -> None:
    base, times = member.base, (member.mtime * 1_000_000_000,) * 2
    if member.kind == b"5":
        os.mkdir(base, 0o700, dir_fd=parent_fd)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent_fd)
        try:
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode)
        finally:
            os.close(fd)
    elif member.kind == b"2":
        os.symlink(member.linkname, base, dir_fd=parent_fd)
        os.chown(base, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
        os.utime(base, ns=times, dir_fd=parent_fd, follow_symlinks=False)
    else:
        fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=parent_fd)
        data = buffer[member.data_offset:member.data_offset + member.size]
        finish_file(fd, data, (member.uid, member.gid), member.mode, *times, "")


def unpack_run(buffer: memoryview, position: int, end: int, padding: int, parent_fd: int,
               prefix: bytes | None, parent: str, max_file_size: int,
               recorder: TarSplitCollector | None,
               directory_times: list[tuple[str, int, int]]) -> UnpackRun:
    """Creates the members in buffer[position + padding:end] while each is a plain file (its
    data all in the buffer, at most max_file_size bytes), symlink or directory whose name
    is spelled prefix + a plain base name (no slash, not "." or "..", no ".wh."), in the
    directory parent_fd (`parent` in the tree, prefix None: none yet): what a root-owned
    extraction with no id mapping would make of each, owner and times as the header says. A
    directory's times go into directory_times for the caller to set last. Every other member
    stops the run untouched (so does one whose name is taken: EEXIST), as does a failure.
    The recorder, if any, is told of each member created as a TarReader tells it."""
    if not 0 <= position <= end <= len(buffer) or padding < 0:
        raise ValueError("unpack_run: position, end and padding do not fit the buffer")
    created = data_bytes = added_size = 0
    last_name = b""
    mark = position
    at = position + padding
    if at > end:
        return UnpackRun(UNPACK_NEED_DATA, position, padding, 0, 0, 0, b"", b"", 0, b"")
    while True:
        status, member = _examine(buffer, at, end, prefix, max_file_size)
        error = 0
        if status == 0:
            assert member is not None
            try:
                _create_member(parent_fd, member, buffer)
            except OSError as failure:
                status = UNPACK_OTHER if failure.errno == errno.EEXIST else UNPACK_ERROR
                error = 0 if failure.errno == errno.EEXIST else (failure.errno or errno.EIO)
        if status:
            return UnpackRun(status, position, padding, created, data_bytes, added_size,
                             member.name[:member.directory_length] if member else b"",
                             member.name if member else b"", error, last_name)
        assert member is not None
        data_end = member.data_offset + member.size
        if recorder is not None:
            recorder.begin_file(os.fsdecode(member.name), member.size, False,
                                buffer[mark:member.data_offset])
            recorder.end_file(buffer[member.data_offset:data_end])
        if member.kind == b"5":
            base = os.fsdecode(member.base)
            directory_times.append((f"{parent}/{base}" if parent else base,
                                    member.mtime * 1_000_000_000,
                                    member.mtime * 1_000_000_000))
        created += 1
        last_name = member.name
        data_bytes += member.size
        if member.kind == b"0":
            added_size += member.size
        elif member.kind == b"2":  # a directory's linkname field, if any, counts for nothing
            added_size += len(member.linkname)
        position, padding = data_end, -member.size % 512
        mark = position
        at = position + padding
