# cython: language_level=3, embedsignature=True, binding=True
"""The native core's Python face: converts arguments, runs csrc/ without the GIL, and turns a
negative errno into OSError. It is the only module that touches both Python objects and C.

aufs/_fallback.py is its pure-Python twin and the readable spec of each function.
"""

import os
import operator

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport (PyMem_Free, PyMem_Malloc, PyMem_RawFree, PyMem_RawMalloc,
                          PyMem_RawRealloc)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize

cdef extern from "Python.h":
    str PyUnicode_DecodeFSDefaultAndSize(const char *data, Py_ssize_t size)
    bint PyUnicode_IS_ASCII(object text)
    int PyUnicode_KIND(object text)
    void *PyUnicode_DATA(object text)
    Py_ssize_t PyUnicode_GET_LENGTH(object text)
    Py_UCS4 PyUnicode_READ(int kind, const void *data, Py_ssize_t index)
from libc.string cimport memcpy, memset
from libc.errno cimport EINVAL, ENOENT, ENOMEM, errno
from libc.stdlib cimport free
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t

cimport aufs._core as core

from aufs._fallback import parse_tar_number  # no hot path: one implementation
from aufs._fallback import TARSPLIT_BATCH_BYTES as _BATCH_BYTES
from aufs._fallback import TARSPLIT_BATCH_ITEMS as _BATCH_ITEMS
from aufs._fallback import tarsplit_lines as _tarsplit_lines_spec
from aufs.errors import DiffError

IMPLEMENTATION = "native"

cdef enum:
    ERROR_PATH_SIZE = 8192
    KERNEL_MESSAGE_SIZE = 512


# ---- the C API declared in aufs/_native.pxd ------------------------------------------------

cdef int walk_directory_size(const char *path, unsigned int threads,
                             uint64_t *size) noexcept nogil:
    return core.aufs_directory_size(path, threads, size, NULL, 0)


cdef int read_fs_magic(const char *path, uint32_t *magic) noexcept nogil:
    return core.aufs_fs_magic(path, magic)


cdef int check_mountpoint(const char *path) noexcept nogil:
    return core.aufs_is_mountpoint(path)


cdef ssize_t build_first_mount_data(char *out, size_t out_size, const char *rw,
                                    const char *const *ro, size_t ro_count, const char *label,
                                    bint dirperm1, size_t page_size,
                                    size_t *consumed) noexcept nogil:
    return core.aufs_first_mount_data(out, out_size, rw, ro, ro_count, label, dirperm1,
                                      page_size, consumed)


cdef ssize_t build_remount_data(char *out, size_t out_size, const char *const *ro,
                                size_t ro_count, const char *label, bint dirperm1,
                                size_t page_size, size_t *consumed) noexcept nogil:
    return core.aufs_remount_data(out, out_size, ro, ro_count, label, dirperm1, page_size,
                                  consumed)


cdef int mount_filesystem(const char *source, const char *target, const char *fstype,
                          unsigned long flags, const char *data) noexcept nogil:
    return core.aufs_mount(source, target, fstype, flags, data)


cdef int unmount_filesystem(const char *target, int flags) noexcept nogil:
    return core.aufs_unmount(target, flags)


# ---- argument conversion --------------------------------------------------------------------

cdef bytes _encode(object value, str what):
    cdef bytes raw = os.fsencode(value)
    if b"\0" in raw:
        raise ValueError(f"{what} contains a NUL byte: {value!r}")
    return raw


cdef const char *_optional(bytes value):
    return NULL if value is None else <const char *>value


cdef object _os_error(int error, object path, str detail=""):
    message = os.strerror(error)
    if detail:
        message = f"{message}: {detail}"
    return OSError(error, message, os.fsdecode(path) if isinstance(path, bytes) else path)


# ---- mount data -----------------------------------------------------------------------------

def aufs_mount_data(rw, layers, mount_label="", *, dirperm1=False, page_size=None):
    """Docker's aufs mount data: the first mount(2) string, then one per MS_REMOUNT."""
    cdef bytes rw_bytes = _encode(rw, "rw branch")
    cdef list ro = [_encode(layer, "layer branch") for layer in layers]
    cdef bytes label = _encode(mount_label, "mount label")
    cdef bint with_dirperm1 = bool(dirperm1)
    cdef Py_ssize_t page = os.sysconf("SC_PAGE_SIZE") if page_size is None else operator.index(page_size)
    cdef size_t count = len(ro)
    cdef size_t start = 0
    cdef size_t consumed = 0
    cdef ssize_t length
    cdef const char **branches
    cdef const char *rw_c = rw_bytes
    cdef const char *label_c = label
    cdef char *out
    cdef list result = []

    if page <= 0:
        raise ValueError(f"page_size must be positive, not {page}")
    branches = <const char **>PyMem_Malloc((count + 1) * sizeof(char *))
    out = <char *>PyMem_Malloc(page)
    if branches == NULL or out == NULL:
        PyMem_Free(branches)
        PyMem_Free(out)
        raise MemoryError()
    try:
        for i in range(count):
            branches[i] = <bytes>ro[i]
        with nogil:
            length = core.aufs_first_mount_data(out, page, rw_c, branches, count, label_c,
                                                with_dirperm1, page, &consumed)
        while length >= 0:
            result.append(os.fsdecode(out[:length]))
            start += consumed
            if start >= count:
                return result
            with nogil:
                length = core.aufs_remount_data(out, page, branches + start, count - start,
                                                label_c, with_dirperm1, page, &consumed)
        # The fallback is the spec: let it say exactly what is wrong with the input.
        from aufs import _fallback
        _fallback.aufs_mount_data(rw, ro, mount_label, dirperm1=dirperm1, page_size=page)
        raise _os_error(-length, rw)
    finally:
        PyMem_Free(branches)
        PyMem_Free(out)


# ---- syscalls -------------------------------------------------------------------------------

def mount(source, target, fstype, flags=0, data=""):
    """mount(2). source, fstype and data may be None."""
    cdef bytes source_bytes = None if source is None else _encode(source, "mount source")
    cdef bytes target_bytes = _encode(target, "mount target")
    cdef bytes fstype_bytes = None if fstype is None else _encode(fstype, "filesystem type")
    cdef bytes data_bytes = None if data is None else _encode(data, "mount data")
    cdef const char *source_c = _optional(source_bytes)
    cdef const char *target_c = target_bytes
    cdef const char *fstype_c = _optional(fstype_bytes)
    cdef const char *data_c = _optional(data_bytes)
    cdef unsigned long mount_flags = flags
    cdef int rc
    with nogil:
        rc = core.aufs_mount(source_c, target_c, fstype_c, mount_flags, data_c)
    if rc < 0:
        raise _os_error(-rc, target)


