/*
 * Tar headers built in C, the twin of aufs.archive.format.build_header: ustar blocks, with a
 * PAX header in front when ustar cannot hold a member (and, as there, no GNU extensions).
 */
#define _GNU_SOURCE
#include "tarbuild.h"

#include <errno.h>
#include <linux/limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

/* ---- a growing byte buffer ------------------------------------------------------------------ */

int aufs_buffer_reserve(struct aufs_buffer *buffer, size_t more)
{
    if (buffer->size + more <= buffer->capacity)
        return 0;
    size_t capacity = buffer->capacity ? buffer->capacity : 4096;
    while (capacity < buffer->size + more)
        capacity *= 2;
    char *data = realloc(buffer->data, capacity);
    if (data == NULL)
        return -ENOMEM;
    buffer->data = data;
    buffer->capacity = capacity;
    return 0;
}

int aufs_buffer_append(struct aufs_buffer *buffer, const void *data, size_t size)
{
    int rc = aufs_buffer_reserve(buffer, size);
    if (rc == 0 && size > 0) {
        memcpy(buffer->data + buffer->size, data, size);
        buffer->size += size;
    }
    return rc;
}

int aufs_buffer_zeros(struct aufs_buffer *buffer, size_t size)
{
    int rc = aufs_buffer_reserve(buffer, size);
    if (rc == 0) {
        memset(buffer->data + buffer->size, 0, size);
        buffer->size += size;
    }
    return rc;
}

static int is_ascii(const char *text, size_t size)
{
    for (size_t i = 0; i < size; i++)
        if ((unsigned char)text[i] >= 0x80)
            return 0;
    return 1;
}

/* ---- headers -------------------------------------------------------------------------------- */

/* "<length> <key>=<value>\n", the length counting itself. */
static int pax_record(struct aufs_buffer *out, const char *key, const char *value,
                      size_t value_size)
{
    size_t body = 1 + strlen(key) + 1 + value_size + 1;
    size_t length = body + 1;
    char digits[24];
    for (;;) {
        size_t width = (size_t)snprintf(digits, sizeof digits, "%zu", length);
        if (width + body == length)
            break;
        length = width + body;
    }
    int rc = aufs_buffer_append(out, digits, strlen(digits));
    if (rc == 0)
        rc = aufs_buffer_append(out, " ", 1);
    if (rc == 0)
        rc = aufs_buffer_append(out, key, strlen(key));
    if (rc == 0)
        rc = aufs_buffer_append(out, "=", 1);
    if (rc == 0)
        rc = aufs_buffer_append(out, value, value_size);
    if (rc == 0)
        rc = aufs_buffer_append(out, "\n", 1);
    return rc;
}

static int pax_number(struct aufs_buffer *out, const char *key, long long value)
{
    char digits[24];
    int width = snprintf(digits, sizeof digits, "%lld", value);
    return pax_record(out, key, digits, (size_t)width);
}

/* The ustar (prefix, name) cut of a name longer than 100 bytes: the prefix's length, or -1. */
static ssize_t ustar_cut(const char *name, size_t size)
{
    size_t limit = size < 156 ? size : 156;
    for (size_t cut = limit; cut-- > 1;)
        if (name[cut] == '/' && size - cut - 1 <= 100)
            return (ssize_t)cut;
    return -1;
}

static void put_octal(char *field, size_t width, uint64_t value)
{
    snprintf(field, width, "%0*llo", (int)(width - 1), (unsigned long long)value);
}

