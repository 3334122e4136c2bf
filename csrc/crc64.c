/*
 * CRC-64 with the ISO polynomial, reflected, as Go's hash/crc64 computes it with its ISO
 * table: tar-split stores this checksum of each file's contents. Eight bytes per step
 * ("slicing by 8"); the tables are built once, on first use.
 */
#include "aufs_core.h"

#include <pthread.h>
#include <string.h>

#define CRC64_ISO_REFLECTED 0xD800000000000000ULL

static uint64_t tables[8][256];
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void build_tables(void)
{
    for (unsigned int byte = 0; byte < 256; byte++) {
        uint64_t crc = byte;
        for (int bit = 0; bit < 8; bit++)
            crc = (crc & 1) ? (crc >> 1) ^ CRC64_ISO_REFLECTED : crc >> 1;
        tables[0][byte] = crc;
    }
    for (unsigned int byte = 0; byte < 256; byte++) {
        uint64_t crc = tables[0][byte];
        for (int slice = 1; slice < 8; slice++) {
            crc = tables[0][crc & 0xff] ^ (crc >> 8);
            tables[slice][byte] = crc;
        }
    }
}

uint64_t aufs_crc64_iso(uint64_t crc, const unsigned char *data, size_t size)
{
    pthread_once(&tables_once, build_tables);
    crc = ~crc;
    while (size >= 8) {
        uint64_t word;
        memcpy(&word, data, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        word = __builtin_bswap64(word);
#endif
        crc ^= word;
        crc = tables[7][crc & 0xff] ^ tables[6][(crc >> 8) & 0xff] ^
              tables[5][(crc >> 16) & 0xff] ^ tables[4][(crc >> 24) & 0xff] ^
              tables[3][(crc >> 32) & 0xff] ^ tables[2][(crc >> 40) & 0xff] ^
              tables[1][(crc >> 48) & 0xff] ^ tables[0][crc >> 56];
        data += 8;
        size -= 8;
    }
    while (size--)
        crc = tables[0][(crc ^ *data++) & 0xff] ^ (crc >> 8);
    return ~crc;
}
