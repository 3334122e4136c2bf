/*
 * The plain-C core of aufs: no Python.h, no printing, no aborting.
 *
 * Every function returns 0 (or a non-negative count) on success and -errno on failure, so it
 * can be called from C, from Cython under `nogil`, and unit-tested on its own.
 */
#ifndef AUFS_CORE_H
#define AUFS_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- mountdata.c: Docker's aufs mount-option builder -------------------------------------- */

/* Docker reserves this many bytes of each page for the options appended after the branches. */
#define AUFS_MOUNT_DATA_RESERVE 54
#define AUFS_DIRPERM1_RESERVE 9

/*
 * Writes the data string of the first mount(2): "br:<rw>=rw:<ro0>=ro+wh:...", clipped to the
 * page exactly as Docker clips it, then ",dio,xino=/dev/shm/aufs.xino", ",dirperm1" when asked,
 * and `,context="<label>"` when the label is not empty.
 *
 * `out` must hold at least `page_size` bytes; the result is NUL-terminated. On success returns
 * the string's length and stores in `*consumed` how many of `ro` it carries.
 * -EINVAL: a path holds ':', ',' or '=', the label holds '"', '\\' or a control character, or
 *          the label leaves no room in the page.
 * -ENAMETOOLONG: the rw branch alone does not fit in the page.
 */
ssize_t aufs_first_mount_data(char *out, size_t out_size, const char *rw,
                              const char *const *ro, size_t ro_count, const char *label,
                              int dirperm1, size_t page_size, size_t *consumed);

/*
 * Writes the data of one MS_REMOUNT: "append:<ro>=ro+wh," for as many of `ro` as fit, then the
 * label. Same contract as above; -ENAMETOOLONG when even one branch does not fit in a page
 * (Docker looped forever there).
 */
ssize_t aufs_remount_data(char *out, size_t out_size, const char *const *ro, size_t ro_count,
                          const char *label, int dirperm1, size_t page_size, size_t *consumed);

/* ---- syscalls.c: mount, unmount, statfs and the mount-root test ---------------------------- */

int aufs_mount(const char *source, const char *target, const char *fstype, unsigned long flags,
               const char *data);
int aufs_unmount(const char *target, int flags);
int aufs_fs_magic(const char *path, uint32_t *magic);
/* 1 when `path` is the root of a mount, 0 when it is not, -errno on error. Never follows a
 * final symlink. */
int aufs_is_mountpoint(const char *path);

/* One fsconfig(2) step of a mount built with the new mount API. A NULL value sets a flag. */
struct aufs_fs_param {
    const char *key;
    const char *value;
};

/*
 * Mounts `fstype` on `target` through fsopen/fsconfig/fsmount/move_mount. `attr_flags` are
 * MOUNT_ATTR_* flags. On failure, the kernel's own explanation (read from the fs context) is
 * copied into `message` when there is one. -ENOSYS when the kernel lacks the new mount API.
 */
int aufs_fsmount(const char *fstype, const char *source, const struct aufs_fs_param *params,
                 size_t param_count, unsigned int attr_flags, const char *target, char *message,
                 size_t message_size);

/* openat2(2) with the given RESOLVE_* flags: the fd, or -errno (-ENOSYS before Linux 5.6). */
int aufs_openat2(int dirfd, const char *path, int flags, unsigned int mode,
                 unsigned long long resolve);

/* renameat2(2); RENAME_EXCHANGE (2) swaps two paths atomically. */
int aufs_renameat2(int old_dirfd, const char *old_path, int new_dirfd, const char *new_path,
                   unsigned int flags);

/* ---- mountfrom.c: mount(2) with relative paths, resolved from a directory ---------------- */

