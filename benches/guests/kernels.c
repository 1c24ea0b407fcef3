/* Integer kernels: a prime sieve, quicksort of pseudo-random keys, a
 * chained hash table of strings built and probed, and CRC-32 over a buffer.
 * Loops, recursion, pointer chasing and heap use, with a checksum of each. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t rng = 12345;
static uint32_t next(void) { rng ^= rng << 13; rng ^= rng >> 17; rng ^= rng << 5; return rng; }

static unsigned sieve(unsigned n)
{
    unsigned char *composite = calloc(n + 1, 1);
    unsigned count = 0;
    for (unsigned i = 2; i <= n; i++) {
        if (composite[i]) continue;
        count++;
        for (unsigned j = i * 2; j <= n; j += i) composite[j] = 1;
    }
    free(composite);
    return count;
}

static void quicksort(uint32_t *a, long lo, long hi)
{
    while (lo < hi) {
        uint32_t pivot = a[(lo + hi) / 2];
        long i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) { uint32_t t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (j - lo < hi - i) { quicksort(a, lo, j); lo = i; }
        else { quicksort(a, i, hi); hi = j; }
    }
}

struct entry { struct entry *next; char key[16]; uint32_t value; };

static uint32_t hash(const char *s)
{
    uint32_t h = 2166136261u;
    while (*s) { h ^= (unsigned char)*s++; h *= 16777619u; }
    return h;
}

static uint64_t table_work(unsigned n)
{
    unsigned buckets = 4096;
    struct entry **table = calloc(buckets, sizeof *table);
    for (unsigned i = 0; i < n; i++) {
        struct entry *e = malloc(sizeof *e);
        snprintf(e->key, sizeof e->key, "k%u", next() % (n * 2));
        e->value = i;
        uint32_t b = hash(e->key) % buckets;
        e->next = table[b];
        table[b] = e;
    }
    uint64_t found = 0;
    char key[16];
    for (unsigned i = 0; i < n; i++) {
        snprintf(key, sizeof key, "k%u", i);
        for (struct entry *e = table[hash(key) % buckets]; e; e = e->next)
            if (strcmp(e->key, key) == 0) { found += e->value; break; }
    }
    for (unsigned b = 0; b < buckets; b++)
        while (table[b]) { struct entry *e = table[b]; table[b] = e->next; free(e); }
    free(table);
    return found;
}

static uint32_t crc32(const unsigned char *p, size_t n)
{
    uint32_t crc = ~0u;
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & -(crc & 1));
    }
    return ~crc;
}

int main(int argc, char **argv)
{
    unsigned scale = argc > 1 ? (unsigned)atoi(argv[1]) : 2;
    printf("primes %u\n", sieve(2000000 * scale));
    unsigned n = 300000 * scale;
    uint32_t *keys = malloc(n * sizeof *keys);
    for (unsigned i = 0; i < n; i++) keys[i] = next();
    quicksort(keys, 0, n - 1);
    uint64_t sum = 0;
    for (unsigned i = 0; i < n; i += 97) sum += keys[i];
    printf("sorted %u sample %llu\n", n, (unsigned long long)sum);
    free(keys);
    printf("table %llu\n", (unsigned long long)table_work(60000 * scale));
    unsigned char *buf = malloc(1 << 20);
    for (unsigned i = 0; i < (1u << 20); i++) buf[i] = (unsigned char)next();
    uint32_t crc = 0;
    for (unsigned r = 0; r < scale; r++) crc = crc * 31 + crc32(buf, 1 << 20);
    printf("crc %08x\n", crc);
    free(buf);
    return 0;
}
