/*
 * One record of getdents64(2), which glibc does not declare. Private to csrc/ (the walkers of
 * dirsize.c and tartree.c); the public C API is aufs_core.h.
 */
#ifndef AUFS_DENTS_H
#define AUFS_DENTS_H

#include <stdint.h>

struct linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

#endif /* AUFS_DENTS_H */