/*
 * mount(2) with the relative paths in `data` (and `target`, if relative) resolved from
 * `directory`, as Docker's overlay2 mounts its short links. While the caller is the process's
 * only thread (by /proc/self/task's link count), its working directory moves there and back
 * around the call; else the call runs on a worker thread whose working directory is its own
 * (unshare CLONE_FS), started on first use and again in a forked child. Serialised within the
 * process; may be called without the GIL. 0 once mounted; -errno on failure, with `*failed`
 * naming the step (the mount is undone when the way back fails).
 */
#define AUFS_MOUNT_FROM_CHDIR 0
#define AUFS_MOUNT_FROM_MOUNT 1
#define AUFS_MOUNT_FROM_RETURN 2
#define AUFS_MOUNT_FROM_UNSHARE 3 /* no thread can have a working directory of its own */
#define AUFS_MOUNT_FROM_THREAD 4  /* the worker thread did not start */
int aufs_mount_from(const char *directory, const char *source, const char *target,
                    const char *fstype, unsigned long flags, const char *data, int *failed);

/* ---- ioqueue.c: ordered file I/O on a background thread ---------------------------------- */

/* One job: write `bytes` (to out_fd, or to fd when out_fd < 0), copy `copy_size` bytes of fd
 * to out_fd, write `padding` zeros, then set owner, mode and times of fd, then close it. */
struct aufs_io_request {
    int fd;
    int out_fd;
    const unsigned char *bytes;
    size_t bytes_size;
    uint64_t copy_size;
    size_t padding;
    int set_owner;
    uid_t uid;
    gid_t gid;
    int set_mode;
    mode_t mode;
    int set_times;
    int64_t atime_ns;
    int64_t mtime_ns;
    int close_fd;
    const char *name; /* reported with the first error */
};

struct aufs_io_queue;

/* Runs one job here and now (what the queue's thread does for each). */
int aufs_io_run(const struct aufs_io_request *request);
int aufs_io_open(struct aufs_io_queue **queue, size_t max_pending, size_t max_pending_bytes);
/* Copies the request and queues it; blocks while the queue is full. Returns -errno of an
 * earlier failure (the job is still queued, so its fd still gets closed). */
int aufs_io_submit(struct aufs_io_queue *queue, const struct aufs_io_request *request);
/* The first failure so far (0 if none), with its job's name. */
int aufs_io_error(struct aufs_io_queue *queue, char *name, size_t name_size);
/* Runs what is queued, stops the thread, frees the queue; returns the first failure. */
int aufs_io_close(struct aufs_io_queue *queue, char *name, size_t name_size);

/* ---- tarheader.c: one tar header block ---------------------------------------------------- */

struct aufs_tar_header {
    unsigned char name[256]; /* prefix "/" name, not NUL-terminated */
    size_t name_length;
    unsigned char linkname[100];
    size_t linkname_length;
    uint32_t mode;
    int64_t uid, gid, size, mtime;
    int64_t devmajor, devminor;
    char typeflag;
    int gnu; /* old GNU magic: the prefix field holds other things */
};

/* 0, -EBADMSG (checksum), -EINVAL or -ERANGE (a field): then ask the spec for the reason. */
int aufs_tar_parse_header(const unsigned char *block, struct aufs_tar_header *header);

/* ---- unpackrun.c: a run of plain members unpacked from a reader's buffer ------------------- */

/* Why a run stopped (DONE is one member examined and fit to create). */
#define AUFS_UNPACK_DONE 0
#define AUFS_UNPACK_FULL 1      /* the entries array is full: call again */
#define AUFS_UNPACK_NEED_DATA 2 /* the next member is not all in the buffer */
#define AUFS_UNPACK_PARENT 3    /* the next member is in another directory: `stop` names it */
#define AUFS_UNPACK_OTHER 4     /* the next member is for the Python path, untouched */
#define AUFS_UNPACK_ERROR 5     /* creating `stop` failed with `error` */

