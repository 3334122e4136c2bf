/*
 * Building tar headers in C (shared by tartree.c): the twin of format.build_header, byte for
 * byte. Private to csrc/; the public C API is aufs_core.h.
 */
#ifndef AUFS_TARBUILD_H
#define AUFS_TARBUILD_H

#include <stddef.h>
#include <stdint.h>

/* A growing byte buffer; zeroed to start, data freed by its owner. */
struct aufs_buffer {
    char *data;
    size_t size;
    size_t capacity;
};

/* Make room for `more` bytes; -ENOMEM. */
int aufs_buffer_reserve(struct aufs_buffer *buffer, size_t more);
int aufs_buffer_append(struct aufs_buffer *buffer, const void *data, size_t size);
int aufs_buffer_zeros(struct aufs_buffer *buffer, size_t size);

struct aufs_tar_xattr {
    const char *name;
    const char *value;
    size_t value_size;
};

/* One member as format.TarHeader gives it (no uname, gname nor atime). */
struct aufs_tar_entry {
    const char *name;
    size_t name_size;
    char typeflag;
    uint32_t mode;
    uint64_t uid, gid, size;
    int64_t mtime; /* seconds */
    const char *linkname;
    size_t linkname_size;
    uint64_t devmajor, devminor;
    const struct aufs_tar_xattr *xattrs; /* sorted by name */
    size_t xattr_count;
};

/*
 * Appends the blocks of one member's header to `out`: a PAX header first when ustar cannot hold
 * it (a long or non-ASCII name or link, an id, size or time out of octal range, xattrs).
 * `pax` is scratch space, reused between calls.
 */
int aufs_tar_build_header(struct aufs_buffer *out, const struct aufs_tar_entry *entry,
                          struct aufs_buffer *pax);

#endif /* AUFS_TARBUILD_H */
