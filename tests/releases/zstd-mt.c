/*
 * zstd-mt: zstd's own multi-threaded compression (ZSTD_MULTITHREAD: a pool
 * of POSIX threads in lib/common/pool.c, fed jobs by
 * lib/compress/zstdmt_compress.c), driven through zstd's public API.
 *
 *   zstd-mt [WORKERS [MIB [ROUNDS [STOP]]]]
 *
 * (defaults: 4 workers, 4 MiB, 1 round; with STOP, a path, the rounds end
 * early once that file exists, so that a test can keep the program busy
 * for as long as it needs).
 *
 * Builds a deterministic, compressible input of MIB MiB (text of words
 * drawn by a fixed generator), then ROUNDS times compresses it in one
 * frame with ZSTD_c_nbWorkers = WORKERS and 512 KiB jobs (zstd's smallest,
 * so 4 MiB is 8 jobs: every worker gets some), decompresses the frame and
 * compares. Prints, per round, the sizes, an FNV-1a hash of the frame and
 * how many jobs zstd handed to its pool (one context for every round, its
 * threads kept between them); the hash is the same every round
 * and differs from a WORKERS = 0 run (the calling thread compresses, no
 * jobs, other block boundaries), and with WORKERS > 0 zstd starts WORKERS threads, so a
 * `pthread_create` that fails makes the compression fail (exit 1).
 *
 * The same program at every release; built with `upstare-cc --threads`
 * and -DZSTD_MULTITHREAD by `tests/releases.rs`. Built with -DZSTD_MT_V2,
 * its next version, which says "roundtrip verified": what the tests
 * update a running one onto.
 */
#define ZSTD_STATIC_LINKING_ONLY /* ZSTD_getFrameProgression: the jobs */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

#ifdef ZSTD_MT_V2
#define ROUNDTRIP "verified"
#else
#define ROUNDTRIP "ok"
#endif

static unsigned long long fnv1a(const unsigned char *p, size_t n)
{
    unsigned long long h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

/* Text of words from a small vocabulary, drawn by a fixed LCG: the same
 * bytes on every run, compressible about 3:1. */
static void fill(unsigned char *buf, size_t size)
{
    static const char *const words[] = {
        "update", "thread", "worker", "frame", "block", "window", "match", "literal",
        "entropy", "huffman", "sequence", "offset", "pool", "job", "mutex", "signal",
    };
    uint32_t state = 12345;
    size_t at = 0;
    while (at < size) {
        state = state * 1103515245u + 12345u;
        const char *w = words[(state >> 16) % 16];
        size_t len = strlen(w);
        for (size_t i = 0; i < len && at < size; i++)
            buf[at++] = (unsigned char)w[i];
        if (at < size)
            buf[at++] = (state >> 28) == 0 ? '\n' : ' ';
    }
}

static int fail(const char *what, size_t code)
{
    fprintf(stderr, "zstd-mt: %s: %s\n", what, ZSTD_getErrorName(code));
    return 1;
}

int main(int argc, char **argv)
{
    int workers = argc > 1 ? atoi(argv[1]) : 4;
    int mib = argc > 2 ? atoi(argv[2]) : 4;
    int rounds = argc > 3 ? atoi(argv[3]) : 1;
    const char *stop = argc > 4 ? argv[4] : NULL;
    if (workers < 0 || workers > 64 || mib < 1 || mib > 64 || rounds < 1) {
        fputs("usage: zstd-mt [WORKERS 0-64 [MIB 1-64 [ROUNDS [STOP]]]]\n", stderr);
        return 2;
    }
    size_t size = (size_t)mib << 20;
    size_t bound = ZSTD_compressBound(size);
    unsigned char *input = malloc(size), *frame = malloc(bound), *back = malloc(size);
    if (!input || !frame || !back) {
        fputs("zstd-mt: out of memory\n", stderr);
        return 1;
    }
    fill(input, size);

    /* One context for every round, as a program that compresses often
     * keeps one: its pool's threads start with the first frame and wait
     * for the next one's jobs in between; ZSTD_freeCCtx joins them. */
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    if (!cctx) {
        fputs("zstd-mt: ZSTD_createCCtx failed\n", stderr);
        return 1;
    }
    size_t r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, 3);
    if (ZSTD_isError(r))
        return fail("compression level", r);
    r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1);
    if (ZSTD_isError(r))
        return fail("checksum flag", r);
    r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_nbWorkers, workers);
    if (ZSTD_isError(r))
        return fail("nbWorkers", r);
    if (workers > 0) {
        r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_jobSize, 512 << 10);
        if (ZSTD_isError(r))
            return fail("jobSize", r);
    }

    for (int round = 1; round <= rounds && !(stop && access(stop, F_OK) == 0); round++) {
        /* One ZSTD_e_end call: with workers, the main thread hands the
         * jobs to the pool and waits for them in a condition variable. */
        ZSTD_inBuffer in = { input, size, 0 };
        ZSTD_outBuffer out = { frame, bound, 0 };
        size_t left;
        do {
            left = ZSTD_compressStream2(cctx, &out, &in, ZSTD_e_end);
            if (ZSTD_isError(left))
                return fail("compress", left);
        } while (left != 0);
        ZSTD_frameProgression progress = ZSTD_getFrameProgression(cctx);

        size_t got = ZSTD_decompress(back, size, frame, out.pos);
        if (ZSTD_isError(got))
            return fail("decompress", got);
        if (got != size || memcmp(back, input, size) != 0) {
            fprintf(stderr, "zstd-mt: round %d: the roundtrip differs\n", round);
            return 1;
        }
        printf("zstd %s, %d workers, round %d: %zu -> %zu bytes in %u jobs, frame fnv1a %016llx, roundtrip " ROUNDTRIP "\n",
               ZSTD_versionString(), workers, round, size, out.pos, progress.currentJobID,
               fnv1a(frame, out.pos));
        fflush(stdout);
    }
    ZSTD_freeCCtx(cctx);
    free(input);
    free(frame);
    free(back);
    return 0;
}
