/*
 * Thin, errno-returning wrappers around the mount-related syscalls.
 */
#define _GNU_SOURCE
#include "aufs_core.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x00001000U
#endif
#ifndef STATX_ATTR_MOUNT_ROOT
#define STATX_ATTR_MOUNT_ROOT 0x00002000
#endif

/* The new mount API (Linux 5.2); spelled out because libc headers may predate it. */
#ifndef SYS_fsopen
#define SYS_fsopen 430
#define SYS_fsconfig 431
#define SYS_fsmount 432
#define SYS_move_mount 429
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef SYS_renameat2
#error "renameat2 syscall number unknown on this architecture"
#endif
#define AUFS_FSOPEN_CLOEXEC 0x1
#define AUFS_FSCONFIG_SET_FLAG 0
#define AUFS_FSCONFIG_SET_STRING 1
#define AUFS_FSCONFIG_CMD_CREATE 6
#define AUFS_FSMOUNT_CLOEXEC 0x1
#define AUFS_MOVE_MOUNT_F_EMPTY_PATH 0x4

int aufs_mount(const char *source, const char *target, const char *fstype, unsigned long flags,
               const char *data)
{
    return mount(source, target, fstype, flags, data) == 0 ? 0 : -errno;
}

int aufs_unmount(const char *target, int flags)
{
    return umount2(target, flags) == 0 ? 0 : -errno;
}

int aufs_fs_magic(const char *path, uint32_t *magic)
{
    struct statfs info;
    if (statfs(path, &info) != 0)
        return -errno;
    /* f_type is signed on some ABIs; Docker compares it as uint32. */
    *magic = (uint32_t)info.f_type;
    return 0;
}

/* Before Linux 5.8 statx has no mount-root attribute: compare with the parent instead. */
static int is_mountpoint_by_parent(const char *path, const struct statx *self)
{
    char parent[4096];
    struct statx above;
    int length = snprintf(parent, sizeof parent, "%s/..", path);
    if (length < 0 || (size_t)length >= sizeof parent)
        return -ENAMETOOLONG;
    if (statx(AT_FDCWD, parent, AT_NO_AUTOMOUNT, STATX_INO | STATX_MNT_ID, &above) != 0)
        return -errno;
    if ((self->stx_mask & STATX_MNT_ID) && (above.stx_mask & STATX_MNT_ID))
        return self->stx_mnt_id != above.stx_mnt_id;
    if (self->stx_dev_major != above.stx_dev_major || self->stx_dev_minor != above.stx_dev_minor)
        return 1;
    return self->stx_ino == above.stx_ino; /* "/" is its own parent */
}

int aufs_is_mountpoint(const char *path)
{
    struct statx self;
    if (statx(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT,
              STATX_TYPE | STATX_INO | STATX_MNT_ID, &self) != 0)
        return -errno;
    if (self.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT)
        return (self.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0;
    if (S_ISLNK(self.stx_mode))
        return 0;
    return is_mountpoint_by_parent(path, &self);
}

/* The fs context keeps the kernel's reasons as "e <text>" lines; keep the last error. */
static void read_context_message(int context, char *message, size_t message_size)
{
    char line[512];
    ssize_t length;
    if (message == NULL || message_size == 0)
        return;
    while ((length = read(context, line, sizeof line - 1)) > 0) {
        line[length] = '\0';
        if (line[0] == 'e' && line[1] == ' ')
            snprintf(message, message_size, "%s", line + 2);
        else if (message[0] == '\0' && length > 2)
            snprintf(message, message_size, "%s", line + 2);
    }
}

int aufs_fsmount(const char *fstype, const char *source, const struct aufs_fs_param *params,
                 size_t param_count, unsigned int attr_flags, const char *target, char *message,
                 size_t message_size)
{
    int context, mount_fd = -1, error = 0;

    if (message != NULL && message_size > 0)
        message[0] = '\0';
    context = (int)syscall(SYS_fsopen, fstype, AUFS_FSOPEN_CLOEXEC);
    if (context < 0)
        return -errno;
    if (source != NULL &&
        syscall(SYS_fsconfig, context, AUFS_FSCONFIG_SET_STRING, "source", source, 0) != 0)
        error = errno;
    for (size_t i = 0; error == 0 && i < param_count; i++) {
        unsigned int command = params[i].value ? AUFS_FSCONFIG_SET_STRING : AUFS_FSCONFIG_SET_FLAG;
        if (syscall(SYS_fsconfig, context, command, params[i].key, params[i].value, 0) != 0)
            error = errno;
    }
    if (error == 0 &&
        syscall(SYS_fsconfig, context, AUFS_FSCONFIG_CMD_CREATE, NULL, NULL, 0) != 0)
        error = errno;
    if (error == 0) {
        mount_fd = (int)syscall(SYS_fsmount, context, AUFS_FSMOUNT_CLOEXEC, attr_flags);
        if (mount_fd < 0)
            error = errno;
    }
    if (error == 0 && syscall(SYS_move_mount, mount_fd, "", AT_FDCWD, target,
                              AUFS_MOVE_MOUNT_F_EMPTY_PATH) != 0)
        error = errno;
    if (error != 0)
        read_context_message(context, message, message_size);
    if (mount_fd >= 0)
        close(mount_fd);
    close(context);
    return -error;
}

int aufs_openat2(int dirfd, const char *path, int flags, unsigned int mode,
                 unsigned long long resolve)
{
    struct {
        uint64_t flags;
        uint64_t mode;
        uint64_t resolve;
    } how = {(uint64_t)(unsigned int)flags, mode, resolve};
    long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    return fd < 0 ? -errno : (int)fd;
}

int aufs_renameat2(int old_dirfd, const char *old_path, int new_dirfd, const char *new_path,
                   unsigned int flags)
{
    return syscall(SYS_renameat2, old_dirfd, old_path, new_dirfd, new_path, flags) == 0 ? 0
                                                                                         : -errno;
}