def mount_from(directory, source, target, fstype, flags=0, data=""):
    """mount(2) with the relative paths in data resolved from directory: in place while the
    caller is the process's only thread, else on a thread whose working directory is its
    own. Returns 0 once mounted, or the errno that kept such a thread from being made
    (nothing was done then)."""
    cdef bytes directory_bytes = _encode(directory, "directory")
    cdef bytes source_bytes = None if source is None else _encode(source, "mount source")
    cdef bytes target_bytes = _encode(target, "mount target")
    cdef bytes fstype_bytes = None if fstype is None else _encode(fstype, "filesystem type")
    cdef bytes data_bytes = None if data is None else _encode(data, "mount data")
    cdef const char *directory_c = directory_bytes
    cdef const char *source_c = _optional(source_bytes)
    cdef const char *target_c = target_bytes
    cdef const char *fstype_c = _optional(fstype_bytes)
    cdef const char *data_c = _optional(data_bytes)
    cdef unsigned long mount_flags = flags
    cdef int failed = 0
    cdef int rc
    with nogil:
        rc = core.aufs_mount_from(directory_c, source_c, target_c, fstype_c, mount_flags,
                                  data_c, &failed)
    if rc == 0:
        return 0
    if failed == core.AUFS_MOUNT_FROM_UNSHARE:
        return -rc
    if failed == core.AUFS_MOUNT_FROM_CHDIR:
        raise _os_error(-rc, directory)
    if failed == core.AUFS_MOUNT_FROM_THREAD:
        raise _os_error(-rc, target, "cannot start the thread that mounts from a directory")
    if failed == core.AUFS_MOUNT_FROM_RETURN:
        raise _os_error(-rc, ".", "cannot return to the working directory")
    raise _os_error(-rc, target)


def unmount(target, flags=0):
    """umount2(2) with the given MNT_* flags."""
    cdef bytes target_bytes = _encode(target, "unmount target")
    cdef const char *target_c = target_bytes
    cdef int unmount_flags = flags
    cdef int rc
    with nogil:
        rc = core.aufs_unmount(target_c, unmount_flags)
    if rc < 0:
        raise _os_error(-rc, target)


def fsmount(fstype, target, options=(), *, source=None, attr_flags=0):
    """Mount through fsopen/fsconfig/fsmount/move_mount.

    options is a sequence of (key, value) pairs, applied in order; a value of None sets a flag.
    A key may repeat (overlay's "lowerdir+"). Errors carry the kernel's own explanation.
    """
    cdef bytes fstype_bytes = _encode(fstype, "filesystem type")
    cdef bytes target_bytes = _encode(target, "mount target")
    cdef bytes source_bytes = None if source is None else _encode(source, "mount source")
    cdef list keys = []
    cdef list values = []
    cdef size_t count
    cdef unsigned int flags = attr_flags
    cdef core.aufs_fs_param *params
    cdef char message[KERNEL_MESSAGE_SIZE]
    cdef const char *fstype_c = fstype_bytes
    cdef const char *target_c = target_bytes
    cdef const char *source_c = _optional(source_bytes)
    cdef int rc

    for key, value in options:
        keys.append(_encode(key, "mount option"))
        values.append(None if value is None else _encode(value, "mount option value"))
    count = len(keys)
    params = <core.aufs_fs_param *>PyMem_Malloc((count + 1) * sizeof(core.aufs_fs_param))
    if params == NULL:
        raise MemoryError()
    try:
        for i in range(count):
            params[i].key = <bytes>keys[i]
            params[i].value = _optional(values[i])
        with nogil:
            rc = core.aufs_fsmount(fstype_c, source_c, params, count, flags, target_c, message,
                                   KERNEL_MESSAGE_SIZE)
    finally:
        PyMem_Free(params)
    if rc < 0:
        raise _os_error(-rc, target, message.decode("utf-8", "replace"))


def openat2(dirfd, path, flags, mode=0, resolve=0):
    """openat2(2): open path relative to dirfd with RESOLVE_* flags; returns the fd."""
    cdef bytes path_bytes = _encode(path, "path")
    cdef const char *path_c = path_bytes
    cdef int dir_c = dirfd
    cdef int flags_c = flags
    cdef unsigned int mode_c = mode
    cdef unsigned long long resolve_c = resolve
    cdef int rc
    with nogil:
        rc = core.aufs_openat2(dir_c, path_c, flags_c, mode_c, resolve_c)
    if rc < 0:
        raise _os_error(-rc, path)
    return rc


def renameat2(old_dirfd, old_path, new_dirfd, new_path, flags=0):
    """renameat2(2); flags=2 (RENAME_EXCHANGE) swaps the two paths atomically."""
    cdef bytes old_bytes = _encode(old_path, "path")
    cdef bytes new_bytes = _encode(new_path, "path")
    cdef const char *old_c = old_bytes
    cdef const char *new_c = new_bytes
    cdef int old_dir = old_dirfd
    cdef int new_dir = new_dirfd
    cdef unsigned int flags_c = flags
    cdef int rc
    with nogil:
        rc = core.aufs_renameat2(old_dir, old_c, new_dir, new_c, flags_c)
    if rc < 0:
        raise _os_error(-rc, old_path)


def parse_tar_header(const unsigned char[::1] block):
    """(name, typeflag, mode, uid, gid, size, mtime, linkname, devmajor, devminor, gnu) of one
    512-byte header block; ValueError saying why it is not one."""
    cdef core.aufs_tar_header header
    cdef int rc
    if block.shape[0] != 512:
        raise ValueError(f"a header block is 512 bytes, not {block.shape[0]}")
    rc = core.aufs_tar_parse_header(&block[0], &header)
    if rc < 0:
        from aufs import _fallback
        return _fallback.parse_tar_header(bytes(block))  # the spec: its value or its reason
    return (header.name[:header.name_length], bytes([<unsigned char>header.typeflag]),
            header.mode, header.uid, header.gid, header.size, header.mtime,
            header.linkname[:header.linkname_length], header.devmajor, header.devminor,
            bool(header.gnu))


def crc64_iso(uint64_t crc, const unsigned char[::1] data):
    """Go's crc64.Update with the ISO table (tar-split's file checksum), without the GIL."""
    cdef const unsigned char *start = &data[0] if data.shape[0] else NULL
    cdef size_t size = data.shape[0]
    with nogil:
        crc = core.aufs_crc64_iso(crc, start, size)
    return crc


def finish_file(int fd, const unsigned char[::1] data, owner, int mode, int64_t atime_ns,
                int64_t mtime_ns, str name):
    """Write data into fd, chown to owner (None: leave it), chmod, set times, close: one
    call without the GIL. Failures are OSError naming the entry."""
    cdef core.aufs_io_request request
    cdef int rc
    memset(&request, 0, sizeof(request))
    request.fd = fd
    request.out_fd = -1
    request.bytes = &data[0] if data.shape[0] else NULL
    request.bytes_size = data.shape[0]
    if owner is not None:
        request.set_owner = 1
        request.uid, request.gid = owner
    request.set_mode = 1
    request.mode = mode
    request.set_times = 1
    request.atime_ns = atime_ns
    request.mtime_ns = mtime_ns
    request.close_fd = 1
    with nogil:
        rc = core.aufs_io_run(&request)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc), name)


cdef enum:
    UNPACK_ENTRIES_AT_ONCE = 64

from aufs._fallback import UnpackRun


