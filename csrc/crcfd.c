/*
 * A file's CRC-64 read back later, through its fd, on another thread. While a layer is applied
 * with its tar-split recorded, the applying thread writes each file and hands its still open
 * fd (opened O_RDWR | O_NOATIME, so reading it back leaves its times alone) to tar-split's
 * compressing thread, which reads the file from the page cache, checksums it and closes it:
 * the applying thread neither checksums the layer's bytes nor closes its files.
 *
 * The fds held so, in the whole process, are capped: a quarter of those RLIMIT_NOFILE's soft
 * limit leaves free when a recording starts, and at most 512. Past the cap the caller
 * checksums the data and closes the file itself.
 */
#define _GNU_SOURCE
#include "aufs_core.h"

#include <dirent.h>
#include <errno.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <unistd.h>

#define MOST_HELD 512

static atomic_long held;
static atomic_long limit = -1; /* the cap in force; -1 until the first recording */
static atomic_int fixed;       /* aufs_crc_fd_set_limit set it: no refresh */

/* The fds open in the process (/proc/self/fd's entries, one of them the listing's own);
 * 0 without /proc. */
static long open_fds(void)
{
    DIR *listing = opendir("/proc/self/fd");
    if (listing == NULL)
        return 0;
    long count = 0;
    struct dirent *entry;
    while ((entry = readdir(listing)) != NULL)
        count += entry->d_name[0] != '.';
    closedir(listing);
    return count;
}

static long default_limit(void)
{
    struct rlimit fds;
    if (getrlimit(RLIMIT_NOFILE, &fds) != 0)
        return 0;
    if (fds.rlim_cur == RLIM_INFINITY)
        return MOST_HELD;
    long spare = (long)fds.rlim_cur - (open_fds() - atomic_load(&held)); /* ours count free */
    long quarter = spare > 0 ? spare / 4 : 0;
    return quarter < MOST_HELD ? quarter : MOST_HELD;
}

void aufs_crc_fd_refresh(void)
{
    if (!atomic_load(&fixed))
        atomic_store(&limit, default_limit());
}

long aufs_crc_fd_limit(void)
{
    if (atomic_load(&limit) < 0)
        aufs_crc_fd_refresh();
    return atomic_load(&limit);
}

long aufs_crc_fd_set_limit(long cap)
{
    long before = aufs_crc_fd_limit();
    atomic_store(&fixed, cap >= 0);
    atomic_store(&limit, cap >= 0 ? cap : default_limit());
    return before;
}

long aufs_crc_fd_held(void)
{
    return atomic_load(&held);
}

int aufs_crc_fd_reserve(void)
{
    long cap = aufs_crc_fd_limit();
    if (atomic_fetch_add(&held, 1) < cap)
        return 1;
    atomic_fetch_sub(&held, 1);
    return 0;
}

void aufs_crc_fd_release(int fd)
{
    if (fd >= 0)
        close(fd);
    atomic_fetch_sub(&held, 1);
}

int aufs_crc_fd_read(int fd, uint64_t size, uint64_t *crc, unsigned char *scratch,
                     size_t scratch_size)
{
    uint64_t sum = 0, done = 0;
    int rc = 0;
    while (done < size) {
        size_t wanted = size - done < scratch_size ? (size_t)(size - done) : scratch_size;
        ssize_t count = pread(fd, scratch, wanted, (off_t)done);
        if (count < 0 && errno == EINTR)
            continue;
        if (count <= 0) {
            rc = count < 0 ? errno : EIO; /* EIO: shorter than what was written */
            break;
        }
        sum = aufs_crc64_iso(sum, scratch, (size_t)count);
        done += (uint64_t)count;
    }
    /* where close reports a write that failed (a network filesystem), it is an error too,
     * as it is when the applying thread closes the file itself */
    if (close(fd) != 0 && rc == 0 && errno != EINTR)
        rc = errno;
    aufs_crc_fd_release(-1);
    *crc = sum;
    return rc;
}
