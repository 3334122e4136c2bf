/*
 * The directory-size walker: Docker's directory.Size, shared by several threads.
 *
 * Directories wait on one LIFO stack as paths relative to the root (so no file descriptor is
 * held for a directory that is not being read). Each worker reads a directory with
 * getdents64, queues its subdirectories by d_type, and fstatat()s only the other entries.
 * Inodes with more than one link go into a shared (st_dev, st_ino) set, so hardlinks count once
 * and single-link files cost no memory.
 */
#define _GNU_SOURCE
#include "aufs_core.h"
#include "dents.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_THREADS 8
#define DENTS_BUFFER_SIZE (64 * 1024)

struct pending_dir {
    struct pending_dir *next;
    size_t length;
    char path[]; /* relative to the root; "" is the root itself */
};

struct inode_key {
    uint64_t device;
    uint64_t inode;
};

struct inode_set {
    pthread_mutex_t lock;
    struct inode_key *slots;
    unsigned char *used;
    size_t capacity; /* a power of two */
    size_t count;
};

struct walk {
    int root_fd;
    const char *root;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    struct pending_dir *stack;
    unsigned int busy_workers;
    int error;
    char *error_path;
    size_t error_path_size;
    uint64_t bytes;
    struct inode_set linked;
};

/* ---- the (st_dev, st_ino) set ---------------------------------------------------------------- */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static size_t slot_of(const struct inode_set *set, struct inode_key key)
{
    return (size_t)(mix64(key.inode ^ mix64(key.device))) & (set->capacity - 1);
}

static void place(struct inode_set *set, struct inode_key key)
{
    size_t slot = slot_of(set, key);
    while (set->used[slot])
        slot = (slot + 1) & (set->capacity - 1);
    set->used[slot] = 1;
    set->slots[slot] = key;
    set->count++;
}

static int grow(struct inode_set *set)
{
    size_t old_capacity = set->capacity;
    struct inode_key *old_slots = set->slots;
    unsigned char *old_used = set->used;
    size_t capacity = old_capacity ? old_capacity * 2 : 256;
    struct inode_key *slots = malloc(capacity * sizeof *slots);
    unsigned char *used = calloc(capacity, 1);

    if (slots == NULL || used == NULL) {
        free(slots);
        free(used);
        return -ENOMEM;
    }
    set->slots = slots;
    set->used = used;
    set->capacity = capacity;
    set->count = 0;
    for (size_t i = 0; i < old_capacity; i++)
        if (old_used[i])
            place(set, old_slots[i]);
    free(old_slots);
    free(old_used);
    return 0;
}

/* 1 when the key is new, 0 when it was seen before, -ENOMEM. */
static int remember_inode(struct inode_set *set, uint64_t device, uint64_t inode)
{
    struct inode_key key = {device, inode};
    int result = 1;

    pthread_mutex_lock(&set->lock);
    if ((set->count + 1) * 2 > set->capacity && grow(set) != 0) {
        result = -ENOMEM;
    } else {
        size_t slot = slot_of(set, key);
        for (; set->used[slot]; slot = (slot + 1) & (set->capacity - 1)) {
            if (set->slots[slot].device == device && set->slots[slot].inode == inode) {
                result = 0;
                break;
            }
        }
        if (result == 1)
            place(set, key);
    }
    pthread_mutex_unlock(&set->lock);
    return result;
}

/* ---- the shared stack and error ---------------------------------------------------------------- */

static struct pending_dir *pending_dir_new(const char *parent, size_t parent_length,
                                           const char *name)
{
    size_t name_length = strlen(name);
    size_t length = parent_length ? parent_length + 1 + name_length : name_length;
    struct pending_dir *dir = malloc(sizeof *dir + length + 1);

    if (dir == NULL)
        return NULL;
    dir->next = NULL;
    dir->length = length;
    if (parent_length) {
        memcpy(dir->path, parent, parent_length);
        dir->path[parent_length] = '/';
        memcpy(dir->path + parent_length + 1, name, name_length + 1);
    } else {
        memcpy(dir->path, name, name_length + 1);
    }
    return dir;
}

