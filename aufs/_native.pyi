"""Type stub of the native extension; it mirrors aufs/_fallback.py."""

from collections.abc import Iterable, Sequence

from aufs._fallback import IOQueue as IOQueue
from aufs._fallback import PathArg, TarFields
from aufs._fallback import TarSplitCollector as TarSplitCollector
from aufs._fallback import crc64_iso as crc64_iso
from aufs._fallback import finish_file as finish_file
from aufs._fallback import parse_tar_number as parse_tar_number
from aufs._fallback import tarsplit_fd_cap as tarsplit_fd_cap
from aufs._fallback import tarsplit_fds_held as tarsplit_fds_held
from aufs._fallback import tarsplit_lines as tarsplit_lines
from aufs._fallback import unpack_run as unpack_run

IMPLEMENTATION: str

def aufs_mount_data(
    rw: PathArg,
    layers: Iterable[PathArg],
    mount_label: str | bytes = "",
    *,
    dirperm1: bool = False,
    page_size: int | None = None,
) -> list[str]: ...
def mount(
    source: PathArg | None,
    target: PathArg,
    fstype: str | bytes | None,
    flags: int = 0,
    data: str | bytes | None = "",
) -> None: ...
def mount_from(
    directory: PathArg,
    source: PathArg | None,
    target: PathArg,
    fstype: str | bytes | None,
    flags: int = 0,
    data: str | bytes | None = "",
) -> int: ...
def unmount(target: PathArg, flags: int = 0) -> None: ...
def fsmount(
    fstype: str | bytes,
    target: PathArg,
    options: Sequence[tuple[str | bytes, str | bytes | None]] = (),
    *,
    source: PathArg | None = None,
    attr_flags: int = 0,
) -> None: ...
def openat2(dirfd: int, path: PathArg, flags: int, mode: int = 0, resolve: int = 0) -> int: ...
def renameat2(
    old_dirfd: int, old_path: PathArg, new_dirfd: int, new_path: PathArg, flags: int = 0
) -> None: ...
def fs_magic(path: PathArg) -> int: ...
def mounted(magic: int, path: PathArg) -> bool: ...
def is_mountpoint(path: PathArg) -> bool: ...
def directory_size(path: PathArg, *, threads: int = 0) -> int: ...
def parse_tar_header(block: bytes | memoryview) -> TarFields: ...
def tar_tree(
    root_fd: int,
    out_fd: int,
    convert_whiteouts: bool,
    skip_aufs_metadata: bool,
    open_levels: int,
    uid_ranges: Iterable[tuple[int, int, int]] = (),
    gid_ranges: Iterable[tuple[int, int, int]] = (),
) -> OSError | None: ...

class TarSplitBatch:
    count: int
    def __len__(self) -> int: ...

class GzipLines:
    """tar-split's gzip file on a C thread (native only; see csrc/gzlines.c)."""

    def __init__(self, level: int = 1) -> None: ...
    def add(self, batch: TarSplitBatch, position: int) -> None: ...
    def finish(self) -> bytes: ...
    def close(self) -> None: ...
