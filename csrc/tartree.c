/*
 * The tar of a directory tree, walked in C: the native twin of walk_tree in
 * aufs/archive/export.py, its readable version.
 *
 * One walk, no recursion: a stack of levels, each the sorted names of one directory (read with
 * getdents64, sorted by their bytes). Headers are built by tarbuild.c and handed, with each
 * regular file's open fd, to the ordered I/O queue of ioqueue.c, whose thread writes them and
 * copies the data with sendfile. Only the deepest `open_levels` directories (and the root) stay
 * open; a shallower one is opened again, one component at a time, when the walk comes back.
 */
#define _GNU_SOURCE
#include "aufs_core.h"
#include "dents.h"
#include "tarbuild.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

/* O_NONBLOCK: a FIFO swapped in after the fstatat must not hang the walk (no effect on files) */
#define READ_FLAGS (O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
#define DIR_FLAGS (O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
#define FLUSH_AT (64 * 1024)
#define WHITEOUT_PREFIX ".wh."
#define META_PREFIX ".wh..wh."
#define OPAQUE_MARKER ".wh..wh..opq"

static int starts_with(const char *text, const char *prefix)
{
    return strncmp(text, prefix, strlen(prefix)) == 0;
}

/* ---- hardlinks: (st_dev, st_ino) -> the first name archived --------------------------------- */

struct link_slot {
    uint64_t device, inode;
    char *name; /* NULL: empty */
};

struct link_map {
    struct link_slot *slots;
    size_t capacity; /* a power of two, or 0 */
    size_t count;
};

static size_t link_hash(uint64_t device, uint64_t inode)
{
    uint64_t x = inode * 0x9e3779b97f4a7c15ULL ^ device;
    x ^= x >> 31;
    x *= 0xbf58476d1ce4e5b9ULL;
    return (size_t)(x ^ (x >> 29));
}

static struct link_slot *link_find(struct link_map *map, uint64_t device, uint64_t inode)
{
    size_t mask = map->capacity - 1;
    for (size_t i = link_hash(device, inode) & mask;; i = (i + 1) & mask) {
        struct link_slot *slot = &map->slots[i];
        if (slot->name == NULL || (slot->device == device && slot->inode == inode))
            return slot;
    }
}

static int link_grow(struct link_map *map)
{
    size_t capacity = map->capacity ? map->capacity * 2 : 64;
    struct link_slot *old = map->slots;
    size_t old_capacity = map->capacity;
    map->slots = calloc(capacity, sizeof *map->slots);
    if (map->slots == NULL) {
        map->slots = old;
        return -ENOMEM;
    }
    map->capacity = capacity;
    for (size_t i = 0; i < old_capacity; i++)
        if (old[i].name != NULL)
            *link_find(map, old[i].device, old[i].inode) = old[i];
    free(old);
    return 0;
}

static void link_free(struct link_map *map)
{
    for (size_t i = 0; i < map->capacity; i++)
        free(map->slots[i].name);
    free(map->slots);
}

/* ---- directory listings --------------------------------------------------------------------- */

struct level {
    int fd;         /* -1 while closed to save fds */
    char *prefix;   /* the directory's name in the archive, with a slash ("" at the root) */
    size_t prefix_size;
    char *names;    /* the entries' names, NUL-terminated, one after another */
    char **sorted;  /* pointers into names, sorted by their bytes */
    size_t count;
    size_t next;
};

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int list_directory(int fd, struct level *level)
{
    struct aufs_buffer names = {0};
    char buffer[32768];
    size_t count = 0;
    int rc = 0;
    if (lseek(fd, 0, SEEK_SET) < 0)
        return -errno;
    for (;;) {
        long got = syscall(SYS_getdents64, fd, buffer, sizeof buffer);
        if (got < 0) {
            rc = -errno;
            break;
        }
        if (got == 0)
            break;
        for (long position = 0; position < got && rc == 0;) {
            struct linux_dirent64 *entry = (struct linux_dirent64 *)(buffer + position);
            position += entry->d_reclen;
            const char *name = entry->d_name;
            if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
                continue;
            rc = aufs_buffer_append(&names, name, strlen(name) + 1);
            count++;
        }
        if (rc < 0)
            break;
    }
    char **sorted = rc == 0 ? malloc((count ? count : 1) * sizeof *sorted) : NULL;
    if (rc == 0 && sorted == NULL)
        rc = -ENOMEM;
    if (rc < 0) {
        free(names.data);
        return rc;
    }
    char *name = names.data;
    for (size_t i = 0; i < count; i++) {
        sorted[i] = name;
        name += strlen(name) + 1;
    }
    qsort(sorted, count, sizeof *sorted, compare_names);
    level->names = names.data;
    level->sorted = sorted;
    level->count = count;
    level->next = 0;
    return 0;
}

