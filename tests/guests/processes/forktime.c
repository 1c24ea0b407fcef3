/*
 * forktime: how long fork() takes against the size of the memory.
 *
 *   forktime MIB ROUNDS [rewrite]
 *
 * Allocates MIB MiB and writes every page of it, then forks ROUNDS times,
 * each child exiting at once, and prints the parent's time in fork() (from
 * the call to its return in the parent: the unwind, the copy, the child's
 * creation and the rewind), in microseconds, one line per round:
 * "fork <us>". The child checks a byte of the copy and exits with it.
 *
 * With "rewrite", the parent then writes every page again after each
 * child has ended, and prints that time too: "write <us>". Memory shared
 * copy-on-write makes these writes fault, and the next fork copy them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <upstare.h>

static long long now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000LL + t.tv_nsec / 1000;
}

int main(int argc, char **argv)
{
    long mib = argc > 1 ? atol(argv[1]) : 1;
    int rounds = argc > 2 ? atoi(argv[2]) : 5;
    int rewrite = argc > 3 && strcmp(argv[3], "rewrite") == 0;
    size_t len = (size_t)mib << 20;
    unsigned char *block = malloc(len);
    if (block == NULL) {
        fprintf(stderr, "forktime: cannot allocate %ld MiB\n", mib);
        return 1;
    }
    memset(block, 7, len);
    for (int i = 0; i < rounds; i++) {
        fflush(stdout); /* else each child prints the lines before it again */
        long long t0 = now_us();
        pid_t pid = fork();
        if (pid == 0)
            exit(block[len - 1]);
        long long t1 = now_us();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 7) {
            fputs("forktime: the child did not see the memory\n", stderr);
            return 1;
        }
        printf("fork %lld\n", t1 - t0);
        if (rewrite) {
            long long t2 = now_us();
            memset(block, 7, len);
            printf("write %lld\n", now_us() - t2);
        }
    }
    return 0;
}
