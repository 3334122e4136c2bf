"""A directory written through file descriptors only: every path is resolved inside it.

Paths are opened with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS): a symlink or ".."
can never lead outside, whatever an archive put there. The final component of an entry is
never followed: it is created, replaced or removed with *at() calls on its parent's fd.
On kernels before 5.6 (no openat2), the walk goes one component at a time with O_NOFOLLOW,
so a symlinked parent is refused instead of followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat

from aufs import _implementation as native

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
MAX_CACHED_DIRS = 128

_has_openat2: bool | None = None


class BeneathRoot:
    """Opens, creates and removes entries below one directory, with a small cache of open
    directory fds (archives list a directory's entries together)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, DIRECTORY_FLAGS | os.O_NOFOLLOW)
        self._dirs: dict[str, int] = {}

    def close(self) -> None:
        self.forget_dirs()
        os.close(self.fd)

    def __enter__(self) -> BeneathRoot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def forget_dirs(self) -> None:
        """Drops cached fds; call after removing or replacing anything that may be a dir."""
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def _resolve(self, relative: str) -> int:
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

    def open_dir(self, relative: str, *, create: bool = False, mode: int = 0o755,
                 owner: tuple[int, int] | None = None) -> int:
        """An fd of the directory at relative ("" is the root), creating missing ones with
        mode and owner when asked. The fd stays owned by this object."""
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
            parent, _, name = relative.rpartition("/")
            parent_fd = self.open_dir(parent, create=True, mode=mode, owner=owner)
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=parent_fd)
                os.chmod(name, mode, dir_fd=parent_fd)  # the dir we just made: not the umask's
                if owner is not None:
                    os.chown(name, *owner, dir_fd=parent_fd, follow_symlinks=False)
            fd = self._resolve(relative)
        if len(self._dirs) >= MAX_CACHED_DIRS:
            self.forget_dirs()
        self._dirs[relative] = fd
        return fd

    @staticmethod
    def lstat(parent_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return None

    def remove(self, parent_fd: int, name: str, info: os.stat_result | None = None) -> bool:
        """Removes name (a whole tree if it is a directory); False if it was not there."""
        info = info or self.lstat(parent_fd, name)
        if info is None:
            return False
        if stat.S_ISDIR(info.st_mode):
            self.forget_dirs()
            shutil.rmtree(name, dir_fd=parent_fd)  # fd-based, never follows symlinks
        else:
            os.unlink(name, dir_fd=parent_fd)
        return True