static int has_name(const struct level *level, const char *name)
{
    return bsearch(&name, level->sorted, level->count, sizeof *level->sorted,
                   compare_names) != NULL;
}

/* ---- xattrs ---------------------------------------------------------------------------------- */

static int is_internal_xattr(const char *name)
{
    return starts_with(name, "trusted.overlay.") || starts_with(name, "user.overlay.") ||
           starts_with(name, "user.fuseoverlayfs.") || strcmp(name, "security.selinux") == 0;
}

/* The code point at *text as Python decodes names (UTF-8 with surrogateescape): a byte that
 * does not start a valid sequence stands for itself as U+DC80..U+DCFF. */
static uint32_t next_code_point(const unsigned char **text)
{
    const unsigned char *at = *text;
    uint32_t lead = at[0];
    size_t length = lead < 0x80 ? 1 : lead >= 0xC2 && lead <= 0xDF ? 2
                  : lead >= 0xE0 && lead <= 0xEF ? 3 : lead >= 0xF0 && lead <= 0xF4 ? 4 : 0;
    uint32_t point = length == 1 ? lead : length == 2 ? lead & 0x1F
                   : length == 3 ? lead & 0x0F : lead & 0x07;
    for (size_t i = 1; i < length; i++) {
        if ((at[i] & 0xC0) != 0x80) {
            length = 0;
            break;
        }
        point = point << 6 | (at[i] & 0x3F);
    }
    if ((length == 3 && (point < 0x800 || (point >= 0xD800 && point <= 0xDFFF))) ||
        (length == 4 && (point < 0x10000 || point > 0x10FFFF)))
        length = 0;
    if (length == 0) {
        *text = at + 1;
        return 0xDC00 + lead;
    }
    *text = at + length;
    return point;
}

/* Python's order of the decoded names: the order of their bytes when they are valid UTF-8. */
static int compare_xattrs(const void *a, const void *b)
{
    const unsigned char *left = (const unsigned char *)((const struct aufs_tar_xattr *)a)->name;
    const unsigned char *right = (const unsigned char *)((const struct aufs_tar_xattr *)b)->name;
    while (*left != '\0' && *right != '\0') {
        uint32_t x = next_code_point(&left), y = next_code_point(&right);
        if (x != y)
            return x < y ? -1 : 1;
    }
    return (*left != '\0') - (*right != '\0');
}

struct xattr_list {
    struct aufs_buffer names;
    struct aufs_buffer values;
    struct aufs_tar_xattr *items;
    size_t count, capacity;
};

/* The xattrs of fd that belong to the content, sorted by name. */
static int read_xattrs(int fd, struct xattr_list *list)
{
    list->count = 0;
    list->values.size = 0;
    ssize_t size;
    for (;;) {
        size = flistxattr(fd, NULL, 0);
        if (size < 0) {
            if (errno == ENOTSUP || errno == EOPNOTSUPP)
                return 0;
            return -errno;
        }
        if (size == 0)
            return 0;
        list->names.size = 0;
        int rc = aufs_buffer_reserve(&list->names, (size_t)size);
        if (rc < 0)
            return rc;
        size = flistxattr(fd, list->names.data, (size_t)size);
        if (size >= 0)
            break;
        if (errno != ERANGE)
            return -errno;
    }
    /* the values' buffer may move while it grows: offsets first, pointers at the end */
    for (ssize_t position = 0; position < size;) {
        const char *name = list->names.data + position;
        position += (ssize_t)strlen(name) + 1;
        if (*name == '\0' || is_internal_xattr(name))
            continue;
        if (list->count == list->capacity) {
            size_t capacity = list->capacity ? list->capacity * 2 : 8;
            struct aufs_tar_xattr *items = realloc(list->items, capacity * sizeof *items);
            if (items == NULL)
                return -ENOMEM;
            list->items = items;
            list->capacity = capacity;
        }
        ssize_t length;
        for (;;) {
            length = fgetxattr(fd, name, NULL, 0);
            if (length < 0)
                return -errno;
            int rc = aufs_buffer_reserve(&list->values, (size_t)length + 1);
            if (rc < 0)
                return rc;
            length = fgetxattr(fd, name, list->values.data + list->values.size,
                               (size_t)length + 1);
            if (length >= 0)
                break;
            if (errno != ERANGE)
                return -errno;
        }
        list->items[list->count++] = (struct aufs_tar_xattr){name, NULL, (size_t)length};
        list->values.size += (size_t)length;
    }
    size_t offset = 0;
    for (size_t i = 0; i < list->count; i++) {
        list->items[i].value = list->values.data + offset;
        offset += list->items[i].value_size;
    }
    if (list->count > 1)
        qsort(list->items, list->count, sizeof *list->items, compare_xattrs);
    return 0;
}

