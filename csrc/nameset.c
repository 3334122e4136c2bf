/*
 * A set of names by keyed fingerprint, for tar-split's check that no name comes twice in a
 * layer: once per member while the layer is applied, so it must cost little, and it takes
 * untrusted names, so an archive must not be able to make it slow. Each name goes in as its
 * SipHash-1-3 under a random key (an archive cannot aim names at one slot without the key),
 * into an open-addressing table kept at most half full. The fingerprints are added a batch
 * at a time, the slots of those ahead fetched early: one lookup misses the cache (the table
 * is bigger than what unpacking leaves of it), several in a row overlap. Two different names whose 64-bit
 * fingerprints agree count as the same name: the caller then records nothing for the layer,
 * as it does for a real duplicate, which any archive can hold anyway.
 */
#include "aufs_core.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define ROTATE(value, bits) (((value) << (bits)) | ((value) >> (64 - (bits))))
#define SIP_ROUND(v0, v1, v2, v3)                                                   \
    do {                                                                            \
        v0 += v1; v1 = ROTATE(v1, 13); v1 ^= v0; v0 = ROTATE(v0, 32);               \
        v2 += v3; v3 = ROTATE(v3, 16); v3 ^= v2;                                    \
        v0 += v3; v3 = ROTATE(v3, 21); v3 ^= v0;                                    \
        v2 += v1; v1 = ROTATE(v1, 17); v1 ^= v2; v2 = ROTATE(v2, 32);               \
    } while (0)

static uint64_t load_le64(const unsigned char *data)
{
    uint64_t word = 0;
    for (int index = 7; index >= 0; index--)
        word = (word << 8) | data[index];
    return word;
}

uint64_t aufs_siphash13(const uint64_t key[2], const void *data, size_t size)
{
    const unsigned char *bytes = data;
    uint64_t v0 = key[0] ^ 0x736f6d6570736575ULL, v1 = key[1] ^ 0x646f72616e646f6dULL;
    uint64_t v2 = key[0] ^ 0x6c7967656e657261ULL, v3 = key[1] ^ 0x7465646279746573ULL;
    size_t done = 0;
    for (; done + 8 <= size; done += 8) {
        uint64_t word = load_le64(bytes + done);
        v3 ^= word;
        SIP_ROUND(v0, v1, v2, v3);
        v0 ^= word;
    }
    uint64_t last = (uint64_t)size << 56;
    for (size_t index = 0; done + index < size; index++)
        last |= (uint64_t)bytes[done + index] << (8 * index);
    v3 ^= last;
    SIP_ROUND(v0, v1, v2, v3);
    v0 ^= last;
    v2 ^= 0xff;
    SIP_ROUND(v0, v1, v2, v3);
    SIP_ROUND(v0, v1, v2, v3);
    SIP_ROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

static int grow(struct aufs_name_set *set, size_t wanted)
{
    size_t capacity = set->capacity ? set->capacity : 1024;
    while (2 * wanted > capacity)
        capacity *= 2;
    if (capacity == set->capacity)
        return 0;
    uint64_t *slots = calloc(capacity, sizeof(uint64_t));
    if (slots == NULL)
        return -ENOMEM;
    for (size_t index = 0; index < set->capacity; index++) {
        uint64_t fingerprint = set->slots[index];
        if (!fingerprint)
            continue;
        size_t slot = fingerprint & (capacity - 1);
        while (slots[slot])
            slot = (slot + 1) & (capacity - 1);
        slots[slot] = fingerprint;
    }
    free(set->slots);
    set->slots = slots;
    set->capacity = capacity;
    return 0;
}

uint64_t aufs_name_fingerprint(const struct aufs_name_set *set, const void *name, size_t size)
{
    uint64_t fingerprint = aufs_siphash13(set->key, name, size);
    return fingerprint ? fingerprint : 1; /* 0 marks an empty slot */
}

ssize_t aufs_name_set_add(struct aufs_name_set *set, const uint64_t *fingerprints, size_t count)
{
    int rc = grow(set, set->count + count);
    if (rc < 0)
        return rc;
    size_t mask = set->capacity - 1;
    ssize_t first_seen = -1;
    for (size_t index = 0; index < count; index++) {
        if (index + 8 < count)
            __builtin_prefetch(&set->slots[fingerprints[index + 8] & mask]);
        uint64_t fingerprint = fingerprints[index];
        size_t slot = fingerprint & mask;
        while (set->slots[slot] && set->slots[slot] != fingerprint)
            slot = (slot + 1) & mask;
        if (set->slots[slot]) {
            if (first_seen < 0)
                first_seen = (ssize_t)index;
            continue;
        }
        set->slots[slot] = fingerprint;
        set->count++;
    }
    return first_seen;
}

void aufs_name_set_free(struct aufs_name_set *set)
{
    free(set->slots);
    set->slots = NULL;
    set->capacity = set->count = 0;
}