def unpack_run(object buffer, Py_ssize_t position, Py_ssize_t end, Py_ssize_t padding,
               int parent_fd, bytes prefix, str parent, Py_ssize_t max_file_size,
               recorder, list directory_times):
    """Creates the plain members that follow in the buffer, in C without the GIL; see
    aufs/_fallback.py (the spec) for what a run takes and where it stops. The recorder and
    directory_times hear of each member created after each stretch of them."""
    cdef const unsigned char[::1] data = buffer
    cdef core.aufs_unpack_run run
    cdef core.aufs_unpack_entry *entries = <core.aufs_unpack_entry *>PyMem_Malloc(
        UNPACK_ENTRIES_AT_ONCE * sizeof(core.aufs_unpack_entry))
    cdef core.aufs_unpack_entry *entry
    cdef Py_ssize_t index, created = 0, data_bytes = 0, added_size = 0, mark
    cdef int64_t times
    cdef bytes last_name = b""
    if entries == NULL:
        raise MemoryError()
    if not 0 <= position <= end <= data.shape[0] or padding < 0:
        PyMem_Free(entries)
        raise ValueError("unpack_run: position, end and padding do not fit the buffer")
    memset(&run, 0, sizeof(run))
    run.buffer = &data[0] if data.shape[0] else NULL
    run.end = end
    run.parent_known = prefix is not None
    run.parent_fd = parent_fd
    run.prefix = <const unsigned char *>PyBytes_AS_STRING(prefix) if prefix is not None else NULL
    run.prefix_length = PyBytes_GET_SIZE(prefix) if prefix is not None else 0
    run.max_file_size = max_file_size
    run.entries = entries
    run.capacity = UNPACK_ENTRIES_AT_ONCE
    run.position = position
    run.padding = padding
    cdef TarSplitCollector collector = (recorder if isinstance(recorder, TarSplitCollector)
                                        else None)
    run.want_crc = collector is not None
    run.defer_crc = collector is not None
    try:
        while True:
            mark = run.position
            with nogil:
                core.aufs_unpack_members(&run)
            for index in range(<Py_ssize_t>run.count):
                entry = &entries[index]
                if collector is not None:
                    collector.add_member(
                        PyUnicode_DecodeFSDefaultAndSize(<const char *>entry.name,
                                                         entry.name_length),
                        entry.size, entry.crc, &entry.fd, buffer, &data[0], mark,
                        entry.data_offset)
                    mark = entry.data_offset + entry.size
                elif recorder is not None:
                    recorder.begin_file(os.fsdecode(entry.name[:entry.name_length]),
                                        entry.size, False, buffer[mark:entry.data_offset])
                    recorder.end_file(buffer[entry.data_offset:entry.data_offset + entry.size])
                    mark = entry.data_offset + entry.size
                if entry.kind == 53:  # "5"
                    base = PyUnicode_DecodeFSDefaultAndSize(
                        <const char *>entry.name + entry.directory_length, entry.base_length)
                    times = entry.mtime * 1000000000
                    directory_times.append((f"{parent}/{base}" if parent else base, times,
                                            times))
                elif entry.kind == 50:  # "2"
                    added_size += entry.linkname_length
                else:
                    added_size += entry.size
                data_bytes += entry.size
            created += run.count
            if run.count:
                last_name = entries[run.count - 1].name[:entries[run.count - 1].name_length]
            if run.status != core.AUFS_UNPACK_FULL:
                break
        entry = &run.stop
        return UnpackRun(run.status, run.position, run.padding, created, data_bytes, added_size,
                         entry.name[:entry.directory_length], entry.name[:entry.name_length],
                         run.error, last_name)
    finally:
        for index in range(<Py_ssize_t>run.count):  # after an error: the fds not handed over
            if entries[index].fd >= 0:
                core.aufs_crc_fd_release(entries[index].fd)
        PyMem_Free(entries)


cdef class IOQueue:
    """File I/O jobs run in order by a C thread, without the GIL. See aufs/_fallback.py."""

    cdef core.aufs_io_queue *queue

    def __cinit__(self, size_t max_pending=256, size_t max_pending_bytes=64 << 20):
        cdef int rc = core.aufs_io_open(&self.queue, max_pending, max_pending_bytes)
        if rc < 0:
            self.queue = NULL
            raise _os_error(-rc, None)

    def __dealloc__(self):
        if self.queue != NULL:
            with nogil:
                core.aufs_io_close(self.queue, NULL, 0)
            self.queue = NULL

    cdef _submit(self, core.aufs_io_request *request):
        cdef int rc
        cdef char name[512]
        if self.queue == NULL:
            raise ValueError("the I/O queue is closed")
        with nogil:
            rc = core.aufs_io_submit(self.queue, request)
        if rc < 0:
            core.aufs_io_error(self.queue, name, sizeof(name))
            raise _io_error(-rc, name)

    def write(self, int out_fd, bytes data, int fd=-1, uint64_t copy_size=0, size_t padding=0,
              str name=""):
        """Write data to out_fd, then copy_size bytes of fd and padding zeros; close fd."""
        cdef core.aufs_io_request request
        cdef bytes encoded = os.fsencode(name)
        memset(&request, 0, sizeof(request))
        request.fd = fd
        request.out_fd = out_fd
        request.bytes = data
        request.bytes_size = len(data)
        request.copy_size = copy_size
        request.padding = padding
        request.close_fd = fd >= 0
        request.name = encoded
        self._submit(&request)

    def close(self):
        """Waits for every job; raises the first failure as OSError naming its entry."""
        cdef int rc
        cdef char name[512]
        if self.queue == NULL:
            return
        with nogil:
            rc = core.aufs_io_close(self.queue, name, sizeof(name))
        self.queue = NULL
        if rc < 0:
            raise _io_error(-rc, name)


cdef core.aufs_id_range *_id_ranges(object ranges, size_t *count) except? NULL:
    """A C copy of (container_id, host_id, size) triples; the caller frees it."""
    cdef list triples = [tuple(triple) for triple in ranges]
    count[0] = len(triples)
    if not triples:
        return NULL
    cdef core.aufs_id_range *copy = <core.aufs_id_range *>PyMem_Malloc(
        len(triples) * sizeof(core.aufs_id_range))
    if copy == NULL:
        raise MemoryError()
    for index, (container_id, host_id, size) in enumerate(triples):
        copy[index].container_id = container_id
        copy[index].host_id = host_id
        copy[index].size = size
    return copy


def tar_tree(int root_fd, int out_fd, bint convert_whiteouts, bint skip_aufs_metadata,
             size_t open_levels, uid_ranges=(), gid_ranges=()):
    """The tar of the tree below root_fd, written to out_fd. See aufs/_fallback.py."""
    cdef core.aufs_tar_tree_options options
    cdef core.aufs_tar_tree_failure failure
    cdef int rc
    memset(&options, 0, sizeof(options))
    options.convert_whiteouts = convert_whiteouts
    options.skip_aufs_metadata = skip_aufs_metadata
    options.open_levels = open_levels
    try:
        options.uids = _id_ranges(uid_ranges, &options.uid_count)
        options.gids = _id_ranges(gid_ranges, &options.gid_count)
        with nogil:
            rc = core.aufs_tar_tree(root_fd, out_fd, &options, &failure)
    finally:
        PyMem_Free(<void *>options.uids)
        PyMem_Free(<void *>options.gids)
    if rc == 0:
        return None
    name = os.fsdecode(<bytes>failure.name)
    if failure.kind == core.AUFS_TAR_TREE_UNMAPPED_UID or \
            failure.kind == core.AUFS_TAR_TREE_UNMAPPED_GID:
        raise DiffError(f"entry {name!r}: host id {failure.id} is not mapped to any "
                        "container id")
    error = OSError(-rc, os.strerror(-rc), name)
    if failure.kind == core.AUFS_TAR_TREE_WRITE:
        return error
    raise error