static int is_opaque(int fd)
{
    static const char *const marks[] = {"trusted.overlay.opaque", "user.fuseoverlayfs.opaque"};
    for (size_t i = 0; i < 2; i++) {
        char value[2];
        if (fgetxattr(fd, marks[i], value, sizeof value) == 1 && value[0] == 'y')
            return 1;
    }
    return 0;
}

/* ---- the walk ------------------------------------------------------------------------------ */

struct tar_walk {
    const struct aufs_tar_tree_options *options;
    struct aufs_io_queue *queue;
    int out_fd;
    struct aufs_buffer pending; /* headers (after the last file's padding) not yet queued */
    struct aufs_buffer pax;
    struct aufs_buffer name;      /* the current entry's name in the archive */
    struct aufs_buffer linkname;
    struct xattr_list xattrs;
    struct link_map links;
    struct level *stack;
    size_t depth, stack_capacity;
    struct aufs_tar_tree_failure *failure;
};

static int fail(struct tar_walk *walk, int rc, const char *name)
{
    snprintf(walk->failure->name, sizeof walk->failure->name, "%s", name);
    return rc;
}

/* The id in the archive of a host id, or -ERANGE (the failure names it). */
static int64_t map_id(struct tar_walk *walk, const struct aufs_id_range *ranges, size_t count,
                      uint64_t id, int kind, const char *name)
{
    if (count == 0)
        return (int64_t)id;
    for (size_t i = 0; i < count; i++)
        if (ranges[i].host_id <= id && id < (uint64_t)ranges[i].host_id + ranges[i].size)
            return (int64_t)(ranges[i].container_id + (id - ranges[i].host_id));
    walk->failure->kind = kind;
    walk->failure->id = id;
    return fail(walk, -ERANGE, name);
}

static int submit(struct tar_walk *walk, int fd, uint64_t size, const char *name)
{
    struct aufs_io_request request = {
        .fd = fd, .out_fd = walk->out_fd, .bytes = (const unsigned char *)walk->pending.data,
        .bytes_size = walk->pending.size, .copy_size = size, .close_fd = fd >= 0, .name = name};
    int rc = aufs_io_submit(walk->queue, &request);
    walk->pending.size = 0;
    if (rc < 0) {
        walk->failure->kind = AUFS_TAR_TREE_WRITE;
        return rc;
    }
    return aufs_buffer_zeros(&walk->pending, -size % 512); /* owed after the data */
}

static int emit(struct tar_walk *walk, const struct aufs_tar_entry *header)
{
    int rc = aufs_tar_build_header(&walk->pending, header, &walk->pax);
    if (rc == 0 && walk->pending.size >= FLUSH_AT)
        rc = submit(walk, -1, 0, "");
    return rc;
}

/* Sets walk->name to the level's prefix + insert + base, NUL-terminated. */
static int set_name(struct tar_walk *walk, const struct level *level, const char *insert,
                    const char *base)
{
    walk->name.size = 0;
    int rc = aufs_buffer_append(&walk->name, level->prefix, level->prefix_size);
    if (rc == 0)
        rc = aufs_buffer_append(&walk->name, insert, strlen(insert));
    if (rc == 0)
        rc = aufs_buffer_append(&walk->name, base, strlen(base));
    if (rc == 0)
        rc = aufs_buffer_append(&walk->name, "", 1);
    if (rc == 0)
        walk->name.size--; /* the NUL stays after the name */
    return rc;
}

