/*
 * An ordered queue of file I/O jobs run by one pthread, so that a caller parsing an archive or
 * walking a tree (in Python, holding its interpreter lock) overlaps with the writes on a second
 * core. Jobs run in submission order; the first failure is kept with the job's name, later jobs
 * only close their fds.
 */
#define _GNU_SOURCE
#include "aufs_core.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

struct aufs_io_job {
    struct aufs_io_job *next;
    struct aufs_io_request request;
    unsigned char *bytes; /* owned copy of request.bytes */
    char *name;           /* owned copy of request.name */
};

struct aufs_io_queue {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    struct aufs_io_job *head;
    struct aufs_io_job *tail;
    size_t pending;
    size_t pending_bytes;
    size_t max_pending;
    size_t max_pending_bytes;
    int stopping;
    int error;
    char error_name[512];
};

static int write_all(int fd, const unsigned char *data, size_t size)
{
    while (size > 0) {
        ssize_t written = write(fd, data, size);
        if (written < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        data += written;
        size -= (size_t)written;
    }
    return 0;
}

static int copy_file_data(int out_fd, int in_fd, uint64_t size)
{
    off_t offset = 0;
    while ((uint64_t)offset < size) {
        ssize_t sent = sendfile(out_fd, in_fd, &offset, (size_t)(size - (uint64_t)offset));
        if (sent < 0 && (errno == EINVAL || errno == ENOSYS)) {
            unsigned char buffer[65536];
            ssize_t count = pread(in_fd, buffer, sizeof buffer, offset);
            if (count < 0)
                return -errno;
            if (count == 0)
                return -ENODATA;
            int rc = write_all(out_fd, buffer, (size_t)count);
            if (rc < 0)
                return rc;
            offset += count;
            continue;
        }
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (sent == 0)
            return -ENODATA; /* the file shrank while it was read */
    }
    return 0;
}

int aufs_io_run(const struct aufs_io_request *job)
{
    int rc = 0;
    if (job->bytes_size > 0)
        rc = write_all(job->out_fd >= 0 ? job->out_fd : job->fd, job->bytes, job->bytes_size);
    if (rc == 0 && job->copy_size > 0)
        rc = copy_file_data(job->out_fd, job->fd, job->copy_size);
    if (rc == 0 && job->padding > 0) {
        static const unsigned char zeros[512];
        rc = write_all(job->out_fd, zeros, job->padding);
    }
    if (rc == 0 && job->set_owner && fchown(job->fd, job->uid, job->gid) != 0)
        rc = -errno;
    if (rc == 0 && job->set_mode && fchmod(job->fd, job->mode) != 0)
        rc = -errno;
    if (rc == 0 && job->set_times) {
        struct timespec times[2] = {
            {(time_t)(job->atime_ns / 1000000000), (long)(job->atime_ns % 1000000000)},
            {(time_t)(job->mtime_ns / 1000000000), (long)(job->mtime_ns % 1000000000)},
        };
        for (int i = 0; i < 2; i++)
            if (times[i].tv_nsec < 0) {
                times[i].tv_nsec += 1000000000;
                times[i].tv_sec -= 1;
            }
        if (futimens(job->fd, times) != 0)
            rc = -errno;
    }
    if (job->close_fd && job->fd >= 0 && close(job->fd) != 0 && rc == 0 && errno != EINTR)
        rc = -errno;
    return rc;
}

static void *io_thread(void *argument)
{
    struct aufs_io_queue *queue = argument;
    pthread_mutex_lock(&queue->lock);
    for (;;) {
        while (queue->head == NULL && !queue->stopping)
            pthread_cond_wait(&queue->changed, &queue->lock);
        struct aufs_io_job *job = queue->head;
        if (job == NULL)
            break;
        queue->head = job->next;
        if (queue->head == NULL)
            queue->tail = NULL;
        int failed = queue->error != 0;
        pthread_mutex_unlock(&queue->lock);

        int rc;
        if (failed) {
            rc = 0;
            if (job->request.close_fd && job->request.fd >= 0)
                close(job->request.fd);
        } else {
            rc = aufs_io_run(&job->request);
        }

        pthread_mutex_lock(&queue->lock);
        if (rc < 0 && queue->error == 0) {
            queue->error = -rc;
            snprintf(queue->error_name, sizeof queue->error_name, "%s",
                     job->name ? job->name : "");
        }
        queue->pending--;
        queue->pending_bytes -= job->request.bytes_size;
        pthread_cond_broadcast(&queue->changed);
        free(job->bytes);
        free(job->name);
        free(job);
    }
    pthread_mutex_unlock(&queue->lock);
    return NULL;
}

int aufs_io_open(struct aufs_io_queue **result, size_t max_pending, size_t max_pending_bytes)
{
    struct aufs_io_queue *queue = calloc(1, sizeof *queue);
    if (queue == NULL)
        return -ENOMEM;
    queue->max_pending = max_pending ? max_pending : 1;
    queue->max_pending_bytes = max_pending_bytes;
    pthread_mutex_init(&queue->lock, NULL);
    pthread_cond_init(&queue->changed, NULL);
    int rc = pthread_create(&queue->thread, NULL, io_thread, queue);
    if (rc != 0) {
        pthread_cond_destroy(&queue->changed);
        pthread_mutex_destroy(&queue->lock);
        free(queue);
        return -rc;
    }
    *result = queue;
    return 0;
}

int aufs_io_submit(struct aufs_io_queue *queue, const struct aufs_io_request *request)
{
    struct aufs_io_job *job = calloc(1, sizeof *job);
    if (job == NULL)
        return -ENOMEM;
    job->request = *request;
    if (request->bytes_size > 0) {
        job->bytes = malloc(request->bytes_size);
        if (job->bytes == NULL) {
            free(job);
            return -ENOMEM;
        }
        memcpy(job->bytes, request->bytes, request->bytes_size);
    }
    job->request.bytes = job->bytes;
    job->name = request->name ? strdup(request->name) : NULL;
    job->request.name = job->name;

    pthread_mutex_lock(&queue->lock);
    while (queue->error == 0 &&
           (queue->pending >= queue->max_pending ||
            (queue->max_pending_bytes && queue->pending > 0 &&
             queue->pending_bytes + request->bytes_size > queue->max_pending_bytes)))
        pthread_cond_wait(&queue->changed, &queue->lock);
    if (queue->tail)
        queue->tail->next = job;
    else
        queue->head = job;
    queue->tail = job;
    queue->pending++;
    queue->pending_bytes += request->bytes_size;
    int error = queue->error;
    pthread_cond_broadcast(&queue->changed);
    pthread_mutex_unlock(&queue->lock);
    return -error;
}

int aufs_io_error(struct aufs_io_queue *queue, char *name, size_t name_size)
{
    pthread_mutex_lock(&queue->lock);
    int error = queue->error;
    if (error && name != NULL && name_size > 0)
        snprintf(name, name_size, "%s", queue->error_name);
    pthread_mutex_unlock(&queue->lock);
    return -error;
}

int aufs_io_close(struct aufs_io_queue *queue, char *name, size_t name_size)
{
    pthread_mutex_lock(&queue->lock);
    queue->stopping = 1;
    pthread_cond_broadcast(&queue->changed);
    pthread_mutex_unlock(&queue->lock);
    pthread_join(queue->thread, NULL);
    int rc = aufs_io_error(queue, name, name_size);
    pthread_cond_destroy(&queue->changed);
    pthread_mutex_destroy(&queue->lock);
    free(queue);
    return rc;
}
