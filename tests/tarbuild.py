"""Building test archives, hostile ones included, with the standard library's tarfile."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterable
from pathlib import Path


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *,
           mode: int = 0o644, linkname: str = "", uid: int = 0, gid: int = 0,
           mtime: int = 1_700_000_000, devmajor: int = 0, devminor: int = 0,
           pax: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    info.mode = mode
    info.linkname = linkname
    info.uid, info.gid = uid, gid
    info.mtime = mtime
    info.devmajor, info.devminor = devmajor, devminor
    info.pax_headers = dict(pax or {})
    return info, data


def directory(name: str, mode: int = 0o755, **kwargs: object) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.DIRTYPE, mode=mode, **kwargs)  # type: ignore[arg-type]


def archive(members: Iterable[tuple[tarfile.TarInfo, bytes]],
            tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def tree_snapshot(root: Path, skip: Iterable[Path] = ()) -> dict[str, tuple[object, ...]]:
    """Everything that identifies a tree: names, types, modes, owners, sizes, contents,
    link targets, mtimes and hardlink groups."""
    skipped = {str(path) for path in skip}
    entries: dict[str, tuple[object, ...]] = {}
    inodes: dict[tuple[int, int], str] = {}
    for directory_path, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(directory_path, d) not in skipped]
        for name in sorted(dirnames + filenames):
            path = os.path.join(directory_path, name)
            info = os.lstat(path)
            relative = os.path.relpath(path, root)
            content: object = None
            if stat.S_ISREG(info.st_mode):
                content = Path(path).read_bytes()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            group = inodes.setdefault((info.st_dev, info.st_ino), relative) \
                if not stat.S_ISDIR(info.st_mode) else None
            entries[relative] = (info.st_mode, info.st_uid, info.st_gid, info.st_rdev,
                                 content, info.st_mtime_ns, group)
    return entries