static int read_link(struct tar_walk *walk, int parent_fd, const char *base, size_t hint)
{
    size_t capacity = hint + 2 > 256 ? hint + 2 : 256;
    for (;;) {
        walk->linkname.size = 0;
        int rc = aufs_buffer_reserve(&walk->linkname, capacity);
        if (rc < 0)
            return rc;
        ssize_t size = readlinkat(parent_fd, base, walk->linkname.data, capacity);
        if (size < 0)
            return -errno;
        if ((size_t)size < capacity) {
            walk->linkname.size = (size_t)size;
            return 0;
        }
        capacity *= 2;
    }
}

/* One entry; a directory's open fd (for its listing) is left in *directory_fd. */
/* Opens a directory or regular file of the walk (a file must still be the inode the listing
 * saw) and puts its xattrs in the header: the fd, or what fail() returns, naming the header's
 * entry. */
static int open_with_xattrs(struct tar_walk *walk, int parent_fd, const char *base,
                            const struct stat *info, struct aufs_tar_entry *header)
{
    int directory = S_ISDIR(info->st_mode);
    int fd = openat(parent_fd, base, directory ? DIR_FLAGS : READ_FLAGS);
    if (fd < 0)
        return fail(walk, -errno, header->name);
    struct stat opened;
    if (!directory && (fstat(fd, &opened) != 0 || !S_ISREG(opened.st_mode) ||
                       opened.st_dev != info->st_dev || opened.st_ino != info->st_ino)) {
        close(fd); /* another entry took its name since it was listed */
        return fail(walk, -ESTALE, header->name);
    }
    int rc = read_xattrs(fd, &walk->xattrs);
    if (rc < 0) {
        close(fd);
        return fail(walk, rc, header->name);
    }
    header->xattrs = walk->xattrs.items;
    header->xattr_count = walk->xattrs.count;
    return fd;
}

static int add_entry(struct tar_walk *walk, int parent_fd, const char *base,
                     const struct stat *info, int *directory_fd)
{
    const char *name = walk->name.data;
    struct aufs_tar_entry header = {
        .name = name, .name_size = walk->name.size, .typeflag = '0',
        .mode = info->st_mode & 07777, .uid = info->st_uid, .gid = info->st_gid,
        .mtime = (int64_t)info->st_mtim.tv_sec, .linkname = ""};
    if (!starts_with(base, WHITEOUT_PREFIX)) { /* whiteouts keep their owner (Docker) */
        const struct aufs_tar_tree_options *options = walk->options;
        int64_t uid = map_id(walk, options->uids, options->uid_count, info->st_uid,
                             AUFS_TAR_TREE_UNMAPPED_UID, name);
        int64_t gid = uid < 0 ? uid : map_id(walk, options->gids, options->gid_count,
                                             info->st_gid, AUFS_TAR_TREE_UNMAPPED_GID, name);
        if (gid < 0)
            return (int)gid;
        header.uid = (uint64_t)uid;
        header.gid = (uint64_t)gid;
    }
    mode_t mode = info->st_mode;
    int rc = 0;
    if (S_ISDIR(mode)) {
        header.typeflag = '5';
        rc = aufs_buffer_append(&walk->name, "/", 2);
        if (rc < 0)
            return rc;
        walk->name.size--;
        name = header.name = walk->name.data;
        header.name_size = walk->name.size;
    } else if (S_ISLNK(mode)) {
        header.typeflag = '2';
        rc = read_link(walk, parent_fd, base, (size_t)info->st_size);
        if (rc < 0)
            return fail(walk, rc, name);
        header.linkname = walk->linkname.data;
        header.linkname_size = walk->linkname.size;
    } else if (S_ISCHR(mode) || S_ISBLK(mode)) {
        header.typeflag = S_ISCHR(mode) ? '3' : '4';
        header.devmajor = major(info->st_rdev);
        header.devminor = minor(info->st_rdev);
    } else if (S_ISFIFO(mode)) {
        header.typeflag = '6';
    } else if (S_ISSOCK(mode)) {
        return 0; /* tar cannot hold it */
    }
    if (!S_ISDIR(mode) && info->st_nlink > 1 && !starts_with(base, WHITEOUT_PREFIX)) {
        if ((walk->links.count + 1) * 2 > walk->links.capacity && (rc = link_grow(&walk->links)))
            return rc;
        struct link_slot *slot = link_find(&walk->links, info->st_dev, info->st_ino);
        if (slot->name != NULL) {
            header.typeflag = '1';
            header.linkname = slot->name;
            header.linkname_size = strlen(slot->name);
            return emit(walk, &header);
        }
        *slot = (struct link_slot){info->st_dev, info->st_ino, strdup(name)};
        if (slot->name == NULL)
            return -ENOMEM;
        walk->links.count++;
    }
    if (S_ISDIR(mode)) {
        int fd = open_with_xattrs(walk, parent_fd, base, info, &header);
        if (fd < 0)
            return fd;
        rc = emit(walk, &header);
        if (rc < 0) {
            close(fd);
            return rc;
        }
        *directory_fd = fd;
        return 0;
    }
    if (!S_ISREG(mode))
        return emit(walk, &header);
    header.size = (uint64_t)info->st_size;
    int fd = open_with_xattrs(walk, parent_fd, base, info, &header);
    if (fd < 0)
        return fd;
    rc = aufs_tar_build_header(&walk->pending, &header, &walk->pax);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    return submit(walk, fd, header.size, name);
}

