# cython: language_level=3
"""Declarations of the plain-C core in csrc/aufs_core.h, for aufs/_native.pyx only."""

from libc.stdint cimport int64_t, uint32_t, uint64_t


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
    enum:
        AUFS_MOUNT_FROM_CHDIR
        AUFS_MOUNT_FROM_MOUNT
        AUFS_MOUNT_FROM_RETURN
        AUFS_MOUNT_FROM_UNSHARE
        AUFS_MOUNT_FROM_THREAD
    int aufs_mount_from(const char *directory, const char *source, const char *target,
                        const char *fstype, unsigned long flags, const char *data, int *failed)
    int aufs_fs_magic(const char *path, uint32_t *magic)
    int aufs_is_mountpoint(const char *path)
    int aufs_fsmount(const char *fstype, const char *source, const aufs_fs_param *params,
                     size_t param_count, unsigned int attr_flags, const char *target,
                     char *message, size_t message_size)

    int aufs_openat2(int dirfd, const char *path, int flags, unsigned int mode,
                     unsigned long long resolve)
    int aufs_renameat2(int old_dirfd, const char *old_path, int new_dirfd,
                       const char *new_path, unsigned int flags)

    struct aufs_io_request:
        int fd
        int out_fd
        const unsigned char *bytes
        size_t bytes_size
        uint64_t copy_size
        size_t padding
        int set_owner
        unsigned int uid
        unsigned int gid
        int set_mode
        unsigned int mode
        int set_times
        int64_t atime_ns
        int64_t mtime_ns
        int close_fd
        const char *name

    struct aufs_io_queue:
        pass

    int aufs_io_run(const aufs_io_request *request)
    int aufs_io_open(aufs_io_queue **queue, size_t max_pending, size_t max_pending_bytes)
    int aufs_io_submit(aufs_io_queue *queue, const aufs_io_request *request)
    int aufs_io_error(aufs_io_queue *queue, char *name, size_t name_size)
    int aufs_io_close(aufs_io_queue *queue, char *name, size_t name_size)

    struct aufs_id_range:
        uint32_t container_id
        uint32_t host_id
        uint32_t size

    struct aufs_tar_tree_options:
        int convert_whiteouts
        int skip_aufs_metadata
        size_t open_levels
        const aufs_id_range *uids
        size_t uid_count
        const aufs_id_range *gids
        size_t gid_count

    enum:
        AUFS_TAR_TREE_READ
        AUFS_TAR_TREE_WRITE
        AUFS_TAR_TREE_UNMAPPED_UID
        AUFS_TAR_TREE_UNMAPPED_GID

    struct aufs_tar_tree_failure:
        int kind
        uint64_t id
        char name[4096]

    int aufs_tar_tree(int root_fd, int out_fd, const aufs_tar_tree_options *options,
                      aufs_tar_tree_failure *failure)

    struct aufs_tar_header:
        unsigned char name[256]
        size_t name_length
        unsigned char linkname[100]
        size_t linkname_length
        uint32_t mode
        int64_t uid
        int64_t gid
        int64_t size
        int64_t mtime
        int64_t devmajor
        int64_t devminor
        char typeflag
        int gnu

    int aufs_tar_parse_header(const unsigned char *block, aufs_tar_header *header)

    enum:
        AUFS_UNPACK_DONE
        AUFS_UNPACK_FULL
        AUFS_UNPACK_NEED_DATA
        AUFS_UNPACK_PARENT
        AUFS_UNPACK_OTHER
        AUFS_UNPACK_ERROR
    struct aufs_unpack_entry:
        size_t header_offset
        size_t data_offset
        uint64_t size
        size_t padding
        unsigned char name[256]
        size_t name_length
        size_t directory_length
        size_t base_length
        unsigned char linkname[100]
        size_t linkname_length
        char kind
        uint32_t mode
        int64_t uid
        int64_t gid
        int64_t mtime
        uint64_t crc
        int fd
    struct aufs_unpack_run:
        const unsigned char *buffer
        size_t end
        int parent_known
        int parent_fd
        const unsigned char *prefix
        size_t prefix_length
        size_t max_file_size
        int want_crc
        int defer_crc
        aufs_unpack_entry *entries
        size_t capacity
        size_t position
        size_t padding
        size_t count
        int status
        int error
        aufs_unpack_entry stop
    int aufs_unpack_members(aufs_unpack_run *run)

    uint64_t aufs_crc64_iso(uint64_t crc, const unsigned char *data, size_t size)

    int aufs_crc_fd_reserve()
    void aufs_crc_fd_release(int fd)
    int aufs_crc_fd_read(int fd, uint64_t size, uint64_t *crc, unsigned char *scratch,
                         size_t scratch_size)
    long aufs_crc_fd_limit()
    void aufs_crc_fd_refresh()
    long aufs_crc_fd_set_limit(long cap)
    long aufs_crc_fd_held()

    ctypedef int (*aufs_lines_formatter)(char *packed, size_t size, size_t count,
                                         uint64_t position, char **lines,
                                         size_t *length) noexcept nogil
    ctypedef void (*aufs_batch_discarder)(char *packed, size_t size,
                                          size_t count) noexcept nogil
    struct aufs_gz_lines:
        pass
    aufs_gz_lines *aufs_gz_lines_start(aufs_lines_formatter format,
                                       aufs_batch_discarder discard,
                                       void (*release)(void *) noexcept nogil, int level)
    int aufs_gz_lines_add(aufs_gz_lines *gz, char *packed, size_t size, size_t count,
                          uint64_t position)
    int aufs_gz_lines_finish(aufs_gz_lines *gz, unsigned char **out, size_t *size)
    void aufs_gz_lines_drop(aufs_gz_lines *gz)

    uint64_t aufs_siphash13(const uint64_t *key, const void *data, size_t size)
    struct aufs_name_set:
        uint64_t key[2]
        uint64_t *slots
        size_t capacity
        size_t count
    uint64_t aufs_name_fingerprint(const aufs_name_set *set, const void *name, size_t size)
    ssize_t aufs_name_set_add(aufs_name_set *set, const uint64_t *fingerprints, size_t count)
    void aufs_name_set_free(aufs_name_set *set)

    int aufs_directory_size(const char *root, unsigned int threads, uint64_t *bytes,
                            char *error_path, size_t error_path_size)