cdef object _io_error(int error, const char *name):
    return OSError(error, os.strerror(error), os.fsdecode(<bytes>name))


def fs_magic(path):
    """statfs(2) f_type of the filesystem holding path."""
    cdef bytes path_bytes = _encode(path, "path")
    cdef const char *path_c = path_bytes
    cdef uint32_t magic = 0
    cdef int rc
    with nogil:
        rc = core.aufs_fs_magic(path_c, &magic)
    if rc < 0:
        raise _os_error(-rc, path)
    return magic


def mounted(magic, path):
    """Docker's rule: True when path's filesystem has this f_type; a missing path is False."""
    cdef bytes path_bytes = _encode(path, "path")
    cdef const char *path_c = path_bytes
    cdef uint32_t found = 0
    cdef uint32_t wanted = magic
    cdef int rc
    with nogil:
        rc = core.aufs_fs_magic(path_c, &found)
    if rc == -ENOENT:
        return False
    if rc < 0:
        raise _os_error(-rc, path)
    return found == wanted


def is_mountpoint(path):
    """True when path is the root of a mount (statx STATX_ATTR_MOUNT_ROOT)."""
    cdef bytes path_bytes = _encode(path, "path")
    cdef const char *path_c = path_bytes
    cdef int rc
    with nogil:
        rc = core.aufs_is_mountpoint(path_c)
    if rc < 0:
        raise _os_error(-rc, path)
    return rc == 1


def directory_size(path, *, threads=0):
    """Apparent bytes under path, Docker's directory.Size rules, walked on all cores."""
    cdef bytes path_bytes = _encode(path, "path")
    cdef const char *path_c = path_bytes
    cdef unsigned int worker_count = threads
    cdef uint64_t size = 0
    cdef char error_path[ERROR_PATH_SIZE]
    cdef int rc
    with nogil:
        rc = core.aufs_directory_size(path_c, worker_count, &size, error_path,
                                      ERROR_PATH_SIZE)
    if rc < 0:
        raise _os_error(-rc, os.fsdecode(<bytes>error_path) if error_path[0] else path)
    return size


# ---- tar-split's JSON lines ----------------------------------------------------------------

cdef const char *BASE64_DIGITS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
cdef const char *HEX_DIGITS = b"0123456789abcdef"


cdef struct LineBuffer:
    char *data
    size_t used


cdef inline void put(LineBuffer *out, const char *text, size_t size) noexcept nogil:
    memcpy(out.data + out.used, text, size)
    out.used += size


# the two digits of every 12 bits, in the order they are written: six bytes take four
# look-ups (most of a tar-split record is base64 of header blocks)
cdef char BASE64_PAIRS[4096][2]


cdef void build_base64_pairs() noexcept:
    cdef int value
    for value in range(4096):
        BASE64_PAIRS[value][0] = BASE64_DIGITS[value >> 6]
        BASE64_PAIRS[value][1] = BASE64_DIGITS[value & 63]


build_base64_pairs()


cdef void put_base64(LineBuffer *out, const unsigned char *data, size_t size) noexcept nogil:
    cdef char *target = out.data + out.used
    cdef size_t index = 0
    cdef uint32_t word
    cdef uint64_t six
    while index + 6 <= size:
        six = ((<uint64_t>data[index] << 40) | (<uint64_t>data[index + 1] << 32)
               | (<uint64_t>data[index + 2] << 24) | (<uint64_t>data[index + 3] << 16)
               | (<uint64_t>data[index + 4] << 8) | data[index + 5])
        memcpy(target, BASE64_PAIRS[six >> 36], 2)
        memcpy(target + 2, BASE64_PAIRS[(six >> 24) & 4095], 2)
        memcpy(target + 4, BASE64_PAIRS[(six >> 12) & 4095], 2)
        memcpy(target + 6, BASE64_PAIRS[six & 4095], 2)
        target += 8
        index += 6
    while index + 3 <= size:
        word = (<uint32_t>data[index] << 16) | (<uint32_t>data[index + 1] << 8) | data[index + 2]
        target[0] = BASE64_DIGITS[word >> 18]
        target[1] = BASE64_DIGITS[(word >> 12) & 63]
        target[2] = BASE64_DIGITS[(word >> 6) & 63]
        target[3] = BASE64_DIGITS[word & 63]
        target += 4
        index += 3
    if size - index == 1:
        word = <uint32_t>data[index] << 16
        target[0] = BASE64_DIGITS[word >> 18]
        target[1] = BASE64_DIGITS[(word >> 12) & 63]
        target[2] = b"="
        target[3] = b"="
        target += 4
    elif size - index == 2:
        word = (<uint32_t>data[index] << 16) | (<uint32_t>data[index + 1] << 8)
        target[0] = BASE64_DIGITS[word >> 18]
        target[1] = BASE64_DIGITS[(word >> 12) & 63]
        target[2] = BASE64_DIGITS[(word >> 6) & 63]
        target[3] = b"="
        target += 4
    out.used = target - out.data


cdef void put_decimal(LineBuffer *out, uint64_t value) noexcept nogil:
    cdef char digits[24]
    cdef int count = 0
    while True:
        digits[23 - count] = <char>(48 + value % 10)
        count += 1
        value //= 10
        if not value:
            break
    put(out, &digits[24 - count], count)


cdef void put_ascii_json(LineBuffer *out, const unsigned char *text, size_t size) noexcept nogil:
    """As json.encoder.encode_basestring_ascii does for an ASCII string (6 bytes at most
    each)."""
    cdef char *target = out.data + out.used
    cdef unsigned char byte
    cdef size_t index
    target[0] = b'"'
    target += 1
    for index in range(size):
        byte = text[index]
        if byte >= 32 and byte <= 126 and byte != 92 and byte != 34:
            target[0] = <char>byte
            target += 1
            continue
        target[0] = b"\\"
        if byte == 34 or byte == 92:
            target[1] = <char>byte
        elif byte == 10:
            target[1] = b"n"
        elif byte == 13:
            target[1] = b"r"
        elif byte == 9:
            target[1] = b"t"
        elif byte == 8:
            target[1] = b"b"
        elif byte == 12:
            target[1] = b"f"
        else:
            target[1] = b"u"
            target[2] = b"0"
            target[3] = b"0"
            target[4] = HEX_DIGITS[byte >> 4]
            target[5] = HEX_DIGITS[byte & 15]
            target += 4
        target += 2
    target[0] = b'"'
    out.used = target + 1 - out.data


cdef struct LineItem:
    int kind  # 1: a file, 2: a segment, 0: a line already built
    const char *text  # the ASCII name, the raw bytes, or the line
    size_t length
    uint64_t size
    uint64_t crc


