# cython: language_level=3
# Re-exports the C API of aufs/_native.pxd, so that `cimport aufs` is enough.
from aufs._native cimport (
    build_first_mount_data,
    build_remount_data,
    check_mountpoint,
    mount_filesystem,
    read_fs_magic,
    unmount_filesystem,
    walk_directory_size,
)