/* Puts fd on the stack, where pop_level closes it; when that fails, fd is closed here if
 * `owned` (a child's, not the caller's root). */
static int push_level(struct tar_walk *walk, int fd, const char *prefix, size_t prefix_size,
                      int owned)
{
    if (walk->depth == walk->stack_capacity) {
        size_t capacity = walk->stack_capacity ? walk->stack_capacity * 2 : 16;
        struct level *stack = realloc(walk->stack, capacity * sizeof *stack);
        if (stack == NULL) {
            if (owned)
                close(fd);
            return -ENOMEM;
        }
        walk->stack = stack;
        walk->stack_capacity = capacity;
    }
    struct level *level = &walk->stack[walk->depth];
    memset(level, 0, sizeof *level);
    level->fd = fd;
    level->prefix = malloc(prefix_size + 1);
    if (level->prefix == NULL) {
        if (owned)
            close(fd);
        return -ENOMEM;
    }
    memcpy(level->prefix, prefix, prefix_size);
    level->prefix[prefix_size] = '\0';
    level->prefix_size = prefix_size;
    walk->depth++;
    int rc = list_directory(fd, level);
    if (rc < 0)
        return fail(walk, rc, prefix);
    return 0;
}

static void pop_level(struct tar_walk *walk, int root_fd)
{
    struct level *level = &walk->stack[--walk->depth];
    if (level->fd >= 0 && level->fd != root_fd)
        close(level->fd);
    free(level->prefix);
    free(level->names);
    free(level->sorted);
}

/* The deepest level's fd, opened again below its nearest open ancestor one level at a time.
 * The deepest `open_levels` levels on the way stay open, so that the walk back up opens again
 * once every `open_levels` levels, not at each one. */
static int reopen(struct tar_walk *walk)
{
    size_t deepest = walk->depth - 1, index = deepest;
    while (walk->stack[index].fd < 0)
        index--;
    size_t open_levels = walk->options->open_levels;
    size_t keep_from = deepest + 1 > open_levels ? deepest + 1 - open_levels : 0;
    int fd = walk->stack[index].fd;
    for (size_t level = index + 1; level <= deepest; level++) {
        /* the component: this level's prefix past its parent's, its slash cut for the call */
        struct level *here = &walk->stack[level];
        here->prefix[here->prefix_size - 1] = '\0';
        int next = openat(fd, here->prefix + walk->stack[level - 1].prefix_size, DIR_FLAGS);
        int error = errno;
        here->prefix[here->prefix_size - 1] = '/';
        if (level - 1 > index) { /* an fd opened here: kept for its level, or closed */
            if (level - 1 >= keep_from)
                walk->stack[level - 1].fd = fd;
            else
                close(fd);
        }
        if (next < 0)
            return fail(walk, -error, here->prefix);
        fd = next;
    }
    walk->stack[deepest].fd = fd;
    return fd;
}