cdef void write_lines(LineBuffer *out, const LineItem *entries, Py_ssize_t count,
                      uint64_t number) noexcept nogil:
    """The lines of entries numbered from number, into out (which has room for them)."""
    cdef const LineItem *entry
    cdef unsigned char crc_bytes[8]
    cdef int shift
    cdef Py_ssize_t index
    for index in range(count):
        entry = &entries[index]
        if entry.kind == 0:
            put(out, entry.text, entry.length)
            number += 1
            continue
        if entry.kind == 1:
            put(out, b'{"type":1,"name":', 17)
            put_ascii_json(out, <const unsigned char *>entry.text, entry.length)
            if entry.size:
                put(out, b',"size":', 8)
                put_decimal(out, entry.size)
                for shift in range(8):
                    crc_bytes[shift] = <unsigned char>(entry.crc >> (56 - 8 * shift))
                put(out, b',"payload":"', 12)
                put_base64(out, crc_bytes, 8)
                put(out, b'","position":', 13)
            else:
                put(out, b',"payload":null,"position":', 27)
        else:
            put(out, b'{"type":2,"payload":"', 21)
            put_base64(out, <const unsigned char *>entry.text, entry.length)
            put(out, b'","position":', 13)
        put_decimal(out, number)
        put(out, b"}\n", 2)
        number += 1


cdef size_t line_bound(const LineItem *entry) noexcept nogil:
    """The most bytes entry's line can take."""
    if entry.kind == 0:
        return entry.length
    if entry.kind == 1:
        return 6 * entry.length + 120
    return (entry.length + 2) // 3 * 4 + 60


def tarsplit_lines(items, Py_ssize_t position):
    """Docker's tar-split JSON lines for a run of entries numbered from position (see
    aufs/_fallback.py, the spec): items is a list, read with the GIL, or a batch that
    TarSplitCollector.take() packed, read without it; the lines are written without it. A name
    that is not ASCII goes by the spec."""
    if type(items) is TarSplitBatch:
        return batch_lines(<TarSplitBatch>items, position)
    cdef Py_ssize_t count = len(items), index = 0
    cdef LineItem *entries = <LineItem *>PyMem_Malloc(max(count, 1) * sizeof(LineItem))
    cdef LineItem *entry
    cdef LineBuffer out
    cdef size_t bound = 0
    cdef Py_ssize_t length
    cdef const unsigned char[::1] raw
    cdef uint64_t number = <uint64_t>position
    cdef list keep = []  # what the pointers point into, beyond the items themselves
    if entries == NULL:
        raise MemoryError()
    out.data = NULL
    out.used = 0
    try:
        for item in items:
            entry = &entries[index]
            index += 1
            if type(item) is tuple:
                name = (<tuple>item)[0]
                if type(name) is not str or not PyUnicode_IS_ASCII(name):
                    line = _tarsplit_lines_spec([item], position + index - 1)
                    keep.append(line)
                    entry.kind = 0
                    entry.text = PyBytes_AS_STRING(line)
                    entry.length = PyBytes_GET_SIZE(line)
                    bound += line_bound(entry)
                    continue
                entry.kind = 1
                entry.text = PyUnicode_AsUTF8AndSize(name, &length)
                entry.length = length
                entry.size = (<tuple>item)[1]
                entry.crc = (<tuple>item)[2]
                bound += line_bound(entry)
            else:
                if type(item) is not bytes:
                    raw = item
                    item = bytes(raw)
                    keep.append(item)
                entry.kind = 2
                entry.text = PyBytes_AS_STRING(item)
                entry.length = PyBytes_GET_SIZE(item)
                bound += line_bound(entry)
        out.data = <char *>PyMem_Malloc(max(bound, 1))
        if out.data == NULL:
            raise MemoryError()
        with nogil:
            write_lines(&out, entries, count, number)
        return PyBytes_FromStringAndSize(out.data, out.used) if out.used else b""
    finally:
        PyMem_Free(out.data)
        PyMem_Free(entries)


# ---- tar-split's collector -----------------------------------------------------------------

cdef Py_ssize_t TARSPLIT_BATCH_ITEMS = _BATCH_ITEMS
cdef Py_ssize_t NAMES_AT_ONCE = 512
cdef Py_ssize_t TARSPLIT_BATCH_BYTES = _BATCH_BYTES
# a batch whose files hold this much data to read back goes at once: what the compressing
# thread still has to read when the archive ends, and finish() waits for, stays small
cdef Py_ssize_t TARSPLIT_BATCH_FD_BYTES = 8 << 20
# a bigger file is summed as it is written (a piece at a time, while in the cache): read back
# at the end of a layer (a 50 MB apt list ends Debian's), it would keep finish() waiting
cdef Py_ssize_t DEFER_CRC_MAX = 4 << 20

# A packed batch: its entries one after the other, each a kind byte (as LineItem's), then
# for a segment or a line already built its length (8 bytes) and bytes, for a file its size,
# CRC and name length (8 bytes each) and its ASCII name. A file whose CRC is still to be read
# back from its open fd (csrc/crcfd.c) is kind FILE_WITH_FD, with the fd where the CRC goes:
# formatting the batch reads it and makes it a plain file entry; freeing the batch closes any
# fd left (discard_packed).
cdef enum:
    FILE_WITH_FD = 3
    CRC_SCRATCH = 64 << 10  # read back in L2-sized pieces: checksummed while in the cache


cdef class TarSplitBatch:
    """Entries a collector took, packed (no object per entry): what tarsplit_lines takes."""

    cdef char *data  # owned: the collector's buffer, handed over as it was
    cdef size_t size
    cdef readonly Py_ssize_t count

    def __cinit__(self):
        self.data = NULL
        self.size = 0
        self.count = 0

    def __dealloc__(self):
        discard_packed(self.data, self.size, self.count)

    def __len__(self):
        return self.count


cdef inline uint64_t get_word(const char *data) noexcept nogil:
    cdef uint64_t word
    memcpy(&word, data, 8)
    return word


cdef size_t entry_size(const char *data, size_t offset, size_t size) noexcept nogil:
    """The packed size of the entry at offset, or 0 when it does not fit in size."""
    cdef size_t head
    if offset + 9 > size:
        return 0
    head = 25 if data[offset] == 1 or data[offset] == FILE_WITH_FD else 9
    if offset + head > size or get_word(data + offset + head - 8) > size - offset - head:
        return 0
    return head + get_word(data + offset + head - 8)


cdef int resolve_fds(char *data, size_t size, size_t count, bint read_back) noexcept nogil:
    """Closes the fd of each FILE_WITH_FD entry and makes it a plain file entry; with
    read_back, its CRC-64 is read from the fd first: 0, or the first errno (every fd is
    closed all the same)."""
    cdef size_t offset = 0, step, index
    cdef unsigned char *scratch = NULL
    cdef uint64_t crc
    cdef int rc, first = 0
    for index in range(count):
        step = entry_size(data, offset, size)
        if step == 0:
            break
        if data[offset] == FILE_WITH_FD:
            crc = 0
            if read_back and scratch == NULL:
                scratch = <unsigned char *>PyMem_RawMalloc(CRC_SCRATCH)
            if read_back and scratch != NULL:
                rc = core.aufs_crc_fd_read(<int>get_word(data + offset + 9),
                                           get_word(data + offset + 1), &crc, scratch,
                                           CRC_SCRATCH)
            else:
                core.aufs_crc_fd_release(<int>get_word(data + offset + 9))
                rc = ENOMEM if read_back else 0
            memcpy(data + offset + 9, &crc, 8)
            data[offset] = 1
            if rc and not first:
                first = rc
        offset += step
    PyMem_RawFree(scratch)
    return first