static void record_error(struct walk *walk, int error, const char *relative)
{
    pthread_mutex_lock(&walk->lock);
    if (walk->error == 0) {
        walk->error = error;
        if (walk->error_path != NULL && walk->error_path_size > 0) {
            if (relative == NULL || relative[0] == '\0')
                snprintf(walk->error_path, walk->error_path_size, "%s", walk->root);
            else
                snprintf(walk->error_path, walk->error_path_size, "%s/%s", walk->root, relative);
        }
    }
    pthread_cond_broadcast(&walk->changed);
    pthread_mutex_unlock(&walk->lock);
}

/* Paths longer than PATH_MAX are opened one component at a time. */
static int open_long_dir(int root_fd, char *path)
{
    int fd = dup(root_fd);
    char *component = path, *slash;

    while (fd >= 0 && component != NULL) {
        int next;
        slash = strchr(component, '/');
        if (slash)
            *slash = '\0';
        next = openat(fd, component, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (slash)
            *slash = '/';
        close(fd);
        fd = next;
        component = slash ? slash + 1 : NULL;
    }
    return fd < 0 ? -errno : fd;
}

static int open_pending_dir(const struct walk *walk, struct pending_dir *dir)
{
    int fd;
    if (dir->length == 0)
        fd = openat(walk->root_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    else if (dir->length < PATH_MAX)
        fd = openat(walk->root_fd, dir->path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    else
        return open_long_dir(walk->root_fd, dir->path);
    return fd < 0 ? -errno : fd;
}

/* Reads one directory; its subdirectories are returned as a list for the shared stack. */
static int scan_dir(struct walk *walk, struct pending_dir *dir, char *buffer, uint64_t *bytes,
                    struct pending_dir **found)
{
    int fd = open_pending_dir(walk, dir);
    int error = 0;

    if (fd < 0) {
        /* Gone, or replaced by a file or symlink, since its parent was read: skip it. */
        if (dir->length > 0 && (fd == -ENOENT || fd == -ENOTDIR || fd == -ELOOP))
            return 0;
        record_error(walk, -fd, dir->path);
        return fd;
    }
    for (;;) {
        long count = syscall(SYS_getdents64, fd, buffer, DENTS_BUFFER_SIZE);
        if (count < 0) {
            error = errno;
            if (error == ENOENT) /* the directory was removed while we read it */
                error = 0;
            else
                record_error(walk, error, dir->path);
            break;
        }
        if (count == 0)
            break;
        for (long offset = 0; offset < count;) {
            struct linux_dirent64 *entry = (struct linux_dirent64 *)(buffer + offset);
            const char *name = entry->d_name;
            unsigned char type = entry->d_type;
            struct stat info;

            offset += entry->d_reclen;
            if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0')))
                continue;
            if (type != DT_DIR) {
                if (fstatat(fd, name, &info, AT_SYMLINK_NOFOLLOW) != 0) {
                    if (errno == ENOENT)
                        continue;
                    error = errno;
                    struct pending_dir *where = pending_dir_new(dir->path, dir->length, name);
                    record_error(walk, error, where ? where->path : dir->path);
                    free(where);
                    goto done;
                }
                if (!S_ISDIR(info.st_mode)) {
                    if (info.st_size <= 0)
                        continue;
                    if (info.st_nlink > 1) {
                        int fresh = remember_inode(&walk->linked, info.st_dev, info.st_ino);
                        if (fresh < 0) {
                            error = -fresh;
                            record_error(walk, error, dir->path);
                            goto done;
                        }
                        if (!fresh)
                            continue;
                    }
                    *bytes += (uint64_t)info.st_size;
                    continue;
                }
            }
            struct pending_dir *child = pending_dir_new(dir->path, dir->length, name);
            if (child == NULL) {
                error = ENOMEM;
                record_error(walk, error, dir->path);
                goto done;
            }
            child->next = *found;
            *found = child;
        }
    }
done:
    close(fd);
    return -error;
}

static void free_list(struct pending_dir *dir)
{
    while (dir) {
        struct pending_dir *next = dir->next;
        free(dir);
        dir = next;
    }
}

static void *worker(void *argument)
{
    struct walk *walk = argument;
    char *buffer = malloc(DENTS_BUFFER_SIZE);
    uint64_t bytes = 0;

    if (buffer == NULL)
        record_error(walk, ENOMEM, NULL);
    pthread_mutex_lock(&walk->lock);
    for (;;) {
        while (walk->stack == NULL && walk->busy_workers > 0 && walk->error == 0)
            pthread_cond_wait(&walk->changed, &walk->lock);
        if (walk->error != 0 || walk->stack == NULL)
            break;
        struct pending_dir *dir = walk->stack;
        walk->stack = dir->next;
        walk->busy_workers++;
        pthread_mutex_unlock(&walk->lock);

        struct pending_dir *found = NULL;
        scan_dir(walk, dir, buffer, &bytes, &found);
        free(dir);

        pthread_mutex_lock(&walk->lock);
        walk->busy_workers--;
        if (found != NULL) {
            struct pending_dir *last = found;
            while (last->next)
                last = last->next;
            last->next = walk->stack;
            walk->stack = found;
        }
        pthread_cond_broadcast(&walk->changed);
    }
    walk->bytes += bytes;
    pthread_cond_broadcast(&walk->changed);
    pthread_mutex_unlock(&walk->lock);
    free(buffer);
    return NULL;
}

static unsigned int pick_thread_count(unsigned int requested)
{
    long online;
    if (requested == 0) {
        online = sysconf(_SC_NPROCESSORS_ONLN);
        requested = online > 0 ? (unsigned int)online : 1;
    }
    return requested > MAX_THREADS ? MAX_THREADS : requested;
}

int aufs_directory_size(const char *root, unsigned int threads, uint64_t *bytes,
                        char *error_path, size_t error_path_size)
{
    struct walk walk;
    struct stat info;
    pthread_t helpers[MAX_THREADS];
    unsigned int helper_count = 0;
    uint64_t root_bytes = 0;
    char *buffer;

    if (error_path != NULL && error_path_size > 0)
        error_path[0] = '\0';
    *bytes = 0;
    if (lstat(root, &info) != 0) {
        int error = errno;
        if (error_path != NULL && error_path_size > 0)
            snprintf(error_path, error_path_size, "%s", root);
        return -error;
    }
    if (!S_ISDIR(info.st_mode)) {
        *bytes = info.st_size > 0 ? (uint64_t)info.st_size : 0;
        return 0;
    }

    memset(&walk, 0, sizeof walk);
    walk.root = root;
    walk.error_path = error_path;
    walk.error_path_size = error_path_size;
    walk.root_fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (walk.root_fd < 0) {
        int error = errno;
        if (error_path != NULL && error_path_size > 0)
            snprintf(error_path, error_path_size, "%s", root);
        return -error;
    }
    pthread_mutex_init(&walk.lock, NULL);
    pthread_cond_init(&walk.changed, NULL);
    pthread_mutex_init(&walk.linked.lock, NULL);

    /* The root is read here first; helpers start only when it has subdirectories to share. */
    buffer = malloc(DENTS_BUFFER_SIZE);
    struct pending_dir *top = pending_dir_new("", 0, "");
    if (buffer == NULL || top == NULL) {
        record_error(&walk, ENOMEM, NULL);
        free(top);
    } else {
        scan_dir(&walk, top, buffer, &root_bytes, &walk.stack);
        free(top);
    }
    free(buffer);
    walk.bytes = root_bytes;

    if (walk.error == 0 && walk.stack != NULL) {
        unsigned int wanted = pick_thread_count(threads);
        for (unsigned int i = 1; i < wanted; i++) {
            if (pthread_create(&helpers[helper_count], NULL, worker, &walk) != 0)
                break; /* fewer threads is still correct */
            helper_count++;
        }
        worker(&walk);
        for (unsigned int i = 0; i < helper_count; i++)
            pthread_join(helpers[i], NULL);
    }

    free_list(walk.stack);
    free(walk.linked.slots);
    free(walk.linked.used);
    pthread_mutex_destroy(&walk.linked.lock);
    pthread_cond_destroy(&walk.changed);
    pthread_mutex_destroy(&walk.lock);
    close(walk.root_fd);
    if (walk.error != 0)
        return -walk.error;
    *bytes = walk.bytes;
    return 0;
}
