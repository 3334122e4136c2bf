/*
 * Tar-split's gzip, made on a thread that never takes Python's lock. While a layer is
 * applied, the recorder hands over packed batches of entries; this thread turns each into
 * JSON lines (with the formatter it was given, which the Cython core writes without the GIL,
 * and which first reads back the CRC-64 of the files handed over open: see crcfd.c) and
 * deflates them with the system's zlib. A batch it drops goes to the discarder, which closes
 * the files it still holds. A Python thread doing the same needs the interpreter lock a few
 * times per batch, and each hand-over of the lock puts the applying thread to sleep until the
 * other gives it back: on a small VM that costs the apply more than the compression itself.
 *
 * zlib is opened with dlopen: CPython's own zlib module loads the same libz.so.1, so there is
 * nothing more to build against, and without it the recorder keeps its Python thread.
 */
#define _GNU_SOURCE
#include "aufs_core.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* zlib's z_stream (zlib.h), whose layout zlib keeps from one version to the next; its size is
 * checked by deflateInit2_ */
struct z_stream_s {
    const unsigned char *next_in;
    unsigned int avail_in;
    unsigned long total_in;
    unsigned char *next_out;
    unsigned int avail_out;
    unsigned long total_out;
    const char *msg;
    void *state;
    void *zalloc;
    void *zfree;
    void *opaque;
    int data_type;
    unsigned long adler;
    unsigned long reserved;
};

#define Z_NO_FLUSH 0
#define Z_FINISH 4
#define Z_OK 0
#define Z_STREAM_END 1
#define Z_DEFLATED 8
#define GZIP_WINDOW 31 /* 15 bits, in a gzip container */

static int (*deflate_init)(struct z_stream_s *, int, int, int, int, int, const char *, int);
static int (*deflate_run)(struct z_stream_s *, int);
static int (*deflate_end)(struct z_stream_s *);
static pthread_once_t zlib_once = PTHREAD_ONCE_INIT;

static void open_zlib(void)
{
    void *library = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL);
    if (library == NULL)
        return;
    deflate_run = (int (*)(struct z_stream_s *, int))dlsym(library, "deflate");
    deflate_end = (int (*)(struct z_stream_s *))dlsym(library, "deflateEnd");
    deflate_init = (int (*)(struct z_stream_s *, int, int, int, int, int, const char *,
                            int))dlsym(library, "deflateInit2_");
    if (deflate_run == NULL || deflate_end == NULL)
        deflate_init = NULL;
}

struct batch {
    struct batch *next;
    char *packed;
    size_t size, count;
    uint64_t position;
};

struct aufs_gz_lines {
    aufs_lines_formatter format;
    aufs_batch_discarder discard;
    void (*release)(void *);
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    struct batch *head, *tail;
    int idle;     /* the thread waits for a batch */
    int closing;  /* 1: finish what is queued, then end the stream; 2: drop it all */
    int error;    /* errno-style, once something failed */
    struct z_stream_s stream;
    unsigned char *out;
    size_t out_size, out_capacity;
};

/* deflate with `flush` until the input is taken (and, for Z_FINISH, the stream ended) */
static int deflate_all(struct aufs_gz_lines *gz, const char *data, size_t size, int flush)
{
    gz->stream.next_in = (const unsigned char *)data;
    gz->stream.avail_in = (unsigned int)size;
    for (;;) {
        if (gz->out_capacity - gz->out_size < 65536) {
            size_t capacity = gz->out_capacity ? 2 * gz->out_capacity : 1 << 18;
            unsigned char *grown = realloc(gz->out, capacity);
            if (grown == NULL)
                return ENOMEM;
            gz->out = grown;
            gz->out_capacity = capacity;
        }
        gz->stream.next_out = gz->out + gz->out_size;
        gz->stream.avail_out = (unsigned int)(gz->out_capacity - gz->out_size);
        int rc = deflate_run(&gz->stream, flush);
        gz->out_size = gz->out_capacity - gz->stream.avail_out;
        if (rc == Z_STREAM_END)
            return 0;
        if (rc != Z_OK)
            return EIO;
        if (flush == Z_NO_FLUSH && gz->stream.avail_in == 0)
            return 0;
    }
}

