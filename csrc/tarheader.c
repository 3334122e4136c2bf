/*
 * One ustar/GNU header block: checksum and fields, strictly (only octal digits, or GNU
 * base-256). aufs/_fallback.py's parse_tar_header is the spec; on any doubt this returns an
 * error and the caller asks the spec for the exact reason.
 */
#include "aufs_core.h"

#include <errno.h>
#include <string.h>

static size_t bounded_length(const unsigned char *field, size_t size)
{
    const unsigned char *end = memchr(field, 0, size);
    return end ? (size_t)(end - field) : size;
}

/* An octal field: digits between optional spaces, ended by NUL or the field's end. */
static int parse_octal(const unsigned char *field, size_t size, int64_t *value)
{
    size_t length = bounded_length(field, size), start = 0;
    uint64_t result = 0;
    while (start < length && field[start] == ' ')
        start++;
    while (length > start && field[length - 1] == ' ')
        length--;
    for (size_t i = start; i < length; i++) {
        if (field[i] < '0' || field[i] > '7')
            return -EINVAL;
        if (result >> 60)
            return -ERANGE;
        result = result * 8 + (uint64_t)(field[i] - '0');
    }
    *value = (int64_t)result;
    return 0;
}

static int parse_number(const unsigned char *field, size_t size, int64_t *value)
{
    if (!(field[0] & 0x80))
        return parse_octal(field, size, value);
    if (field[0] != 0x80) /* negative or malformed base-256: let the spec decide */
        return -ERANGE;
    uint64_t result = 0;
    for (size_t i = 1; i < size; i++) {
        if (result >> 55)
            return -ERANGE;
        result = (result << 8) | field[i];
    }
    if (result > INT64_MAX)
        return -ERANGE;
    *value = (int64_t)result;
    return 0;
}

int aufs_tar_parse_header(const unsigned char *block, struct aufs_tar_header *header)
{
    int64_t stored;
    uint64_t sum = 8 * ' ';
    for (size_t i = 0; i < 512; i++)
        if (i < 148 || i >= 156)
            sum += block[i];
    if (bounded_length(block + 148, 8) == 0 || parse_octal(block + 148, 8, &stored) != 0 ||
        (uint64_t)stored != sum)
        return -EBADMSG; /* includes old signed-sum writers: the spec handles those */

    int64_t mode, mtime;
    if (parse_number(block + 100, 8, &mode) || parse_number(block + 108, 8, &header->uid) ||
        parse_number(block + 116, 8, &header->gid) ||
        parse_number(block + 124, 12, &header->size) || parse_number(block + 136, 12, &mtime))
        return -EINVAL;
    header->mode = (uint32_t)(mode & 07777);
    header->mtime = mtime;
    header->typeflag = (char)block[156];
    header->devmajor = header->devminor = 0;
    if (header->typeflag == '3' || header->typeflag == '4') {
        int64_t major, minor;
        if (parse_number(block + 329, 8, &major) || parse_number(block + 337, 8, &minor))
            return -EINVAL;
        header->devmajor = major;
        header->devminor = minor;
    }
    size_t name_length = bounded_length(block, 100);
    header->name_length = 0;
    if (memcmp(block + 257, "ustar\0", 6) == 0 && block[345] != 0) {
        size_t prefix_length = bounded_length(block + 345, 155);
        memcpy(header->name, block + 345, prefix_length);
        header->name[prefix_length] = '/';
        header->name_length = prefix_length + 1;
    }
    memcpy(header->name + header->name_length, block, name_length);
    header->name_length += name_length;
    header->linkname_length = bounded_length(block + 157, 100);
    memcpy(header->linkname, block + 157, header->linkname_length);
    header->gnu = memcmp(block + 257, "ustar  \0", 8) == 0;
    return 0;
}
