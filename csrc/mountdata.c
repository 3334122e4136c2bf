/*
 * Docker's aufs mount data, to the byte.
 *
 * The kernel copies at most one page of mount options, so Docker fills one page with as many
 * branches as fit, then adds the rest with MS_REMOUNT "append:" chunks of the same capacity.
 * The capacity keeps room for the options that follow the branches (see aufs_core.h).
 */
#include "aufs_core.h"

#include <errno.h>
#include <string.h>

static const char XINO_OPTIONS[] = ",dio,xino=/dev/shm/aufs.xino";
static const char DIRPERM1_OPTION[] = ",dirperm1";

struct text {
    char *data;
    size_t length;
    size_t size;
};

static int text_append(struct text *text, const char *piece, size_t piece_length)
{
    if (text->length + piece_length >= text->size)
        return -ENOBUFS;
    memcpy(text->data + text->length, piece, piece_length);
    text->length += piece_length;
    text->data[text->length] = '\0';
    return 0;
}

static int text_append_string(struct text *text, const char *piece)
{
    return text_append(text, piece, strlen(piece));
}

/* ':' ',' and '=' would split a branch path inside aufs' option parser. */
static int branch_path_is_valid(const char *path)
{
    return strpbrk(path, ":,=") == NULL;
}

static int branches_are_valid(const char *const *ro, size_t ro_count)
{
    for (size_t i = 0; i < ro_count; i++)
        if (ro[i] == NULL || !branch_path_is_valid(ro[i]))
            return 0;
    return 1;
}

/* The label goes inside context="..." unescaped, as Docker writes it. */
static int label_is_valid(const char *label)
{
    for (const unsigned char *c = (const unsigned char *)label; *c; c++)
        if (*c == '"' || *c == '\\' || *c < 0x20 || *c == 0x7f)
            return 0;
    return 1;
}

static ssize_t branch_capacity(const char *label, int dirperm1, size_t page_size)
{
    size_t reserved = strlen(label) + AUFS_MOUNT_DATA_RESERVE;
    if (dirperm1)
        reserved += AUFS_DIRPERM1_RESERVE;
    if (page_size <= reserved)
        return -EINVAL;
    return (ssize_t)(page_size - reserved);
}

static int append_label(struct text *text, const char *label)
{
    int rc = 0;
    if (label[0] != '\0') {
        rc = text_append_string(text, ",context=\"");
        if (rc == 0)
            rc = text_append_string(text, label);
        if (rc == 0)
            rc = text_append(text, "\"", 1);
    }
    return rc;
}

ssize_t aufs_first_mount_data(char *out, size_t out_size, const char *rw,
                              const char *const *ro, size_t ro_count, const char *label,
                              int dirperm1, size_t page_size, size_t *consumed)
{
    struct text text = {out, 0, out_size};
    size_t taken = 0;
    ssize_t capacity;
    int rc;

    if (label == NULL)
        label = "";
    if (rw == NULL || out == NULL || out_size == 0 || !branch_path_is_valid(rw) ||
        !branches_are_valid(ro, ro_count) || !label_is_valid(label))
        return -EINVAL;
    capacity = branch_capacity(label, dirperm1, page_size);
    if (capacity < 0)
        return capacity;
    if (strlen(rw) + 6 > (size_t)capacity)
        return -ENAMETOOLONG;

    out[0] = '\0';
    rc = text_append_string(&text, "br:");
    if (rc == 0)
        rc = text_append_string(&text, rw);
    if (rc == 0)
        rc = text_append_string(&text, "=rw");
    for (; rc == 0 && taken < ro_count; taken++) {
        size_t item_length = 1 + strlen(ro[taken]) + 6; /* ":" path "=ro+wh" */
        if (text.length + item_length > (size_t)capacity)
            break;
        rc = text_append(&text, ":", 1);
        if (rc == 0)
            rc = text_append_string(&text, ro[taken]);
        if (rc == 0)
            rc = text_append_string(&text, "=ro+wh");
    }
    if (rc == 0)
        rc = text_append_string(&text, XINO_OPTIONS);
    if (rc == 0 && dirperm1)
        rc = text_append_string(&text, DIRPERM1_OPTION);
    if (rc == 0)
        rc = append_label(&text, label);
    if (rc < 0)
        return rc;
    if (consumed != NULL)
        *consumed = taken;
    return (ssize_t)text.length;
}

ssize_t aufs_remount_data(char *out, size_t out_size, const char *const *ro, size_t ro_count,
                          const char *label, int dirperm1, size_t page_size, size_t *consumed)
{
    struct text text = {out, 0, out_size};
    size_t taken = 0;
    ssize_t capacity;
    int rc = 0;

    if (label == NULL)
        label = "";
    if (out == NULL || out_size == 0 || !branches_are_valid(ro, ro_count) ||
        !label_is_valid(label))
        return -EINVAL;
    capacity = branch_capacity(label, dirperm1, page_size);
    if (capacity < 0)
        return capacity;

    out[0] = '\0';
    for (; rc == 0 && taken < ro_count; taken++) {
        size_t item_length = 7 + strlen(ro[taken]) + 7; /* "append:" path "=ro+wh," */
        if (text.length + item_length > (size_t)capacity)
            break;
        rc = text_append_string(&text, "append:");
        if (rc == 0)
            rc = text_append_string(&text, ro[taken]);
        if (rc == 0)
            rc = text_append_string(&text, "=ro+wh,");
    }
    if (rc == 0 && taken == 0 && ro_count > 0)
        return -ENAMETOOLONG;
    if (rc == 0)
        rc = append_label(&text, label);
    if (rc < 0)
        return rc;
    if (consumed != NULL)
        *consumed = taken;
    return (ssize_t)text.length;
}