cdef void discard_packed(char *data, size_t size, size_t count) noexcept nogil:
    """Frees a packed batch, closing the fds it still holds."""
    if data != NULL:
        resolve_fds(data, size, count, False)
    PyMem_RawFree(data)


cdef int unpack(const char *data, size_t size, LineItem *entries, Py_ssize_t count,
                size_t *bound) noexcept nogil:
    """The LineItems of a packed batch (pointing into it); -1 if it does not hold count."""
    cdef size_t offset = 0
    cdef Py_ssize_t index
    cdef LineItem *entry
    bound[0] = 0
    for index in range(count):
        entry = &entries[index]
        if offset + 9 > size:
            return -1
        entry.kind = data[offset]
        if entry.kind == 1:
            if offset + 25 > size:
                return -1
            entry.size = get_word(data + offset + 1)
            entry.crc = get_word(data + offset + 9)
            entry.length = get_word(data + offset + 17)
            offset += 25
        else:
            entry.length = get_word(data + offset + 1)
            offset += 9
        if entry.length > size - offset:
            return -1
        entry.text = data + offset
        offset += entry.length
        bound[0] += line_bound(entry)
    return 0 if offset == size else -1


cdef int format_packed(char *packed, size_t size, size_t count, uint64_t position,
                       char **lines, size_t *length) noexcept nogil:
    """A packed batch's lines, without the GIL (batch_lines', and GzipLines' thread's), once
    the CRCs still to be read back are: 0, or EINVAL when the batch does not hold its entries,
    or the errno of reading a file back, or ENOMEM."""
    cdef LineItem *entries
    cdef LineBuffer out
    cdef size_t bound = 0
    cdef int rc = resolve_fds(packed, size, count, True)
    lines[0] = NULL
    length[0] = 0
    if rc:
        return rc
    entries = <LineItem *>PyMem_RawMalloc(max(count, 1) * sizeof(LineItem))
    if entries == NULL:
        return ENOMEM
    if unpack(packed, size, entries, count, &bound) < 0:
        PyMem_RawFree(entries)
        return EINVAL
    out.data = <char *>PyMem_RawMalloc(max(bound, 1))
    out.used = 0
    if out.data == NULL:
        PyMem_RawFree(entries)
        return ENOMEM
    write_lines(&out, entries, count, position)
    PyMem_RawFree(entries)
    lines[0] = out.data
    length[0] = out.used
    return 0


cdef bytes batch_lines(TarSplitBatch batch, Py_ssize_t position):
    cdef char *lines = NULL
    cdef size_t length = 0
    cdef int rc
    with nogil:
        rc = format_packed(batch.data, batch.size, batch.count, <uint64_t>position, &lines,
                           &length)
    try:
        if rc == EINVAL:
            raise ValueError("a tar-split batch that does not hold its entries")
        if rc == ENOMEM:
            raise MemoryError()
        if rc:
            raise OSError(rc, "tar-split: reading a file's CRC back: " + os.strerror(rc))
        return PyBytes_FromStringAndSize(lines, length) if length else b""
    finally:
        PyMem_RawFree(lines)


def tarsplit_fd_cap(cap=None):
    """How many files the process may hold open for their CRC to be read back (see
    csrc/crcfd.c); with cap, sets it (a negative one: the default again) and returns the
    one before."""
    if cap is None:
        return core.aufs_crc_fd_limit()
    return core.aufs_crc_fd_set_limit(cap)


def tarsplit_fds_held():
    """How many files are open now for their CRC to be read back."""
    return core.aufs_crc_fd_held()


cdef void release_raw(void *memory) noexcept nogil:
    PyMem_RawFree(memory)


cdef class GzipLines:
    """Tar-split's gzip file, made from the batches a TarSplitCollector takes on a C thread
    that never takes the GIL (see csrc/gzlines.c): add() each batch, then finish(). Raises
    OSError(ENOSYS) when this system has no libz.so.1 to deflate with."""

    cdef core.aufs_gz_lines *gz

    def __cinit__(self, int level=1):
        self.gz = core.aufs_gz_lines_start(format_packed, discard_packed, release_raw,
                                           level)
        if self.gz == NULL:
            raise OSError(errno, "tar-split's compressing thread: " + os.strerror(errno))

    def __dealloc__(self):
        self.close()

    def add(self, TarSplitBatch batch, Py_ssize_t position):
        """Hands the batch's entries, numbered from position, to the thread (batch is left
        empty)."""
        cdef int rc
        if self.gz == NULL:
            raise ValueError("GzipLines: already finished")
        rc = core.aufs_gz_lines_add(self.gz, batch.data, batch.size, batch.count, position)
        batch.data = NULL
        batch.size = 0
        batch.count = 0
        if rc:
            raise OSError(rc, "tar-split's compressing thread: " + os.strerror(rc))

    def finish(self):
        """The gzip file, once the thread has compressed every batch."""
        cdef unsigned char *out = NULL
        cdef size_t size = 0
        cdef int rc
        if self.gz == NULL:
            raise ValueError("GzipLines: already finished")
        with nogil:
            rc = core.aufs_gz_lines_finish(self.gz, &out, &size)
        self.gz = NULL
        if rc:
            raise OSError(rc, "tar-split's compressing thread: " + os.strerror(rc))
        try:
            return PyBytes_FromStringAndSize(<const char *>out, size)
        finally:
            free(out)

    def close(self):
        """Stops the thread and drops what it had (finish does not need it)."""
        if self.gz != NULL:
            with nogil:
                core.aufs_gz_lines_drop(self.gz)
            self.gz = NULL


cdef int grow(char **buffer, Py_ssize_t *capacity, Py_ssize_t needed,
              Py_ssize_t smallest) except -1:
    """Makes buffer hold at least needed bytes: doubled, and never below smallest."""
    cdef Py_ssize_t wanted
    cdef char *grown
    if needed <= capacity[0]:
        return 0
    wanted = max(2 * capacity[0], needed, smallest)
    grown = <char *>PyMem_RawRealloc(buffer[0], wanted)  # raw: freed without the GIL too
    if grown == NULL:
        raise MemoryError()
    buffer[0] = grown
    capacity[0] = wanted
    return 0


cdef inline void acquire(object data, Py_buffer *view) except *:
    PyObject_GetBuffer(data, view, PyBUF_SIMPLE)


