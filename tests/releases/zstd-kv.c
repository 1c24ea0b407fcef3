/*
 * zstd-kv: a key-value server that keeps every value compressed with zstd.
 * It is built, unchanged, against several consecutive releases of zstd
 * (tests/releases.rs), and each running build is updated live to the next:
 * values compressed by one release are decompressed by the next, and the
 * server's own code is the same in every build.
 *
 * The store is an open-addressing hash table on the heap (keys and
 * compressed frames malloc'ed), reached from one global, `store`; running
 * totals are kept in another, `stats`. No zstd context outlives a request
 * (ZSTD_compress and ZSTD_decompress make their own), so no object of a
 * type private to zstd is alive between requests.
 *
 * Built with -DKEEP_CONTEXT, it compresses with one ZSTD_CCtx made at
 * start and kept in a global, `cctx`, as servers do to save allocations:
 * then an object of zstd's private `struct ZSTD_CCtx_s` lives on the heap,
 * and a release that changes that struct cannot be applied to it.
 *
 * The protocol is kv-protocol.h's, with one more command:
 *   STATS  -> STATS sets=<n> raw=<bytes> compressed=<bytes>
 * and VERSION answers ZSTD_versionString().
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "zstd.h"
#include "kv-protocol.h"

#define LEVEL 3

/* One slot of the table: a key and its value as one zstd frame. */
struct slot {
    char *key;
    void *frame;
    uint32_t frame_len;
    uint32_t raw_len;
};

struct table {
    struct slot *slots;
    size_t capacity; /* a power of two */
    size_t used;
};

struct totals {
    unsigned long long sets;
    unsigned long long raw;
    unsigned long long compressed;
};

struct table *store;
struct totals stats;
#ifdef KEEP_CONTEXT
ZSTD_CCtx *cctx;
#endif

static uint32_t hash(const char *s)
{
    uint32_t h = 2166136261u;
    while (*s)
        h = (h ^ (uint8_t)*s++) * 16777619u;
    return h;
}

static struct slot *find(struct table *t, const char *key)
{
    size_t i = hash(key) & (t->capacity - 1);
    while (t->slots[i].key && strcmp(t->slots[i].key, key) != 0)
        i = (i + 1) & (t->capacity - 1);
    return &t->slots[i];
}

static struct table *new_table(size_t capacity)
{
    struct table *t = malloc(sizeof *t);
    t->slots = calloc(capacity, sizeof *t->slots);
    t->capacity = capacity;
    t->used = 0;
    return t;
}

/* Doubles the table once it is half full. */
static void grow(void)
{
    if (store->used * 2 < store->capacity)
        return;
    struct table *bigger = new_table(store->capacity * 2);
    for (size_t i = 0; i < store->capacity; i++) {
        if (store->slots[i].key)
            *find(bigger, store->slots[i].key) = store->slots[i];
    }
    bigger->used = store->used;
    free(store->slots);
    free(store);
    store = bigger;
}

static void set_value(int fd, const char *key, const char *value)
{
    size_t raw = strlen(value);
    size_t bound = ZSTD_compressBound(raw);
    void *frame = malloc(bound);
#ifdef KEEP_CONTEXT
    size_t n = ZSTD_compressCCtx(cctx, frame, bound, value, raw, LEVEL);
#else
    size_t n = ZSTD_compress(frame, bound, value, raw, LEVEL);
#endif
    if (ZSTD_isError(n)) {
        free(frame);
        reply(fd, "ERROR zstd: ", ZSTD_getErrorName(n), strlen(ZSTD_getErrorName(n)));
        return;
    }
    frame = realloc(frame, n ? n : 1);
    grow();
    struct slot *s = find(store, key);
    if (s->key) {
        free(s->frame);
    } else {
        s->key = strdup(key);
        store->used++;
    }
    s->frame = frame;
    s->frame_len = (uint32_t)n;
    s->raw_len = (uint32_t)raw;
    stats.sets++;
    stats.raw += raw;
    stats.compressed += n;
    reply(fd, "OK", NULL, 0);
}

static void get_value(int fd, const char *key)
{
    struct slot *s = find(store, key);
    if (!s->key) {
        reply(fd, "NOT_FOUND", NULL, 0);
        return;
    }
    char *value = malloc(s->raw_len + 1);
    size_t n = ZSTD_decompress(value, s->raw_len + 1, s->frame, s->frame_len);
    if (ZSTD_isError(n))
        reply(fd, "ERROR zstd: ", ZSTD_getErrorName(n), strlen(ZSTD_getErrorName(n)));
    else
        reply(fd, "VALUE ", value, n);
    free(value);
}

static void count_keys(int fd)
{
    char out[32];
    snprintf(out, sizeof out, "COUNT %zu", store->used);
    reply(fd, out, NULL, 0);
}

static const char *release(void)
{
    return ZSTD_versionString();
}

/* STATS -> STATS sets=<n> raw=<bytes> compressed=<bytes> */
static int other_command(int fd, const char *command, const char *arg)
{
    char out[128];
    if (strcmp(command, "STATS") != 0 || arg)
        return 0;
    snprintf(out, sizeof out, "STATS sets=%llu raw=%llu compressed=%llu", stats.sets, stats.raw, stats.compressed);
    reply(fd, out, NULL, 0);
    return 1;
}

int main(void)
{
    int listener = upstare_listener_fd(0);
    if (listener < 0) {
        fprintf(stderr, "zstd-kv: no preopened TCP listener (start the host with --tcplisten ADDR)\n");
        return 1;
    }
    store = new_table(64);
#ifdef KEEP_CONTEXT
    cctx = ZSTD_createCCtx();
#endif
    printf("zstd-kv: zstd %s, listening on fd %d\n", ZSTD_versionString(), listener);
    fflush(stdout);

    return serve("zstd-kv", listener);
}
