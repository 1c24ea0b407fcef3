/*
 * compress-workload: bzip2 and LZ4 (the C sources the bzip2-sys and
 * lz4-sys crates bundle) compressing and decompressing text, for the
 * tests that pause and update programs nobody here wrote.
 *
 *   compress-workload ROUNDS KIB
 *
 * Each round makes KIB KiB of words from a fixed pseudo-random sequence,
 * compresses them with bzip2 (level 9) and LZ4 HC (level 9), decompresses
 * both, and prints the sizes, the status codes and a hash of what came
 * back. What it prints depends on its arguments alone.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bzlib.h"
#include "lz4.h"
#include "lz4hc.h"

static unsigned long long state = 88172645463325252ULL;

static unsigned next(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (unsigned)state;
}

/* FNV-1a. */
static unsigned hash(const char *p, size_t n)
{
    unsigned h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)p[i]) * 16777619u;
    return h;
}

/* bzip2 calls this on an internal inconsistency (built without stdio). */
void bz_internal_error(int code)
{
    fprintf(stderr, "bzip2: internal error %d\n", code);
    abort();
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 2;
    size_t n = (size_t)(argc > 2 ? atoi(argv[2]) : 64) << 10;
    char *in = malloc(n), *packed = malloc(2 * n), *back = malloc(n);
    if (in == NULL || packed == NULL || back == NULL)
        return 1;
    static const char *words[] = { "alpha ", "beta ", "gamma ", "delta ", "update ", "frame ", "heap ", "\n" };
    for (int r = 0; r < rounds; r++) {
        for (size_t k = 0; k < n;) {
            const char *w = words[next() % 8];
            size_t len = strlen(w);
            if (len > n - k)
                len = n - k;
            memcpy(in + k, w, len);
            k += len;
        }
        unsigned bz_len = (unsigned)(2 * n), bz_back = (unsigned)n;
        int bz_c = BZ2_bzBuffToBuffCompress(packed, &bz_len, in, (unsigned)n, 9, 0, 0);
        int bz_d = BZ2_bzBuffToBuffDecompress(back, &bz_back, packed, bz_len, 0, 0);
        unsigned bz_hash = hash(back, bz_back);
        int lz_len = LZ4_compress_HC(in, packed, (int)n, (int)(2 * n), 9);
        int lz_back = LZ4_decompress_safe(packed, back, lz_len, (int)n);
        printf("round %d: bzip2 %d %u %d %u %08x, lz4 %d %d %08x, input %08x\n", r, bz_c, bz_len, bz_d, bz_back, bz_hash, lz_len,
               lz_back, hash(back, (size_t)(lz_back > 0 ? lz_back : 0)), hash(in, n));
    }
    return 0;
}