cdef class TarSplitCollector:
    """What a tar-split recorder keeps of an archive while a TarReader reads it (see
    aufs/_fallback.py, the spec): the same entries, errors and `unusable`, with the work per
    member in C. A member's data only feeds the CRC (without the GIL for big pieces); each
    entry is packed into one buffer, which take() hands over as a TarSplitBatch: no object per
    entry to make here, or to read and free (with the GIL) on the thread that formats them."""

    cdef readonly Py_ssize_t max_entry_bytes, max_total_bytes, raw_bytes
    cdef public object hash_update
    cdef object reason  # why the archive cannot be replayed, once known
    cdef Py_ssize_t reason_at  # the position of the entry that made it so
    cdef readonly Py_ssize_t position  # of the first entry not taken yet
    cdef Py_ssize_t count  # entries packed since the last take
    cdef Py_ssize_t handed_raw
    cdef char *packed  # handed over whole by take(), which starts a new one
    cdef Py_ssize_t packed_size, packed_capacity, last_capacity
    cdef char *pending  # the segment being gathered, when the reader hands it in pieces
    cdef Py_ssize_t pending_size, pending_capacity
    cdef object file_name  # None outside a member's data
    cdef Py_ssize_t file_size
    cdef uint64_t crc
    cdef bint crc_deferred  # the member's CRC is read back from file_fd: its data is not summed
    cdef bint summed  # some of the member's data went into crc
    cdef int file_fd  # the member's open file, once handed over; else -1
    cdef Py_ssize_t batch_fds  # FILE_WITH_FD entries packed since the last take
    cdef Py_ssize_t batch_fd_bytes  # and the data they have to read back
    cdef core.aufs_name_set names  # each member's name.strip("/").removeprefix("./")
    # the names not added to it yet: fingerprint, position and name of each
    cdef uint64_t *fingerprints
    cdef Py_ssize_t *fingerprint_positions
    cdef Py_ssize_t fingerprint_count
    cdef list fingerprint_names

    def __cinit__(self, *arguments, **keywords):
        cdef bytes key = os.urandom(16)
        self.packed = NULL
        self.pending = NULL
        self.fingerprints = <uint64_t *>PyMem_Malloc(NAMES_AT_ONCE * sizeof(uint64_t))
        self.fingerprint_positions = <Py_ssize_t *>PyMem_Malloc(
            NAMES_AT_ONCE * sizeof(Py_ssize_t))
        if self.fingerprints == NULL or self.fingerprint_positions == NULL:
            raise MemoryError()
        self.fingerprint_names = []
        self.file_fd = -1
        core.aufs_crc_fd_refresh()  # the fds the process may hold for CRCs, as things are now
        memset(&self.names, 0, sizeof(self.names))
        memcpy(self.names.key, PyBytes_AS_STRING(key), 16)

    def __init__(self, Py_ssize_t max_entry_bytes, Py_ssize_t max_total_bytes,
                 hash_update=None):
        self.max_entry_bytes = max_entry_bytes
        self.max_total_bytes = max_total_bytes
        self.hash_update = hash_update

    def __dealloc__(self):
        discard_packed(self.packed, self.packed_size, self.count)
        self.drop_file_fd()
        PyMem_RawFree(self.pending)
        PyMem_Free(self.fingerprints)
        PyMem_Free(self.fingerprint_positions)
        core.aufs_name_set_free(&self.names)

    @property
    def unusable(self):
        """Why the archive cannot be replayed (as the spec says it), or None."""
        self.add_names()
        return self.reason

    cdef void make_unusable(self, str reason, Py_ssize_t at):
        """The reason of the earliest entry wins, whatever order they are found in."""
        if self.reason is None or at < self.reason_at:
            self.reason = reason
            self.reason_at = at

    cdef int note_name(self, str name) except -1:
        """The name's key goes into the set later, with others: see add_names."""
        cdef int kind = PyUnicode_KIND(name)
        cdef const char *data = <const char *>PyUnicode_DATA(name)
        cdef Py_ssize_t start = 0, end = PyUnicode_GET_LENGTH(name)
        while start < end and PyUnicode_READ(kind, data, start) == 47:  # "/"
            start += 1
        while end > start and PyUnicode_READ(kind, data, end - 1) == 47:
            end -= 1
        if (end - start >= 2 and PyUnicode_READ(kind, data, start) == 46  # "."
                and PyUnicode_READ(kind, data, start + 1) == 47):
            start += 2
        self.fingerprints[self.fingerprint_count] = core.aufs_name_fingerprint(
            &self.names, data + start * kind, (end - start) * kind)
        self.fingerprint_positions[self.fingerprint_count] = self.position + self.count
        self.fingerprint_names.append(name)
        self.fingerprint_count += 1
        if self.fingerprint_count == NAMES_AT_ONCE:
            self.add_names()
        return 0

    cdef int add_names(self) except -1:
        """Adds the noted names to the set, a run at a time (their cache misses overlap):
        a name that was there makes the archive unusable."""
        cdef ssize_t seen
        if not self.fingerprint_count:
            return 0
        seen = core.aufs_name_set_add(&self.names, self.fingerprints, self.fingerprint_count)
        if seen < -1:
            raise MemoryError()
        if seen >= 0:
            name = self.fingerprint_names[seen]
            self.make_unusable(f"{name!r} is in the archive twice",
                               self.fingerprint_positions[seen])
        self.fingerprint_count = 0
        del self.fingerprint_names[:]
        return 0

    cdef int keep(self, Py_ssize_t size) except -1:
        """The caps, checked before size more raw bytes are kept."""
        if self.pending_size + size > self.max_entry_bytes:
            raise DiffError(f"tar-split: more than {self.max_entry_bytes} bytes of headers and "
                            "padding in one place (after entry "
                            f"#{self.position + self.count}); refusing to record them")
        self.raw_bytes += size
        if self.raw_bytes > self.max_total_bytes:
            raise DiffError(f"tar-split: more than {self.max_total_bytes} bytes of headers and "
                            "padding in the archive; refusing to record them")
        return 0

    cdef char *reserve(self, Py_ssize_t size) except NULL:
        """Room for size more packed bytes; the caller fills them."""
        cdef char *target
        grow(&self.packed, &self.packed_capacity, self.packed_size + size,
             max(self.last_capacity, 1 << 16))
        target = self.packed + self.packed_size
        self.packed_size += size
        return target

    cdef int pack_bytes(self, char kind, const char *data, Py_ssize_t size) except -1:
        """A segment (kind 2) or a line already built (kind 0)."""
        cdef char *target = self.reserve(9 + size)
        cdef uint64_t length = size
        target[0] = kind
        memcpy(target + 1, &length, 8)
        memcpy(target + 9, data, size)
        self.count += 1
        return 0

    cdef void drop_file_fd(self) noexcept:
        if self.crc_deferred:  # the place reserved for it, or it
            core.aufs_crc_fd_release(self.file_fd)
        self.crc_deferred = False
        self.file_fd = -1

    cdef int pack_file(self) except -1:
        cdef uint64_t words[3]
        cdef char *target
        cdef bytes line
        cdef int rc
        cdef unsigned char scratch[4096]
        if self.crc_deferred and self.file_fd < 0:  # its data went unsummed, and no fd came
            self.drop_file_fd()
            raise DiffError(f"tar-split: no CRC for {self.file_name!r}: its file was not "
                            "handed over (take_fd)")
        if self.crc_deferred and not PyUnicode_IS_ASCII(self.file_name):  # rare: read it here
            self.crc_deferred = False
            with nogil:
                rc = core.aufs_crc_fd_read(self.file_fd, self.file_size, &self.crc, scratch,
                                           sizeof(scratch))
            self.file_fd = -1
            if rc:
                raise OSError(rc, f"tar-split: reading {self.file_name!r} back: "
                              + os.strerror(rc))
        if not PyUnicode_IS_ASCII(self.file_name):
            line = _tarsplit_lines_spec([(self.file_name, self.file_size, self.crc)],
                                        self.position + self.count)
            return self.pack_bytes(0, PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line))
        words[0] = self.file_size
        words[1] = <uint64_t>self.file_fd if self.crc_deferred else self.crc
        words[2] = PyUnicode_GET_LENGTH(self.file_name)
        target = self.reserve(25 + words[2])
        target[0] = FILE_WITH_FD if self.crc_deferred else 1
        if self.crc_deferred:  # the batch has it now
            self.crc_deferred = False
            self.file_fd = -1
            self.batch_fds += 1
            self.batch_fd_bytes += self.file_size
        memcpy(target + 1, words, 24)
        memcpy(target + 25, PyUnicode_DATA(self.file_name), words[2])
        self.count += 1
        return 0

    cdef int append_pending(self, const char *data, Py_ssize_t size) except -1:
        if size == 0:
            return 0
        grow(&self.pending, &self.pending_capacity, self.pending_size + size, 4096)
        memcpy(self.pending + self.pending_size, data, size)
        self.pending_size += size
        return 0

    cdef int consume_view(self, object piece, Py_buffer *view) except -1:
        if self.hash_update is not None:
            self.hash_update(piece)
        if self.file_name is not None:
            if self.crc_deferred:
                return 0
            self.summed = True
            if view.len >= 1 << 18:
                with nogil:
                    self.crc = core.aufs_crc64_iso(self.crc, <const unsigned char *>view.buf,
                                                   view.len)
            else:
                self.crc = core.aufs_crc64_iso(self.crc, <const unsigned char *>view.buf,
                                               view.len)
            return 0
        self.keep(view.len)
        return self.append_pending(<const char *>view.buf, view.len)

    def consume(self, piece):
        cdef Py_buffer view
        acquire(piece, &view)
        try:
            self.consume_view(piece, &view)
        finally:
            PyBuffer_Release(&view)

    def consume_trailing(self, piece):
        cdef Py_buffer view
        acquire(piece, &view)
        try:
            self.add_names()
            if self.reason is None and (
                    self.pending_size + view.len > self.max_entry_bytes
                    or self.raw_bytes + view.len > self.max_total_bytes):
                self.make_unusable(f"more than {self.max_entry_bytes} bytes after the end of "
                                   "the archive", self.position + self.count)
                self.pending_size = 0
            if self.reason is not None:
                if self.hash_update is not None:
                    self.hash_update(piece)
                return
            self.consume_view(piece, &view)
        finally:
            PyBuffer_Release(&view)

    def begin_file(self, str name, Py_ssize_t size, bint sparse, raw=b""):
        self.begin(name, size, sparse, raw)

    cdef int begin(self, str name, Py_ssize_t size, bint sparse, object raw) except -1:
        cdef Py_buffer view
        if self.file_name is not None:
            self.end_file()
        acquire(raw, &view)
        try:
            if view.len and not self.pending_size:  # the common case: headers, one copy
                if self.hash_update is not None:
                    self.hash_update(raw)
                self.keep(view.len)
                self.pack_bytes(2, <const char *>view.buf, view.len)
            elif view.len or self.pending_size:
                self.consume_view(raw, &view)
                self.pack_bytes(2, self.pending, self.pending_size)
                self.pending_size = 0
        finally:
            PyBuffer_Release(&view)
        if sparse:
            self.make_unusable(f"{name!r} is a sparse file", self.position + self.count)
        self.note_name(name)
        self.file_name = name
        self.file_size = size
        self.crc = 0
        self.summed = False
        return 0

    def defer_crc(self):
        """Whether the current member's CRC-64 may be read back later from its file (given
        to take_fd once written, still open and readable, O_NOATIME) instead of summed from
        its data here: False for a file over 4 MiB, or when the process holds as many such
        fds as it may."""
        if (self.file_name is None or self.crc_deferred or self.summed or not self.file_size
                or self.file_size > DEFER_CRC_MAX):
            return False
        self.crc_deferred = core.aufs_crc_fd_reserve() == 1
        return self.crc_deferred

    def abandon(self):
        """Closes the files held for their CRCs and forgets what was not taken: the
        recording is given up (an apply that failed)."""
        discard_packed(self.packed, self.packed_size, self.count)
        self.packed = NULL
        self.packed_size = self.packed_capacity = 0
        self.position += self.count
        self.count = self.batch_fds = self.batch_fd_bytes = 0
        self.drop_file_fd()
        self.make_unusable("the recording was abandoned", -1)

    def take_fd(self, int fd):
        """The current member's written file, after defer_crc() said True: the collector
        owns fd from now on (it is closed once its CRC is read back, or when dropped)."""
        if not self.crc_deferred or self.file_fd >= 0 or fd < 0:
            raise ValueError("take_fd: the current member's CRC was not deferred")
        self.file_fd = fd

    def end_file(self, data=b""):
        cdef Py_buffer view
        acquire(data, &view)
        try:
            if view.len:
                self.consume_view(data, &view)
        finally:
            PyBuffer_Release(&view)
        self.finish_member()

    cdef int finish_member(self) except -1:
        if self.file_name is None:
            return 0
        self.pack_file()
        self.file_name = None
        if (self.count >= TARSPLIT_BATCH_ITEMS
                or self.raw_bytes - self.handed_raw >= TARSPLIT_BATCH_BYTES
                or self.batch_fd_bytes >= TARSPLIT_BATCH_FD_BYTES
                or self.batch_fds * 2 >= core.aufs_crc_fd_limit() > 0):
            self.batch_ready()
        return 0

    cdef int add_member(self, str name, Py_ssize_t size, uint64_t crc, int *fd, object buffer,
                        const unsigned char *data, Py_ssize_t raw_start,
                        Py_ssize_t data_start) except -1:
        """begin_file(name, size, False, buffer[raw_start:data_start]) then end_file(the
        size bytes of data that follow), for a member whose data's CRC-64 is known already
        (unpack_run's, made while it wrote the file; data is the buffer's bytes), or is to be
        read back from fd[0] (which unpack_run reserved and left open; the collector takes
        it, and sets fd[0] to -1): no object made in the common case."""
        if self.hash_update is not None or self.file_name is not None or self.pending_size:
            self.begin(name, size, False, buffer[raw_start:data_start])
            if self.hash_update is not None and size:
                self.hash_update(buffer[data_start:data_start + size])
        else:  # begin()'s common case, from the buffer
            if data_start > raw_start:
                self.keep(data_start - raw_start)
                self.pack_bytes(2, <const char *>&data[raw_start], data_start - raw_start)
            self.note_name(name)
            self.file_name = name
            self.file_size = size
        self.crc = crc
        if fd[0] >= 0:
            self.crc_deferred = True
            self.file_fd = fd[0]
            fd[0] = -1
        return self.finish_member()

    def end_segment(self):
        self.end_file()
        if self.pending_size:
            self.pack_bytes(2, self.pending, self.pending_size)
            self.pending_size = 0

    def take(self):
        cdef TarSplitBatch batch = TarSplitBatch.__new__(TarSplitBatch)
        batch.data = self.packed
        batch.size = self.packed_size
        batch.count = self.count
        taken = batch, self.position
        self.position += self.count
        self.count = 0
        self.batch_fds = self.batch_fd_bytes = 0
        self.packed = NULL
        self.packed_size = 0
        self.last_capacity = max(self.last_capacity, self.packed_capacity)
        self.packed_capacity = 0
        self.handed_raw = self.raw_bytes
        return taken

    def batch_ready(self):
        pass
