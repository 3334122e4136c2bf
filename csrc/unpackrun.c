/*
 * A run of plain members unpacked straight from a tar reader's buffer, without Python.
 *
 * Most of a layer is plain files, symlinks and directories whose headers are one ustar or GNU
 * block each, listed directory by directory. The extractor (aufs/archive/extract.py) hands
 * their run here, with the fd of the directory they are in; anything else stops the run at
 * that member, untouched, and the Python path takes it: extension headers, hardlinks,
 * devices, whiteouts, a name in another directory, something already in the way (EEXIST), a
 * header that does not parse, data not all in the buffer. aufs/_fallback.py's unpack_run is
 * the spec.
 */
#define _GNU_SOURCE
#include "aufs_core.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLOCK 512
#define ID_LIMIT 0xffffffffLL         /* (uid_t)-1 means "no change" to chown */
#define TIME_LIMIT_SECONDS (1LL << 33) /* about 272 years either side of 1970 */

static int is_zero_block(const unsigned char *block)
{
    for (size_t i = 0; i < BLOCK; i++)
        if (block[i])
            return 0;
    return 1;
}

/* A base name the run may create: not empty, ".", "..", a whiteout or an aufs name. */
static int plain_base(const unsigned char *base, size_t length)
{
    if (length == 0 || length >= 256)
        return 0;
    if (base[0] == '.' && (length == 1 || (length == 2 && base[1] == '.')))
        return 0;
    if (length >= 4 && memcmp(base, ".wh.", 4) == 0)
        return 0;
    return memchr(base, '/', length) == NULL;
}

static void set_timespec(struct timespec *time, int64_t seconds)
{
    time->tv_sec = (time_t)seconds;
    time->tv_nsec = 0;
}

/* Creates one member in the run's directory: 0, or -errno (-EEXIST: something is there). A
 * file is left open in entry->fd, readable and O_NOATIME, when keep_open says so and the
 * filesystem lets us not touch its access time (it may not, on a file it gave another
 * owner: the file is closed then, as any other). */