/* One member of a run: a plain file ('0'), symlink ('2') or directory ('5'). */
struct aufs_unpack_entry {
    size_t header_offset, data_offset; /* in the buffer */
    uint64_t size;
    size_t padding;
    unsigned char name[256]; /* as the archive spells it: prefix "/" name */
    size_t name_length;
    size_t directory_length; /* of name, up to and with its last slash (a directory's own
                                trailing slash left out); the base name follows */
    size_t base_length;
    unsigned char linkname[100];
    size_t linkname_length;
    char kind;
    uint32_t mode;
    int64_t uid, gid, mtime;
    uint64_t crc; /* of a file's data, when the run wants CRCs */
    int fd;       /* a file's, left open for its CRC to be read back (see crcfd.c); or -1 */
};


struct aufs_unpack_run {
    /* in */
    const unsigned char *buffer;
    size_t end;              /* bytes of the buffer that hold archive data */
    int parent_known;        /* 0: stop at once, with the first member's directory */
    int parent_fd;           /* the directory named prefix, where members are made */
    const unsigned char *prefix;
    size_t prefix_length;
    size_t max_file_size;    /* bigger files stop the run (the Python path streams them) */
    int want_crc;            /* the CRC-64 of each file's data, for tar-split */
    int defer_crc;           /* with want_crc: leave files open for their CRC to be read
                                back later instead, while crcfd.c's cap allows */
    struct aufs_unpack_entry *entries;
    size_t capacity;
    /* in and out: the end of the last member's data, and its padding still to skip */
    size_t position, padding;
    /* out */
    size_t count; /* members created, in entries[0..count) */
    int status;
    int error;    /* errno of AUFS_UNPACK_ERROR */
    struct aufs_unpack_entry stop; /* the member the run stopped at, as far as it was read */
};

/*
 * Creates the members from position + padding on, in the buffer, while each is a plain file
 * (data all in the buffer), symlink or directory in the directory `prefix`, owned and timed
 * as its header says (a directory's times are left to the caller). Returns the status.
 */
int aufs_unpack_members(struct aufs_unpack_run *run);

/* ---- crc64.c: tar-split's file checksum ----------------------------------------------------- */

/* Go's crc64.Update with the ISO table: pass 0 first, then the previous result. */
uint64_t aufs_crc64_iso(uint64_t crc, const unsigned char *data, size_t size);

/* ---- crcfd.c: a file's CRC-64 read back through its fd, on another thread -------------- */

/* 1: one more fd may be held for its CRC; 0: the cap is reached, checksum the data now. */
int aufs_crc_fd_reserve(void);
/* Closes a held fd (or, with -1, gives back a reservation that got no fd). */
void aufs_crc_fd_release(int fd);
/* The CRC-64 of the fd's first size bytes, then closes it (and gives back its place): 0, or an
 * errno value (EIO: the file is shorter; or what close reported). */
int aufs_crc_fd_read(int fd, uint64_t size, uint64_t *crc, unsigned char *scratch,
                     size_t scratch_size);
long aufs_crc_fd_limit(void);
/* Works the cap out again from RLIMIT_NOFILE and the fds open now (a recording starts),
 * unless it was set. */
void aufs_crc_fd_refresh(void);
/* Sets the cap (negative: back to the default); returns the one before. */
long aufs_crc_fd_set_limit(long cap);
long aufs_crc_fd_held(void);

/* ---- gzlines.c: tar-split's gzip, on a thread that never takes Python's lock -------------- */

/* Turns a packed batch of entries into their JSON lines (*lines, allocated so that the
 * release function given with it frees it): 0 or an errno value. */
typedef int (*aufs_lines_formatter)(char *packed, size_t size, size_t count,
                                    uint64_t position, char **lines, size_t *length);
/* Frees a packed batch, formatted or not (closing any fd it still holds). */
typedef void (*aufs_batch_discarder)(char *packed, size_t size, size_t count);
struct aufs_gz_lines;
/* A started thread, or NULL with errno (ENOSYS: no libz.so.1 here). */
struct aufs_gz_lines *aufs_gz_lines_start(aufs_lines_formatter format,
                                          aufs_batch_discarder discard,
                                          void (*release)(void *), int level);
