/*
 * ends: a worker thread ends the whole program while main waits for it in
 * pthread_join. `ends exit` makes the worker call exit(7); `ends trap`
 * makes it trap; `ends return` lets it return, and main exits 0; `ends
 * trap-later` makes it sleep a second first (long enough to be paused and
 * resumed), then trap. What a host must do when a thread other than main
 * ends the program.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *mode = "return";

static void *worker(void *arg)
{
    if (strcmp(mode, "exit") == 0) {
        fflush(stdout);
        exit(7);
    }
    if (strcmp(mode, "trap-later") == 0)
        sleep(1);
    if (strncmp(mode, "trap", 4) == 0)
        __builtin_trap();
    return arg;
}

int main(int argc, char **argv)
{
    if (argc > 1)
        mode = argv[1];
    printf("main: starting a worker (%s)\n", mode);
    fflush(stdout);
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0) {
        fputs("ends: pthread_create failed\n", stderr);
        return 1;
    }
    pthread_join(t, NULL);
    printf("main: the worker returned\n");
    return 0;
}