static int create_member(const struct aufs_unpack_run *run, struct aufs_unpack_entry *entry,
                         const char *base, int keep_open)
{
    struct timespec times[2];
    set_timespec(&times[0], entry->mtime);
    times[1] = times[0];
    if (entry->kind == '5') {
        if (mkdirat(run->parent_fd, base, 0700) != 0)
            return -errno;
        int fd = openat(run->parent_fd, base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            return -errno;
        int rc = 0;
        if (fchown(fd, (uid_t)entry->uid, (gid_t)entry->gid) != 0 ||
            fchmod(fd, (mode_t)entry->mode) != 0)
            rc = -errno;
        close(fd);
        return rc; /* its times are set by the caller, after everything inside it */
    }
    if (entry->kind == '2') {
        char target[101];
        memcpy(target, entry->linkname, entry->linkname_length);
        target[entry->linkname_length] = 0;
        if (symlinkat(target, run->parent_fd, base) != 0)
            return -errno;
        if (fchownat(run->parent_fd, base, (uid_t)entry->uid, (gid_t)entry->gid,
                     AT_SYMLINK_NOFOLLOW) != 0 ||
            utimensat(run->parent_fd, base, times, AT_SYMLINK_NOFOLLOW) != 0)
            return -errno;
        return 0;
    }
    int flags = O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
    int fd = openat(run->parent_fd, base, flags | (keep_open ? O_RDWR | O_NOATIME : O_WRONLY),
                    0600);
    if (fd < 0 && keep_open && errno == EPERM) {
        /* O_NOATIME refused: the kernel checks it once the file is made, so the file is
         * there, ours and empty (O_EXCL made it); it is written and closed as any other */
        keep_open = 0;
        fd = openat(run->parent_fd, base, (flags & ~O_EXCL) | O_WRONLY, 0600);
    }
    if (fd < 0)
        return -errno;
    struct aufs_io_request request;
    memset(&request, 0, sizeof request);
    request.fd = fd;
    request.out_fd = -1;
    request.bytes = run->buffer + entry->data_offset;
    request.bytes_size = (size_t)entry->size;
    request.set_owner = 1;
    request.uid = (uid_t)entry->uid;
    request.gid = (gid_t)entry->gid;
    request.set_mode = 1;
    request.mode = (mode_t)entry->mode;
    request.set_times = 1;
    request.atime_ns = request.mtime_ns = entry->mtime * 1000000000LL;
    request.close_fd = !keep_open;
    int rc = aufs_io_run(&request);
    if (keep_open && rc == 0)
        entry->fd = fd;
    else if (keep_open)
        close(fd);
    return rc;
}

/*
 * Reads the member at `position` into `entry`: AUFS_UNPACK_DONE when the run may create it,
 * else the reason to stop. `*end` is where its data ends.
 */
static int examine(const struct aufs_unpack_run *run, size_t position,
                   struct aufs_unpack_entry *entry, size_t *end)
{
    struct aufs_tar_header header;
    memset(entry, 0, sizeof *entry);
    entry->fd = -1;
    entry->header_offset = position;
    if (run->end - position < BLOCK)
        return AUFS_UNPACK_NEED_DATA;
    const unsigned char *block = run->buffer + position;
    if (is_zero_block(block) || aufs_tar_parse_header(block, &header) != 0)
        return AUFS_UNPACK_OTHER;
    memcpy(entry->name, header.name, header.name_length);
    entry->name_length = header.name_length;
    entry->kind = header.typeflag;
    entry->mode = header.mode;
    entry->uid = header.uid;
    entry->gid = header.gid;
    entry->mtime = header.mtime;
    entry->size = (uint64_t)header.size;
    entry->data_offset = position + BLOCK;
    if (header.typeflag == '\0' || header.typeflag == '7')
        entry->kind = '0';
    size_t length = header.name_length;
    if (entry->kind == '5' && length > 0 && header.name[length - 1] == '/')
        length--; /* a directory's name ends with a slash */
    const unsigned char *slash = length ? memrchr(header.name, '/', length) : NULL;
    entry->directory_length = slash ? (size_t)(slash - header.name) + 1 : 0;
    entry->base_length = length - entry->directory_length;
    if (entry->kind != '0' && entry->kind != '2' && entry->kind != '5')
        return AUFS_UNPACK_OTHER;
    if ((entry->kind != '0' && header.size != 0) || header.uid >= ID_LIMIT ||
        header.gid >= ID_LIMIT || header.mtime >= TIME_LIMIT_SECONDS)
        return AUFS_UNPACK_OTHER; /* the Python path says what is wrong */
    if (entry->kind == '2') {
        if (header.linkname_length == 0)
            return AUFS_UNPACK_OTHER;
        memcpy(entry->linkname, header.linkname, header.linkname_length);
        entry->linkname_length = header.linkname_length;
    }
    /* before its directory is asked for: a name spelled "a/f/" or "a/f/." is the Python
     * path's, and must not make "a/f" a directory on the way */
    if (!plain_base(header.name + entry->directory_length, entry->base_length))
        return AUFS_UNPACK_OTHER;
    if (!run->parent_known || entry->directory_length != run->prefix_length ||
        memcmp(header.name, run->prefix, run->prefix_length) != 0)
        return AUFS_UNPACK_PARENT;
    if (header.size > (int64_t)run->max_file_size)
        return AUFS_UNPACK_OTHER; /* written streaming by the Python path */
    uint64_t padded = ((uint64_t)header.size + BLOCK - 1) / BLOCK * BLOCK;
    if (padded > run->end - entry->data_offset)
        return AUFS_UNPACK_NEED_DATA;
    *end = entry->data_offset + (size_t)header.size;
    entry->padding = (size_t)(padded - (uint64_t)header.size);
    return AUFS_UNPACK_DONE;
}

/* Creates one examined member: 0 or -errno. When the run wants CRCs, a file with data is left
 * open for its CRC-64 to be read back on another thread, while crcfd.c's cap allows; else its
 * CRC-64 is made here, while the data is still in the cache. */
static int create_entry(const struct aufs_unpack_run *run, struct aufs_unpack_entry *entry)
{
    char base[256];
    memcpy(base, entry->name + entry->directory_length, entry->base_length);
    base[entry->base_length] = 0;
    int wants_crc = run->want_crc && entry->kind == '0' && entry->size > 0;
    int keep_open = wants_crc && run->defer_crc && aufs_crc_fd_reserve();
    int rc = create_member(run, entry, base, keep_open);
    if (keep_open && entry->fd < 0)
        aufs_crc_fd_release(-1);
    if (rc == 0 && wants_crc && entry->fd < 0)
        entry->crc = aufs_crc64_iso(0, run->buffer + entry->data_offset, (size_t)entry->size);
    return rc;
}

int aufs_unpack_members(struct aufs_unpack_run *run)
{
    size_t position = run->position + run->padding;
    run->count = 0;
    run->error = 0;
    memset(&run->stop, 0, sizeof run->stop);
    if (position > run->end)
        return run->status = AUFS_UNPACK_NEED_DATA;
    while (run->count < run->capacity) {
        struct aufs_unpack_entry *entry = &run->entries[run->count];
        size_t end = 0;
        int status = examine(run, position, entry, &end);
        if (status != AUFS_UNPACK_DONE) {
            run->stop = *entry;
            return run->status = status;
        }
        int rc = create_entry(run, entry);
        if (rc == -EEXIST) { /* nothing was made: the Python path replaces what is there */
            run->stop = *entry;
            return run->status = AUFS_UNPACK_OTHER;
        }
        if (rc < 0) {
            run->stop = *entry;
            run->error = -rc;
            return run->status = AUFS_UNPACK_ERROR;
        }
        run->count++;
        run->position = end;
        run->padding = entry->padding;
        position = end + entry->padding;
    }
    return run->status = AUFS_UNPACK_FULL;
}
