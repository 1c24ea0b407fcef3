/*
 * counter: POSIX threads (four, or the first argument, at most 64) add to
 * one counter under a mutex, and main prints the total once it has joined
 * them. Built with `upstare-cc
 * --threads` (wasi-threads); the smallest program of that kind, for the
 * tests of what the toolchain and the host do with one.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define MAX_THREADS 64
#define ADDS 100000

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long count;

static void *add(void *arg)
{
    for (int i = 0; i < ADDS; i++) {
        pthread_mutex_lock(&lock);
        count++;
        pthread_mutex_unlock(&lock);
    }
    return arg;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 4;
    if (n < 1 || n > MAX_THREADS) {
        fprintf(stderr, "counter: threads must be 1 to %d\n", MAX_THREADS);
        return 2;
    }
    pthread_t threads[MAX_THREADS];
    for (int i = 0; i < n; i++) {
        if (pthread_create(&threads[i], NULL, add, NULL) != 0) {
            fputs("counter: pthread_create failed\n", stderr);
            return 1;
        }
    }
    for (int i = 0; i < n; i++)
        pthread_join(threads[i], NULL);
    printf("count=%ld\n", count);
    return count == (long)n * ADDS ? 0 : 1;
}