static void *compressing(void *argument)
{
    struct aufs_gz_lines *gz = argument;
    pthread_mutex_lock(&gz->lock);
    for (;;) {
        while (gz->head == NULL && gz->closing == 0) {
            gz->idle = 1;
            pthread_cond_wait(&gz->changed, &gz->lock);
            gz->idle = 0;
        }
        if (gz->closing == 2 || (gz->head == NULL && gz->closing == 1))
            break;
        struct batch *batch = gz->head;
        gz->head = batch->next;
        if (gz->head == NULL)
            gz->tail = NULL;
        int failed = gz->error;
        pthread_mutex_unlock(&gz->lock);
        char *lines = NULL;
        size_t length = 0;
        int rc = failed ? failed
                        : gz->format(batch->packed, batch->size, batch->count, batch->position,
                                     &lines, &length);
        gz->discard(batch->packed, batch->size, batch->count);
        free(batch);
        if (rc == 0 && length)
            rc = deflate_all(gz, lines, length, Z_NO_FLUSH);
        gz->release(lines);
        pthread_mutex_lock(&gz->lock);
        if (rc && !gz->error)
            gz->error = rc;
    }
    if (gz->closing == 1 && !gz->error) {
        pthread_mutex_unlock(&gz->lock);
        int rc = deflate_all(gz, NULL, 0, Z_FINISH);
        pthread_mutex_lock(&gz->lock);
        if (rc)
            gz->error = rc;
    }
    pthread_mutex_unlock(&gz->lock);
    return NULL;
}

struct aufs_gz_lines *aufs_gz_lines_start(aufs_lines_formatter format,
                                          aufs_batch_discarder discard,
                                          void (*release)(void *), int level)
{
    pthread_once(&zlib_once, open_zlib);
    if (deflate_init == NULL) {
        errno = ENOSYS;
        return NULL;
    }
    struct aufs_gz_lines *gz = calloc(1, sizeof *gz);
    if (gz == NULL)
        return NULL;
    gz->format = format;
    gz->discard = discard;
    gz->release = release;
    if (deflate_init(&gz->stream, level, Z_DEFLATED, GZIP_WINDOW, 8, 0, "1.2.11",
                     (int)sizeof gz->stream) != Z_OK) {
        free(gz);
        errno = ENOSYS;
        return NULL;
    }
    pthread_mutex_init(&gz->lock, NULL);
    pthread_cond_init(&gz->changed, NULL);
    int rc = pthread_create(&gz->thread, NULL, compressing, gz);
    if (rc != 0) {
        deflate_end(&gz->stream);
        pthread_mutex_destroy(&gz->lock);
        pthread_cond_destroy(&gz->changed);
        free(gz);
        errno = rc;
        return NULL;
    }
    return gz;
}

int aufs_gz_lines_add(struct aufs_gz_lines *gz, char *packed, size_t size, size_t count,
                      uint64_t position)
{
    struct batch *batch = malloc(sizeof *batch);
    if (batch == NULL) {
        gz->discard(packed, size, count);
        return ENOMEM;
    }
    batch->next = NULL;
    batch->packed = packed;
    batch->size = size;
    batch->count = count;
    batch->position = position;
    pthread_mutex_lock(&gz->lock);
    if (gz->tail)
        gz->tail->next = batch;
    else
        gz->head = batch;
    gz->tail = batch;
    if (gz->idle)
        pthread_cond_signal(&gz->changed);
    int error = gz->error;
    pthread_mutex_unlock(&gz->lock);
    return error;
}

static void stop(struct aufs_gz_lines *gz, int how)
{
    pthread_mutex_lock(&gz->lock);
    gz->closing = how;
    pthread_cond_signal(&gz->changed);
    pthread_mutex_unlock(&gz->lock);
    pthread_join(gz->thread, NULL);
    while (gz->head) {
        struct batch *batch = gz->head;
        gz->head = batch->next;
        gz->discard(batch->packed, batch->size, batch->count);
        free(batch);
    }
    deflate_end(&gz->stream);
    pthread_mutex_destroy(&gz->lock);
    pthread_cond_destroy(&gz->changed);
}

int aufs_gz_lines_finish(struct aufs_gz_lines *gz, unsigned char **out, size_t *size)
{
    stop(gz, 1);
    int error = gz->error;
    if (error) {
        free(gz->out);
        *out = NULL;
        *size = 0;
    } else {
        *out = gz->out;
        *size = gz->out_size;
    }
    free(gz);
    return error;
}

void aufs_gz_lines_drop(struct aufs_gz_lines *gz)
{
    stop(gz, 2);
    free(gz->out);
    free(gz);
}
