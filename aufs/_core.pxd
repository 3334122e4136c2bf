# cython: language_level=3
"""Declarations of the plain-C core in csrc/aufs_core.h, for aufs/_native.pyx only."""

from libc.stdint cimport uint32_t, uint64_t


cdef extern from "aufs_core.h" nogil:
    enum:
        AUFS_MOUNT_DATA_RESERVE
        AUFS_DIRPERM1_RESERVE

    struct aufs_fs_param:
        const char *key
        const char *value

    ssize_t aufs_first_mount_data(char *out, size_t out_size, const char *rw,
                                  const char *const *ro, size_t ro_count, const char *label,
                                  int dirperm1, size_t page_size, size_t *consumed)
    ssize_t aufs_remount_data(char *out, size_t out_size, const char *const *ro,
                              size_t ro_count, const char *label, int dirperm1,
                              size_t page_size, size_t *consumed)

    int aufs_mount(const char *source, const char *target, const char *fstype,
                   unsigned long flags, const char *data)
    int aufs_unmount(const char *target, int flags)
    int aufs_fs_magic(const char *path, uint32_t *magic)
    int aufs_is_mountpoint(const char *path)
    int aufs_fsmount(const char *fstype, const char *source, const aufs_fs_param *params,
                     size_t param_count, unsigned int attr_flags, const char *target,
                     char *message, size_t message_size)

    int aufs_openat2(int dirfd, const char *path, int flags, unsigned int mode,
                     unsigned long long resolve)
    int aufs_renameat2(int old_dirfd, const char *old_path, int new_dirfd,
                       const char *new_path, unsigned int flags)

    int aufs_directory_size(const char *root, unsigned int threads, uint64_t *bytes,
                            char *error_path, size_t error_path_size)
