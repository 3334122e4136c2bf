/*
 * CRC-64 with the ISO polynomial, reflected, as Go's hash/crc64 computes it with its ISO
 * table: tar-split stores this checksum of each file's contents, so it runs over every byte
 * of a layer while it is applied. On x86-64 with PCLMULQDQ, 16-byte blocks are folded with
 * carry-less multiplies, four lanes at a time (a block X followed by D is congruent, mod P, to
 * X_hi * x^192 + X_lo * x^128 + D, which fits in 128 bits again); the folded remainder, the
 * tail and small inputs are reduced with shifts (x^64 is x^4 + x^3 + x + 1 mod P). With
 * VPCLMULQDQ and AVX-512 the same folding runs on 64-byte registers, four of them: 256 bytes
 * per step, about three times as fast again, which matters as the checksum is most of what
 * recording a layer adds to unpacking it. Elsewhere: eight bytes per step ("slicing by 8").
 */
#include "aufs_core.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_FOLDING 1
#endif

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

static uint64_t table_update(uint64_t crc, const unsigned char *data, size_t size);

/* AUFS_CRC64_PATH=pclmul or =table stops at that path even where the CPU has a wider one,
 * so that the tests check each path on any machine */
static int capped_at(const char *path)
{
    const char *cap = getenv("AUFS_CRC64_PATH");
    return cap != NULL && (strcmp(cap, path) == 0 ||
                           (strcmp(path, "pclmul") == 0 && strcmp(cap, "table") == 0));
}

/*
 * (H * x^64 + L) mod P for the register-order (bit-reversed) high and low: P = x^64 + x^4 +
 * x^3 + x + 1, so H * x^64 is H * (x^4 + x^3 + x + 1), shifts that spill at most four bits
 * past x^64, whose own product with P's low part the small table holds. Shifts and one
 * look-up in one cache line, where slicing by 8 reads 16 KiB of tables: what ends each
 * folded checksum, and most of a small file's, while unpacking evicts the tables.
 */
static inline uint64_t reduce(uint64_t high, uint64_t low)
{
    static const uint8_t spilled[16] = {0x00, 0xf5, 0x5a, 0xaf, 0xb4, 0x41, 0xee, 0x1b,
                                        0xd8, 0x2d, 0x82, 0x77, 0x6c, 0x99, 0x36, 0xc3};
    return low ^ high ^ (high >> 1) ^ (high >> 3) ^ (high >> 4) ^
           ((uint64_t)spilled[high & 15] << 56);
}

/* The register as it is between bytes (already inverted), eight bytes per reduce. */
static uint64_t reduce_update(uint64_t crc, const unsigned char *data, size_t size)
{
    for (; size >= 8; data += 8, size -= 8) {
        uint64_t word = 0;
        for (int index = 7; index >= 0; index--)
            word = (word << 8) | data[index];
        crc = reduce(crc ^ word, 0);
    }
    if (size) {
        uint64_t word = 0;
        for (int index = (int)size - 1; index >= 0; index--)
            word = (word << 8) | data[index];
        crc = reduce((crc ^ word) << (64 - 8 * size), crc >> (8 * size));
    }
    return crc;
}

#ifdef HAVE_FOLDING
/* bit-reversed x^191 mod P and x^127 mod P: the extra x of a reversed carry-less product
 * makes them x^192 and x^128 */
#define FOLD_HIGH 0x6b70000000000001ULL
#define FOLD_LOW 0xf500000000000001ULL

/* the same for 64 bytes (x^575 and x^511): four lanes folded side by side keep the
 * multiplier busy, as one lane waits on each product */
#define FOLD4_HIGH 0x01b001b1b0000001ULL
#define FOLD4_LOW 0xb100010100000001ULL

__attribute__((target("pclmul,sse2")))
static inline __m128i fold(__m128i folded, __m128i constants, __m128i next)
{
    return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(folded, constants, 0x00),
                                       _mm_clmulepi64_si128(folded, constants, 0x11)),
                         next);
}

/* the same for 256 bytes (x^2111 and x^2047): four 64-byte registers side by side */
#define FOLD16_HIGH 0x6b700000f5000000ULL
#define FOLD16_LOW 0x45000000b0000000ULL

#if defined(__GNUC__) && (__GNUC__ >= 8 || defined(__clang__))
#define HAVE_WIDE_FOLDING 1

__attribute__((target("avx512f,vpclmulqdq")))
static inline __m512i wide_fold(__m512i folded, __m512i constants, __m512i next)
{
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(folded, constants, 0x00),
                                     _mm512_clmulepi64_epi128(folded, constants, 0x11),
                                     next, 0x96);  /* a ^ b ^ c */
}

/* size >= 256: folds 256 bytes at a time into one 16-byte remainder, which goes on as
 * folded_update's does; returns the bytes it took, a multiple of 64 */