static int walk_tree(struct tar_walk *walk, int root_fd)
{
    const struct aufs_tar_tree_options *options = walk->options;
    int rc = push_level(walk, root_fd, "", 0, 0);
    while (rc == 0 && walk->depth > 0) {
        struct level *level = &walk->stack[walk->depth - 1];
        if (level->next == level->count) {
            pop_level(walk, root_fd);
            continue;
        }
        const char *base = level->sorted[level->next++];
        int parent_fd = level->fd >= 0 ? level->fd : reopen(walk);
        if (parent_fd < 0)
            return parent_fd;
        if (options->skip_aufs_metadata && level->prefix_size == 0 &&
            starts_with(base, META_PREFIX) && strcmp(base, OPAQUE_MARKER) != 0)
            continue;
        if ((rc = set_name(walk, level, "", base)) < 0)
            return rc;
        struct stat info;
        if (fstatat(parent_fd, base, &info, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno == ENOENT)
                continue;
            return fail(walk, -errno, walk->name.data);
        }
        if (options->convert_whiteouts && S_ISCHR(info.st_mode) && info.st_rdev == 0) {
            if (starts_with(base, WHITEOUT_PREFIX))
                continue; /* fuse-overlayfs' .wh..opq device */
            if ((rc = set_name(walk, level, WHITEOUT_PREFIX, base)) < 0)
                return rc;
            struct aufs_tar_entry header = {
                .name = walk->name.data, .name_size = walk->name.size, .typeflag = '0',
                .mode = 0600, .uid = info.st_uid, .gid = info.st_gid,
                .mtime = (int64_t)info.st_mtim.tv_sec, .linkname = ""};
            rc = emit(walk, &header);
            continue;
        }
        int child_fd = -1;
        if ((rc = add_entry(walk, parent_fd, base, &info, &child_fd)) < 0)
            break;
        if (child_fd < 0)
            continue;
        /* walk->name is the directory's name with its slash */
        if ((rc = push_level(walk, child_fd, walk->name.data, walk->name.size, 1)) < 0)
            return rc;
        struct level *child = &walk->stack[walk->depth - 1];
        if (options->convert_whiteouts && is_opaque(child_fd) && !has_name(child, OPAQUE_MARKER)) {
            if ((rc = set_name(walk, child, "", OPAQUE_MARKER)) < 0)
                return rc;
            struct aufs_tar_entry header = {
                .name = walk->name.data, .name_size = walk->name.size, .typeflag = '0',
                .mode = info.st_mode & 0777, .uid = info.st_uid, .gid = info.st_gid,
                .linkname = ""};
            rc = emit(walk, &header);
        }
        if (walk->depth > options->open_levels + 1) { /* the root stays open: the anchor */
            struct level *shallow = &walk->stack[walk->depth - options->open_levels - 1];
            if (shallow->fd >= 0 && shallow->fd != root_fd) {
                close(shallow->fd);
                shallow->fd = -1;
            }
        }
    }
    return rc;
}

int aufs_tar_tree(int root_fd, int out_fd, const struct aufs_tar_tree_options *options,
                  struct aufs_tar_tree_failure *failure)
{
    struct tar_walk walk = {.options = options, .out_fd = out_fd, .failure = failure};
    memset(failure, 0, sizeof *failure);
    int rc = aufs_io_open(&walk.queue, 256, 64 << 20);
    if (rc < 0)
        return rc;
    rc = walk_tree(&walk, root_fd);
    if (rc == 0)
        rc = aufs_buffer_zeros(&walk.pending, 1024);
    if (rc == 0)
        rc = submit(&walk, -1, 0, "");
    while (walk.depth > 0)
        pop_level(&walk, root_fd);
    char name[sizeof failure->name];
    int io_rc = aufs_io_close(walk.queue, name, sizeof name);
    if (io_rc < 0 && (rc == 0 || failure->kind == AUFS_TAR_TREE_WRITE)) {
        rc = io_rc; /* the job's own failure, with its name */
        failure->kind = AUFS_TAR_TREE_WRITE;
        snprintf(failure->name, sizeof failure->name, "%s", name);
    }
    free(walk.stack);
    free(walk.pending.data);
    free(walk.pax.data);
    free(walk.name.data);
    free(walk.linkname.data);
    free(walk.xattrs.names.data);
    free(walk.xattrs.values.data);
    free(walk.xattrs.items);
    link_free(&walk.links);
    return rc;
}
