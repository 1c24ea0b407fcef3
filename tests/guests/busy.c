/* Spends seconds inside single host calls that cannot be interrupted:
 * random_get filling a large buffer. It is not a blocking call (it never
 * waits for anything outside the host), so it is no update point, and the
 * host does not give it up half done: a pause requested meanwhile happens
 * only after it returns.
 *
 * usage: busy SECONDS. Measures how fast the host fills a buffer, then
 * twice prints "busy N" and makes one call that takes about SECONDS
 * (unless that is more than 1 GiB), then prints "done". */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <wasi/api.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int fill(unsigned char *buf, size_t len)
{
    if (__wasi_random_get(buf, len) != 0) { fprintf(stderr, "random_get failed\n"); return 1; }
    return 0;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 0;
    if (seconds <= 0) { fprintf(stderr, "usage: busy SECONDS\n"); return 2; }
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* The fastest of a few fills of memory already in use: the calls below
     * take about SECONDS, or more, however the machine varies. */
    const size_t sample = 16 << 20, most = (size_t)1 << 30;
    unsigned char *buf = malloc(sample);
    if (!buf) { fprintf(stderr, "out of memory\n"); return 1; }
    double rate = 0;
    for (int i = 0; i < 4; i++) {
        double start = now();
        if (fill(buf, sample)) return 1;
        double r = sample / (now() - start + 1e-9);
        if (i > 0 && r > rate) rate = r;
    }
    size_t len = rate * seconds < most ? (size_t)(rate * seconds) : most;
    free(buf);
    buf = malloc(len);
    if (!buf) { fprintf(stderr, "out of memory for %zu bytes\n", len); return 1; }
    for (int round = 1; round <= 2; round++) {
        printf("busy %d\n", round);
        if (fill(buf, len)) return 1;
    }
    printf("done\n");
    return 0;
}
