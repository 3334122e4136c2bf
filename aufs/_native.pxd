# cython: language_level=3
"""The C API that other extensions may cimport: `from aufs._native cimport ...` (or `cimport aufs`).

Every function runs without the GIL, never raises, and returns 0 (or a length) on success and
-errno on failure. Paths are NUL-terminated bytes in the filesystem encoding.
"""

from libc.stdint cimport uint32_t, uint64_t


# Apparent size of a tree, Docker's directory.Size rules; threads=0 means one per CPU.
cdef int walk_directory_size(const char *path, unsigned int threads,
                             uint64_t *size) noexcept nogil

# statfs(2) f_type of the filesystem holding path.
cdef int read_fs_magic(const char *path, uint32_t *magic) noexcept nogil

# 1 when path is the root of a mount, 0 when not.
cdef int check_mountpoint(const char *path) noexcept nogil

# Docker's first aufs mount data; *consumed is how many of ro it holds. out needs page_size bytes.
cdef ssize_t build_first_mount_data(char *out, size_t out_size, const char *rw,
                                    const char *const *ro, size_t ro_count, const char *label,
                                    bint dirperm1, size_t page_size,
                                    size_t *consumed) noexcept nogil

# One MS_REMOUNT "append:" chunk of the branches that did not fit before.
cdef ssize_t build_remount_data(char *out, size_t out_size, const char *const *ro,
                                size_t ro_count, const char *label, bint dirperm1,
                                size_t page_size, size_t *consumed) noexcept nogil

cdef int mount_filesystem(const char *source, const char *target, const char *fstype,
                          unsigned long flags, const char *data) noexcept nogil

cdef int unmount_filesystem(const char *target, int flags) noexcept nogil
