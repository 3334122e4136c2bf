/*
 * A file's CRC-64 read back later, through its fd, on another thread. While a layer is applied
 * with its tar-split recorded, the applying thread writes each file and hands its still open
 * fd (opened O_RDWR | O_NOATIME, so reading it back leaves its times alone) to tar-split's
 * compressing thread, which reads the file from the page cache, checksums it and closes it:
 * the applying thread neither checksums the layer's bytes nor closes its files.
 *
 * The fds held so, in the whole process, are capped: a quarter of RLIMIT_NOFILE's soft limit,
 * and at most 512. Past the cap the caller checksums the data and closes the file itself.
 */
#define _GNU_SOURCE
#include "aufs_core.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <unistd.h>

#define MOST_HELD 512

static atomic_long held;
static atomic_long limit = -1;

static long default_limit(void)
{
    struct rlimit fds;
    if (getrlimit(RLIMIT_NOFILE, &fds) != 0 || fds.rlim_cur == RLIM_INFINITY)
        return MOST_HELD;
    long quarter = (long)(fds.rlim_cur / 4);
    return quarter < MOST_HELD ? quarter : MOST_HELD;
}

long aufs_crc_fd_limit(void)
{
    long cap = atomic_load(&limit);
    if (cap < 0) {
        long expected = -1;
        atomic_compare_exchange_strong(&limit, &expected, default_limit());
        cap = atomic_load(&limit);
    }
    return cap;
}

long aufs_crc_fd_set_limit(long cap)
{
    long before = aufs_crc_fd_limit();
    atomic_store(&limit, cap < 0 ? default_limit() : cap);
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
