"""A directory written through file descriptors only: every path is resolved inside it.

Paths are opened with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS): a symlink or ".."
can never lead outside, whatever an archive put there. The final component of an entry is
never followed: it is created, replaced or removed with *at() calls on its parent's fd.
On kernels before 5.6 (no openat2), the walk goes one component at a time with O_NOFOLLOW,
so a symlinked parent is refused instead of followed.

Who owns which fd. The directory fds that open_dir returns belong to the BeneathRoot, and a
caller may use one only until its next settle() (the extractor settles after each entry).
Nothing closes such an fd before then: a removal or a full cache only retires it, and
settle() closes what was retired. So a caller never passes a closed number to a syscall,
and another thread can never be handed the same number while a caller still holds it.

Nothing here recurses on the depth of the tree: an archive name may have 2,000 components.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from aufs import _implementation as native

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
NO_FOLLOW_DIRECTORY_FLAGS = DIRECTORY_FLAGS | os.O_NOFOLLOW
MAX_CACHED_DIRS = 128

_has_openat2: bool | None = None


class BeneathRoot:
    """Opens, creates and removes entries below one directory, with a small cache of open
    directory fds (archives list a directory's entries together)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, NO_FOLLOW_DIRECTORY_FLAGS)
        self._dirs: dict[str, int] = {}
        self._retired: list[int] = []

    def close(self) -> None:
        self._forget(None)
        self.settle()
        os.close(self.fd)

    def __enter__(self) -> BeneathRoot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def settle(self) -> None:
        """Closes the fds retired since the last call. Every fd open_dir returned before is
        invalid afterwards: callers hold none across this call."""
        retired, self._retired = self._retired, []
        for fd in retired:
            os.close(fd)

    def _forget(self, relative: str | None) -> None:
        """Retires the cached fds of relative and of everything below it (None: all)."""
        if relative is None:
            stale = list(self._dirs)
        else:
            below = relative + "/"
            stale = [key for key in self._dirs if key == relative or key.startswith(below)]
        for key in stale:
            self._retired.append(self._dirs.pop(key))

    def _resolve(self, relative: str) -> int:
        """A new fd (the caller's) of the directory at relative, resolved inside the root."""
        global _has_openat2
        if _has_openat2 is not False:
            try:
                fd = native.openat2(self.fd, relative, DIRECTORY_FLAGS, 0,
                                    RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
                _has_openat2 = True
                return fd
            except OSError as error:
                if error.errno != errno.ENOSYS:
                    raise
                _has_openat2 = False
        return native.open_directory_stepwise(self.fd, relative.split("/"))

    def open_new(self, relative: str) -> int:
        """A new fd of the directory at relative, owned (and closed) by the caller."""
        if not relative:
            return os.dup(self.fd)
        return self._resolve(relative)

    def open_dir(self, relative: str, *, create: bool = False, mode: int = 0o755,
                 owner: tuple[int, int] | None = None) -> int:
        """An fd of the directory at relative ("" is the root), creating missing ones with
        mode and owner when asked. The fd stays owned by this object and valid until the
        next settle()."""
        if not relative:
            return self.fd
        cached = self._dirs.get(relative)
        if cached is not None:
            return cached
        try:
            fd = self._resolve(relative)
        except FileNotFoundError:
            if not create:
                raise
            fd = self._create(relative, mode, owner)
        if len(self._dirs) >= MAX_CACHED_DIRS:
            self._forget(None)
        self._dirs[relative] = fd
        return fd

    def _create(self, relative: str, mode: int, owner: tuple[int, int] | None) -> int:
        """Makes the missing directories of relative, one level at a time from the deepest
        one that exists; returns a new fd of the last."""
        parts = relative.split("/")
        depth = len(parts) - 1
        fd = -1
        while depth > 0:
            ancestor = "/".join(parts[:depth])
            cached = self._dirs.get(ancestor)
            try:
                fd = os.dup(cached) if cached is not None else self._resolve(ancestor)
                break
            except FileNotFoundError:
                depth -= 1
        if fd < 0:
            fd = os.dup(self.fd)
        try:
            for name in parts[depth:]:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, mode, dir_fd=fd)
                    os.chmod(name, mode, dir_fd=fd)  # the dir we just made: not the umask's
                    if owner is not None:
                        os.chown(name, *owner, dir_fd=fd, follow_symlinks=False)
                next_fd = os.open(name, NO_FOLLOW_DIRECTORY_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def lstat(parent_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return None

    def remove(self, parent_fd: int, relative: str, info: os.stat_result | None = None) -> bool:
        """Removes the entry at relative, whose parent directory is parent_fd (a whole tree
        if it is a directory); False if it was not there. parent_fd stays valid."""
        name = relative.rpartition("/")[2]
        info = info or self.lstat(parent_fd, name)
        if info is None:
            return False
        if stat.S_ISDIR(info.st_mode):
            # cached paths may lead into this tree through symlinks: forget them all
            self._forget(None)
            remove_tree(parent_fd, name)
        else:
            # a symlink: the paths cached through it named its target's entries
            self._forget(relative)
            os.unlink(name, dir_fd=parent_fd)
        return True


def remove_tree(parent_fd: int, name: str, *, missing_ok: bool = False) -> None:
    """Removes the directory name below parent_fd and everything in it, never following a
    symlink. Iterative, and it holds two fds at a time whatever the depth: going back up
    opens ".." and checks it is the directory it came from. missing_ok: entries that vanish
    meanwhile (another remover) are not an error."""
    ignored = (FileNotFoundError,) if missing_ok else ()
    try:
        fd = os.open(name, NO_FOLLOW_DIRECTORY_FLAGS, dir_fd=parent_fd)
    except ignored:
        return
    # the way back up: (name in its parent, the parent's (st_dev, st_ino))
    path: list[tuple[str, tuple[int, int]]] = []
    try:
        while True:
            child = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        child = entry.name
                        break
                    with contextlib.suppress(*ignored):
                        os.unlink(entry.name, dir_fd=fd)
            if child is not None:
                try:
                    next_fd = os.open(child, NO_FOLLOW_DIRECTORY_FLAGS, dir_fd=fd)
                except ignored:
                    continue
                info = os.fstat(fd)
                os.close(fd)
                fd = next_fd
                path.append((child, (info.st_dev, info.st_ino)))
                continue
            if not path:
                break
            emptied, (device, inode) = path.pop()
            up = os.open("..", NO_FOLLOW_DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != (device, inode):
                raise OSError(errno.ESTALE, "a directory moved while its tree was removed",
                              emptied)
            with contextlib.suppress(*ignored):
                os.rmdir(emptied, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(*ignored):
        os.rmdir(name, dir_fd=parent_fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_directory_no_symlinks(dir_fd: int, relative: str) -> int:
    """A new fd of the directory at relative below dir_fd, refusing a symlink in any
    component (OSError ELOOP naming it) and any ".."."""
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if ".." in parts or relative.startswith("/"):
        raise OSError(errno.EXDEV, "the path leads outside its directory", relative)
    fd = os.dup(dir_fd)
    try:
        for index, part in enumerate(parts):
            try:
                next_fd = os.open(part, NO_FOLLOW_DIRECTORY_FLAGS, dir_fd=fd)
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR):
                    info = os.lstat(part, dir_fd=fd)
                    raise OSError(error.errno, f"{_kind(info.st_mode)}, not a directory "
                                  "(links are not followed here)",
                                  "/".join(parts[:index + 1])) from None
                raise
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_file(dir_fd: int, relative: str) -> int:
    """A new read-only fd of the regular file at relative below dir_fd. No symlink is
    followed in any component, and nothing but a regular file is ever opened for reading:
    the entry is looked at through an O_PATH fd first, so a FIFO cannot hang the caller
    and a device is never opened. Refusals are OSError naming the path and its kind."""
    parent, _, name = relative.rpartition("/")
    if name in ("", ".", ".."):
        raise OSError(errno.EINVAL, "not a file name", relative)
    directory = open_directory_no_symlinks(dir_fd, parent)
    try:
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    finally:
        os.close(directory)
    try:
        info = os.fstat(path_fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{_kind(info.st_mode)}, not a regular file", relative)
        # reopen the very inode the O_PATH fd holds: no second lookup to race with
        fd = os.open(f"/proc/self/fd/{path_fd}",
                     os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
        os.close(fd)
        raise OSError(errno.ESTALE, "the file changed while it was opened", relative)
    return fd