/* Queues a batch (packed is the thread's from then on): the first error so far, or 0. */
int aufs_gz_lines_add(struct aufs_gz_lines *gz, char *packed, size_t size, size_t count,
                      uint64_t position);
/* Waits for every batch, ends the stream, and frees gz: *out (free() it) is the whole gzip
 * file; or an errno value. */
int aufs_gz_lines_finish(struct aufs_gz_lines *gz, unsigned char **out, size_t *size);
/* Stops the thread, drops what it had, and frees gz. */
void aufs_gz_lines_drop(struct aufs_gz_lines *gz);

/* ---- nameset.c: tar-split's set of names seen ------------------------------------------------ */

/* SipHash-1-3 of data under a 128-bit key. */
uint64_t aufs_siphash13(const uint64_t key[2], const void *data, size_t size);

/* Zeroed, with a random key, before the first add. */
struct aufs_name_set {
    uint64_t key[2];
    uint64_t *slots; /* fingerprints; 0 is an empty slot */
    size_t capacity; /* a power of two, or 0 */
    size_t count;
};

/* The name's fingerprint under the set's key (never 0). */
uint64_t aufs_name_fingerprint(const struct aufs_name_set *set, const void *name, size_t size);
/* Adds the fingerprints in order: the index of the first that was there already (added
 * before, or earlier in this call), -1 if none, or -ENOMEM (then none is added). */
ssize_t aufs_name_set_add(struct aufs_name_set *set, const uint64_t *fingerprints, size_t count);
void aufs_name_set_free(struct aufs_name_set *set);

/* ---- dirsize.c: the directory-size walker --------------------------------------------------- */

/*
 * Apparent size of everything under `root`, following Docker's directory.Size: directories and
 * empty files count nothing, symlinks are not followed and count their own size, each
 * (st_dev, st_ino) counts once, and entries that vanish during the walk are skipped.
 * `threads` workers share the walk (0: one per online CPU, at most 8).
 * On failure, the path that failed is copied into `error_path` when it is not NULL.
 */
int aufs_directory_size(const char *root, unsigned int threads, uint64_t *bytes,
                        char *error_path, size_t error_path_size);

/* ---- tartree.c: the tar of a directory tree ---------------------------------------------- */

/* Ids in [host_id, host_id + size) are container_id + (id - host_id) in the archive. */
struct aufs_id_range {
    uint32_t container_id, host_id, size;
};

struct aufs_tar_tree_options {
    int convert_whiteouts;  /* overlay's 0/0 devices and opaque xattrs become AUFS whiteouts */
    int skip_aufs_metadata; /* leave out the top-level .wh..wh.* but .wh..wh..opq */
    size_t open_levels;     /* directory fds kept open below the root */
    const struct aufs_id_range *uids; /* no ranges: the identity */
    size_t uid_count;
    const struct aufs_id_range *gids;
    size_t gid_count;
};

#define AUFS_TAR_TREE_READ 0         /* reading the tree failed */
#define AUFS_TAR_TREE_WRITE 1        /* writing the archive (or copying a file's data) failed */
#define AUFS_TAR_TREE_UNMAPPED_UID 2 /* -ERANGE: the owner `id` maps to no container id */
#define AUFS_TAR_TREE_UNMAPPED_GID 3

struct aufs_tar_tree_failure {
    int kind;
    uint64_t id;
    char name[4096]; /* the entry's name in the archive */
};

/*
 * Writes the tar of everything below `root_fd` (which stays open) to `out_fd`, as
 * aufs.archive.export.walk_tree does: same entries, same bytes. On failure, returns -errno and
 * fills `failure`.
 */
int aufs_tar_tree(int root_fd, int out_fd, const struct aufs_tar_tree_options *options,
                  struct aufs_tar_tree_failure *failure);

#ifdef __cplusplus
}
#endif

#endif /* AUFS_CORE_H */
