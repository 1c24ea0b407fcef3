/*
 * counter: four POSIX threads add to one counter under a mutex, and main
 * prints the total once it has joined them. Built with `upstare-cc
 * --threads` (wasi-threads); the smallest program of that kind, for the
 * tests of what the toolchain and the host do with one.
 */
#include <pthread.h>
#include <stdio.h>

#define THREADS 4
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

int main(void)
{
    pthread_t threads[THREADS];
    for (int i = 0; i < THREADS; i++) {
        if (pthread_create(&threads[i], NULL, add, NULL) != 0) {
            fputs("counter: pthread_create failed\n", stderr);
            return 1;
        }
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(threads[i], NULL);
    printf("count=%ld\n", count);
    return count == (long)THREADS * ADDS ? 0 : 1;
}