static int ustar_block(struct aufs_buffer *out, const struct aufs_tar_entry *header,
                       const char *prefix, size_t prefix_size, const char *name, size_t name_size,
                       const char *linkname, size_t linkname_size, uint64_t uid, uint64_t gid,
                       uint64_t size, uint64_t mtime)
{
    int rc = aufs_buffer_reserve(out, 512);
    if (rc < 0)
        return rc;
    unsigned char *block = (unsigned char *)out->data + out->size;
    memset(block, 0, 512);
    memcpy(block, name, name_size);
    put_octal((char *)block + 100, 8, header->mode & 07777);
    put_octal((char *)block + 108, 8, uid);
    put_octal((char *)block + 116, 8, gid);
    put_octal((char *)block + 124, 12, size);
    put_octal((char *)block + 136, 12, mtime);
    memset(block + 148, ' ', 8);
    block[156] = (unsigned char)header->typeflag;
    memcpy(block + 157, linkname, linkname_size);
    memcpy(block + 257, "ustar\0" "00", 8);
    put_octal((char *)block + 329, 8, header->devmajor);
    put_octal((char *)block + 337, 8, header->devminor);
    memcpy(block + 345, prefix, prefix_size);
    unsigned sum = 0;
    for (int i = 0; i < 512; i++)
        sum += block[i];
    snprintf((char *)block + 148, 8, "%06o", sum);
    block[155] = ' ';
    out->size += 512;
    return 0;
}

#define OCTAL8_LIMIT 2097152ULL     /* 8**7 */
#define OCTAL12_LIMIT 8589934592ULL /* 8**11 */

int aufs_tar_build_header(struct aufs_buffer *out, const struct aufs_tar_entry *header,
                          struct aufs_buffer *pax)
{
    pax->size = 0;
    int rc = 0;
    const char *prefix = "", *name = header->name;
    size_t prefix_size = 0, name_size = header->name_size;
    ssize_t cut = -1;
    if (is_ascii(header->name, header->name_size))
        cut = header->name_size <= 100 ? 0 : ustar_cut(header->name, header->name_size);
    if (cut < 0) {
        rc = pax_record(pax, "path", header->name, header->name_size);
        name_size = name_size < 100 ? name_size : 100;
    } else if (cut > 0) {
        prefix = header->name;
        prefix_size = (size_t)cut;
        name = header->name + cut + 1;
        name_size = header->name_size - (size_t)cut - 1;
    }
    size_t linkname_size = header->linkname_size;
    if (rc == 0 && (linkname_size > 100 || !is_ascii(header->linkname, linkname_size))) {
        rc = pax_record(pax, "linkpath", header->linkname, linkname_size);
        linkname_size = linkname_size < 100 ? linkname_size : 100;
    }
    uint64_t uid = header->uid, gid = header->gid, size = header->size, mtime = 0;
    if (rc == 0 && uid >= OCTAL8_LIMIT) {
        rc = pax_number(pax, "uid", (long long)uid);
        uid = 0;
    }
    if (rc == 0 && gid >= OCTAL8_LIMIT) {
        rc = pax_number(pax, "gid", (long long)gid);
        gid = 0;
    }
    if (rc == 0 && size >= OCTAL12_LIMIT) {
        rc = pax_number(pax, "size", (long long)size);
        size = 0;
    }
    if (header->mtime >= 0 && (uint64_t)header->mtime < OCTAL12_LIMIT)
        mtime = (uint64_t)header->mtime;
    else if (rc == 0)
        rc = pax_number(pax, "mtime", (long long)header->mtime);
    char key[16 + XATTR_NAME_MAX];
    for (size_t i = 0; rc == 0 && i < header->xattr_count; i++) {
        snprintf(key, sizeof key, "SCHILY.xattr.%s", header->xattrs[i].name);
        rc = pax_record(pax, key, header->xattrs[i].value, header->xattrs[i].value_size);
    }
    if (rc < 0)
        return rc;
    if (pax->size > 0) {
        struct aufs_tar_entry pax_header = {.name = "PaxHeader", .name_size = 9, .typeflag = 'x',
                                          .mode = 0644, .size = pax->size, .linkname = ""};
        rc = ustar_block(out, &pax_header, "", 0, "PaxHeader", 9, "", 0, 0, 0, pax->size, 0);
        if (rc == 0)
            rc = aufs_buffer_append(out, pax->data, pax->size);
        if (rc == 0)
            rc = aufs_buffer_zeros(out, -pax->size % 512);
        if (rc < 0)
            return rc;
    }
    return ustar_block(out, header, prefix, prefix_size, name, name_size, header->linkname,
                       linkname_size, uid, gid, size, mtime);
}

