/*
 * spin: a CPU-bound loop whose body changes between versions, for updates
 * that find the loop running. It sums step(i) for i < N (argv[1], default
 * 200000000) and prints the sum, which is the same in every version.
 *
 * SPIN_VERSION selects the version (undefined: 1):
 *   2  the loop also counts laps of 2^20 iterations in a new global and
 *      prints how many it counted: the loop's body changed, and the count
 *      shows the new body ran
 */
#include <stdio.h>
#include <stdlib.h>

#ifndef SPIN_VERSION
#define SPIN_VERSION 1
#endif

volatile unsigned sink;

/* One step of work, kept out of line as real work is. */
__attribute__((noinline)) static unsigned long long step(unsigned long long i)
{
    sink = (unsigned)i;
    return 3 * i + (i >> 7);
}
#if SPIN_VERSION >= 2
static unsigned long laps;
#endif

int main(int argc, char **argv)
{
    unsigned long long n = argc > 1 ? strtoull(argv[1], NULL, 10) : 200000000ull;
    unsigned long long sum = 0;
    for (unsigned long long i = 0; i < n; i++) {
        sum += step(i);
#if SPIN_VERSION >= 2
        if ((i & 0xfffff) == 0)
            laps++;
#endif
    }
    printf("sum %llu\n", sum);
#if SPIN_VERSION >= 2
    printf("laps %lu\n", laps);
#endif
    return 0;
}
