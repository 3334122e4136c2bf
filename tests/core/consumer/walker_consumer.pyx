# cython: language_level=3, embedsignature=True, binding=True
"""A third-party extension that reaches aufs' C API through `cimport aufs`, without the GIL."""

from libc.stdint cimport uint32_t, uint64_t

cimport aufs


def size_without_gil(bytes path, unsigned int threads):
    cdef const char *c_path = path
    cdef uint64_t size = 0
    cdef int rc
    with nogil:
        rc = aufs.walk_directory_size(c_path, threads, &size)
    return rc, size


def magic_without_gil(bytes path):
    cdef const char *c_path = path
    cdef uint32_t magic = 0
    cdef int rc
    with nogil:
        rc = aufs.read_fs_magic(c_path, &magic)
    return rc, magic


def mountpoint_without_gil(bytes path):
    cdef const char *c_path = path
    cdef int rc
    with nogil:
        rc = aufs.check_mountpoint(c_path)
    return rc


def first_mount_data_without_gil(bytes rw, bytes ro0, bytes ro1):
    cdef char out[4096]
    cdef const char *branches[2]
    cdef const char *c_rw = rw
    cdef size_t consumed = 0
    cdef ssize_t length
    branches[0] = ro0
    branches[1] = ro1
    with nogil:
        length = aufs.build_first_mount_data(out, sizeof(out), c_rw, branches, 2, "", False,
                                             4096, &consumed)
    if length < 0:
        return length, consumed, b""
    return length, consumed, out[:length]
