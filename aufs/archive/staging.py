"""Applying a diff atomically: unpack into a hardlink clone of the layer's branch, then swap
the clone in with one renameat2(RENAME_EXCHANGE).

The clone shares file inodes with the branch. That is safe because the extractor never
writes into an existing file: it replaces entries, it does not modify them. Directories are
real copies (their mode, owner, times and xattrs, such as overlay's opaque mark, included).
"""

from __future__ import annotations

import errno
import os
import stat

from aufs import _implementation as native

RENAME_EXCHANGE = 0x2
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _copy_directory_attributes(source_fd: int, target_fd: int, info: os.stat_result) -> None:
    if (info.st_uid, info.st_gid) != (os.getuid(), os.getgid()):
        os.fchown(target_fd, info.st_uid, info.st_gid)
    os.fchmod(target_fd, stat.S_IMODE(info.st_mode))
    try:
        for name in os.listxattr(source_fd):
            os.setxattr(target_fd, name, os.getxattr(source_fd, name))
    except OSError as error:
        if error.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def clone_tree(source: str, target: str) -> None:
    """Makes target a copy of source: new directories, hardlinks for everything else."""
    source_fd = os.open(source, DIR_FLAGS)
    os.mkdir(target, 0o700)
    target_fd = os.open(target, DIR_FLAGS)
    stack = [(source_fd, target_fd, os.fstat(source_fd))]
    finished: list[tuple[int, os.stat_result]] = []
    try:
        while stack:
            from_fd, to_fd, info = stack.pop()
            for entry in os.scandir(from_fd):
                entry_info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(entry_info.st_mode):
                    os.mkdir(entry.name, 0o700, dir_fd=to_fd)
                    stack.append((os.open(entry.name, DIR_FLAGS, dir_fd=from_fd),
                                  os.open(entry.name, DIR_FLAGS, dir_fd=to_fd), entry_info))
                else:
                    os.link(entry.name, entry.name, src_dir_fd=from_fd, dst_dir_fd=to_fd,
                            follow_symlinks=False)
            _copy_directory_attributes(from_fd, to_fd, info)
            finished.append((to_fd, info))
            os.close(from_fd)
        for fd, info in reversed(finished):  # times last: creating entries moved them
            os.utime(fd, ns=(info.st_atime_ns, info.st_mtime_ns))
    finally:
        for fd, _ in finished:
            os.close(fd)
        for from_fd, to_fd, _ in stack:
            os.close(from_fd)
            os.close(to_fd)


def exchange(first: str, second: str) -> None:
    """Swaps two paths on the same filesystem atomically."""
    native.renameat2(-100, first, -100, second, RENAME_EXCHANGE)  # -100: AT_FDCWD