__attribute__((target("avx512f,vpclmulqdq,pclmul,sse2")))
static size_t wide_update(__m128i *remainder, uint64_t crc, const unsigned char *data,
                          size_t size)
{
    const __m512i constants16 = _mm512_broadcast_i32x4(
        _mm_set_epi64x((long long)FOLD16_LOW, (long long)FOLD16_HIGH));
    const __m512i constants4 = _mm512_broadcast_i32x4(
        _mm_set_epi64x((long long)FOLD4_LOW, (long long)FOLD4_HIGH));
    const __m128i constants = _mm_set_epi64x((long long)FOLD_LOW, (long long)FOLD_HIGH);
    __m512i lane0 = _mm512_xor_si512(_mm512_loadu_si512(data),
                                     _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, (long long)crc));
    __m512i lane1 = _mm512_loadu_si512(data + 64);
    __m512i lane2 = _mm512_loadu_si512(data + 128);
    __m512i lane3 = _mm512_loadu_si512(data + 192);
    size_t done;
    for (done = 256; done + 256 <= size; done += 256) {
        lane0 = wide_fold(lane0, constants16, _mm512_loadu_si512(data + done));
        lane1 = wide_fold(lane1, constants16, _mm512_loadu_si512(data + done + 64));
        lane2 = wide_fold(lane2, constants16, _mm512_loadu_si512(data + done + 128));
        lane3 = wide_fold(lane3, constants16, _mm512_loadu_si512(data + done + 192));
    }
    lane0 = wide_fold(wide_fold(wide_fold(lane0, constants4, lane1), constants4, lane2),
                      constants4, lane3);
    for (; done + 64 <= size; done += 64)
        lane0 = wide_fold(lane0, constants4, _mm512_loadu_si512(data + done));
    __m128i folded = _mm512_extracti32x4_epi32(lane0, 0);
    folded = fold(folded, constants, _mm512_extracti32x4_epi32(lane0, 1));
    folded = fold(folded, constants, _mm512_extracti32x4_epi32(lane0, 2));
    *remainder = fold(folded, constants, _mm512_extracti32x4_epi32(lane0, 3));
    return done;
}

static int wide_usable = -1;
#endif

__attribute__((target("pclmul,sse2")))
static uint64_t folded_update(uint64_t crc, const unsigned char *data, size_t size)
{
    const __m128i constants = _mm_set_epi64x((long long)FOLD_LOW, (long long)FOLD_HIGH);
    __m128i folded;
    size_t done = 16;
#ifdef HAVE_WIDE_FOLDING
    if (size >= 512 && wide_usable) {
        if (wide_usable < 0)
            wide_usable = !capped_at("pclmul") && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("vpclmulqdq") ? 1 : 0;
        if (wide_usable) {
            done = wide_update(&folded, crc, data, size);
            goto narrow;
        }
    }
#endif
    folded = _mm_xor_si128(_mm_loadu_si128((const __m128i *)data),
                           _mm_set_epi64x(0, (long long)crc));
    if (size >= 128) {
        const __m128i constants4 = _mm_set_epi64x((long long)FOLD4_LOW,
                                                  (long long)FOLD4_HIGH);
        __m128i lane1 = _mm_loadu_si128((const __m128i *)(data + 16));
        __m128i lane2 = _mm_loadu_si128((const __m128i *)(data + 32));
        __m128i lane3 = _mm_loadu_si128((const __m128i *)(data + 48));
        for (done = 64; done + 64 <= size; done += 64) {
            folded = fold(folded, constants4, _mm_loadu_si128((const __m128i *)(data + done)));
            lane1 = fold(lane1, constants4, _mm_loadu_si128((const __m128i *)(data + done + 16)));
            lane2 = fold(lane2, constants4, _mm_loadu_si128((const __m128i *)(data + done + 32)));
            lane3 = fold(lane3, constants4, _mm_loadu_si128((const __m128i *)(data + done + 48)));
        }
        folded = fold(fold(fold(folded, constants, lane1), constants, lane2), constants, lane3);
    }
#ifdef HAVE_WIDE_FOLDING
narrow:
#endif
    for (; done + 16 <= size; done += 16)
        folded = fold(folded, constants, _mm_loadu_si128((const __m128i *)(data + done)));
    /* the 16 bytes left, as message bytes from a zero register: (A x^64 + B) x^64 mod P */
    uint64_t first = (uint64_t)_mm_cvtsi128_si64(folded);
    uint64_t second = (uint64_t)_mm_cvtsi128_si64(_mm_unpackhi_epi64(folded, folded));
    crc = reduce(reduce(first, second), 0);
    return reduce_update(crc, data + done, size - done);
}

static int folding_usable = -1;
#endif

uint64_t aufs_crc64_iso(uint64_t crc, const unsigned char *data, size_t size)
{
#ifdef HAVE_FOLDING
    if (size >= 64) {
        if (folding_usable < 0)
            folding_usable = !capped_at("table") && __builtin_cpu_supports("pclmul") ? 1 : 0;
        if (folding_usable)
            return ~folded_update(~crc, data, size);
    }
    if (size < 64)
        return ~reduce_update(~crc, data, size);
#endif
    pthread_once(&tables_once, build_tables);
    return ~table_update(~crc, data, size);
}

/* The register as it is between bytes (already inverted): no inversion here. */
static uint64_t table_update(uint64_t crc, const unsigned char *data, size_t size)
{
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
    return crc;
}
