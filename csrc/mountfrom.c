/*
 * mount(2) with relative paths in its data, resolved from a given directory: how Docker's
 * overlay2 keeps a deep chain of short links (l/<26 chars>) within one page.
 *
 * The kernel resolves those paths from the caller's working directory, which all threads of
 * a process share. While the caller is the process's only thread, it moves there and back
 * around the call (nothing else can see it: Docker's mounting child does the same). Else the
 * mount runs on one worker thread that unshared its working directory (CLONE_FS) when it
 * started; the caller waits on a condition variable, without the GIL.
 */
#define _GNU_SOURCE
#include "aufs_core.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

struct mount_job {
    const char *directory, *source, *target, *fstype, *data;
    unsigned long flags;
    int result; /* 0 or -errno */
    int failed; /* the step that failed: AUFS_MOUNT_FROM_CHDIR, _MOUNT or _RETURN */
    int done;
};

/* One call at a time per process: it guards everything below. */
static pthread_mutex_t calls = PTHREAD_MUTEX_INITIALIZER;

/* /proc/self/task, opened once (O_PATH): its link count is 2 + the number of threads. */
static int task_fd = -1;
static pid_t task_pid;

/* The worker: 0 not started, 1 running, -errno when unshare(CLONE_FS) was refused. */
static pthread_mutex_t slot_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t slot_changed = PTHREAD_COND_INITIALIZER;
static struct mount_job *slot;
static int worker_status;
static pid_t worker_pid;
static int atfork_registered;

static void reset_in_child(void)
{
    /* the child has only the thread that forked: no worker, and locks held by the parent's
       other threads are gone with them */
    pthread_mutex_init(&calls, NULL);
    pthread_mutex_init(&slot_lock, NULL);
    pthread_cond_init(&slot_changed, NULL);
    slot = NULL;
    worker_status = 0;
    if (task_fd >= 0)
        close(task_fd); /* the parent's, inherited: nothing in the child has run yet */
    task_fd = -1;
}

static int single_threaded(pid_t pid)
{
    struct stat info;
    if (task_fd >= 0 && task_pid != pid)
        task_fd = -1; /* forked without the atfork handler (a raw clone): keep its fd alone */
    if (task_fd < 0) {
        task_fd = open("/proc/self/task", O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (task_fd < 0)
            return 0; /* cannot tell: the worker is always safe */
        task_pid = pid;
    }
    if (fstat(task_fd, &info) != 0)
        return 0;
    return info.st_nlink == 3; /* ".", ".." and the one thread's entry */
}

static void run_job(struct mount_job *job, int previous)
{
    job->result = 0;
    if (chdir(job->directory) != 0) {
        job->result = -errno;
        job->failed = AUFS_MOUNT_FROM_CHDIR;
        return;
    }
    if (mount(job->source, job->target, job->fstype, job->flags, job->data) != 0) {
        job->result = -errno;
        job->failed = AUFS_MOUNT_FROM_MOUNT;
    }
    if (previous >= 0 && fchdir(previous) != 0) {
        int returning = errno;
        if (job->result == 0)
            umount2(job->target, MNT_DETACH); /* still resolved from job->directory */
        job->result = -returning;
        job->failed = AUFS_MOUNT_FROM_RETURN;
    }
}

static void *worker_main(void *unused)
{
    sigset_t all;
    (void)unused;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are for the process's own threads */
    pthread_mutex_lock(&slot_lock);
    worker_status = unshare(CLONE_FS) == 0 ? 1 : -errno;
    pthread_cond_broadcast(&slot_changed);
    if (worker_status < 0) {
        pthread_mutex_unlock(&slot_lock);
        return NULL;
    }
    for (;;) {
        struct mount_job *job;
        while (slot == NULL || slot->done)
            pthread_cond_wait(&slot_changed, &slot_lock);
        job = slot;
        pthread_mutex_unlock(&slot_lock);
        run_job(job, -1); /* this thread's working directory is its own: no way back needed */
        pthread_mutex_lock(&slot_lock);
        job->done = 1;
        slot = NULL;
        pthread_cond_broadcast(&slot_changed);
    }
}

/* Starts the worker in this process if need be: 0; -errno with *failed set to
 * AUFS_MOUNT_FROM_THREAD when no thread can start (worth another try later), or to
 * AUFS_MOUNT_FROM_UNSHARE when it cannot have a working directory of its own (for good). */
static int ensure_worker(pid_t pid, int *failed)
{
    pthread_t thread;
    pthread_attr_t attributes;
    int error;
    *failed = AUFS_MOUNT_FROM_UNSHARE;
    if (worker_pid == pid && worker_status != 0)
        return worker_status < 0 ? worker_status : 0;
    worker_pid = pid;
    worker_status = 0;
    *failed = AUFS_MOUNT_FROM_THREAD;
    if (pthread_attr_init(&attributes) != 0) {
        worker_pid = 0;
        return -ENOMEM;
    }
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    error = pthread_create(&thread, &attributes, worker_main, NULL);
    pthread_attr_destroy(&attributes);
    if (error != 0) {
        worker_pid = 0; /* try again on the next call */
        return -error;
    }
    pthread_mutex_lock(&slot_lock);
    while (worker_status == 0)
        pthread_cond_wait(&slot_changed, &slot_lock);
    pthread_mutex_unlock(&slot_lock);
    *failed = AUFS_MOUNT_FROM_UNSHARE;
    return worker_status < 0 ? worker_status : 0;
}

int aufs_mount_from(const char *directory, const char *source, const char *target,
                    const char *fstype, unsigned long flags, const char *data, int *failed)
{
    struct mount_job job = {directory, source, target, fstype, data, flags, 0, 0, 0};
    pid_t pid = getpid();
    int previous, error;

    pthread_mutex_lock(&calls);
    if (!atfork_registered && pthread_atfork(NULL, NULL, reset_in_child) == 0)
        atfork_registered = 1;
    if (single_threaded(pid)) {
        previous = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (previous >= 0) {
            run_job(&job, previous);
            close(previous);
            pthread_mutex_unlock(&calls);
            *failed = job.failed;
            return job.result;
        }
    }
    error = ensure_worker(pid, failed);
    if (error != 0) {
        pthread_mutex_unlock(&calls);
        return error;
    }
    pthread_mutex_lock(&slot_lock);
    slot = &job;
    pthread_cond_broadcast(&slot_changed);
    while (!job.done)
        pthread_cond_wait(&slot_changed, &slot_lock);
    pthread_mutex_unlock(&slot_lock);
    pthread_mutex_unlock(&calls);
    *failed = job.failed;
    return job.result;
}
