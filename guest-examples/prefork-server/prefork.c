/*
 * prefork: a prefork server, in the style of Apache's prefork or vsftpd.
 * The master accepts nothing: it forks N workers (the first argument,
 * default 4), which all accept on the listener they share, and keeps N of
 * them alive, forking a new one in place of any that ends. Processes come
 * from upstare.h (fork, waitpid), which upstare-host provides.
 *
 * Each worker serves one connection at a time, a line at a time:
 *   PING        -> PONG v<version> WORKER <index> PID <pid>
 *   ADD <n>     -> TOTAL <t>   (the worker's own total: processes share no
 *                               memory, each has its copy of the master's)
 *   SPAWN <n>   -> SPAWNED <k> (forks n children that only sleep; k of
 *                               them could be made)
 *   EXIT        -> the worker ends with status 3 (the master replaces it)
 *   KILL <pid>  -> KILLED <r>  (kill(pid, SIGKILL): 0, or -1 and errno)
 *   VERSION     -> VERSION <version> WORKER <index>   (version 2 on)
 *
 * One source, three versions, chosen with -DPREFORK_VERSION=N (default 1):
 * version 2 changes the workers' request handling (the PONG, and VERSION)
 * and the master's loop (it counts the workers it restarts, in a new
 * global, and says so); version 3 is version 2 with a bug in a constructor
 * it adds, which scribbles over a worker's total and traps in every
 * process but the master, so that an update to it must roll back in all
 * of them.
 *
 * Run: upstare-host --tcplisten 127.0.0.1:7000 prefork.wasm 8
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <upstare.h>

#ifndef PREFORK_VERSION
#define PREFORK_VERSION 1
#endif
#if PREFORK_VERSION < 1 || PREFORK_VERSION > 3
#error "PREFORK_VERSION must be 1 to 3"
#endif

#define MAX_WORKERS 64

static int listener;
static long total;
#if PREFORK_VERSION >= 2
static long restarts;
#endif

#if PREFORK_VERSION == 3
/* Runs when an update brings it in, in every process. */
__attribute__((constructor)) static void broken(void)
{
    if (upstare_getpid() != 1) {
        total = -1;
        __builtin_trap();
    }
}
#endif

static int send_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, 0);
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* A child that only sleeps, for SPAWN: ended by the program's end. */
static void sleeper(void)
{
    for (;;)
        sleep(1000);
}

/* Answers one request line; -1 ends the connection. Kept out of line so
 * that a worker waiting for a client's next line waits in frames that
 * version 2 does not change (serve's and worker's): the changed code is
 * on the stack only while a request is answered. */
__attribute__((noinline)) static int answer(int index, int fd, const char *line)
{
    char reply[128];
    long n;
    if (strcmp(line, "PING") == 0) {
        snprintf(reply, sizeof reply, "PONG v%d WORKER %d PID %d\n", PREFORK_VERSION, index, upstare_getpid());
#if PREFORK_VERSION >= 2
    } else if (strcmp(line, "VERSION") == 0) {
        snprintf(reply, sizeof reply, "VERSION %d WORKER %d\n", PREFORK_VERSION, index);
#endif
    } else if (sscanf(line, "ADD %ld", &n) == 1) {
        total += n;
        snprintf(reply, sizeof reply, "TOTAL %ld\n", total);
    } else if (sscanf(line, "SPAWN %ld", &n) == 1) {
        long made = 0;
        for (; made < n; made++) {
            pid_t pid = fork();
            if (pid == 0)
                sleeper();
            if (pid < 0)
                break;
        }
        snprintf(reply, sizeof reply, "SPAWNED %ld\n", made);
    } else if (sscanf(line, "KILL %ld", &n) == 1) {
        snprintf(reply, sizeof reply, "KILLED %d\n", kill((pid_t)n, SIGKILL));
    } else if (strcmp(line, "EXIT") == 0) {
        close(fd);
        exit(3);
    } else {
        snprintf(reply, sizeof reply, "ERR unknown command\n");
    }
    return send_all(fd, reply, strlen(reply));
}

static void serve(int index, int fd)
{
    char buf[1024];
    size_t have = 0;
    for (;;) {
        ssize_t n = recv(fd, buf + have, sizeof buf - 1 - have, 0);
        if (n <= 0)
            break;
        have += (size_t)n;
        buf[have] = 0;
        char *start = buf, *nl;
        while ((nl = strchr(start, '\n')) != NULL) {
            *nl = 0;
            if (nl > start && nl[-1] == '\r')
                nl[-1] = 0;
            if (answer(index, fd, start) != 0)
                goto done;
            start = nl + 1;
        }
        have = strlen(start);
        memmove(buf, start, have);
        if (have == sizeof buf - 1)
            break; /* a line longer than the buffer */
    }
done:
    close(fd);
}

static void worker(int index)
{
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED)
                continue;
            perror("prefork: accept");
            exit(1);
        }
        serve(index, fd);
    }
}

/* Forks worker `index`; its pid, or -1. */
static pid_t start_worker(int index)
{
    pid_t pid = fork();
    if (pid == 0) {
        worker(index);
        exit(0);
    }
    return pid;
}

int main(int argc, char **argv)
{
    int workers = argc > 1 ? atoi(argv[1]) : 4;
    if (workers < 1 || workers > MAX_WORKERS) {
        fprintf(stderr, "prefork: workers must be 1 to %d\n", MAX_WORKERS);
        return 2;
    }
    listener = upstare_listener_fd(0);
    if (listener < 0) {
        fputs("prefork: no listener (run with --tcplisten)\n", stderr);
        return 2;
    }
    pid_t pids[MAX_WORKERS];
    for (int i = 0; i < workers; i++) {
        pids[i] = start_worker(i);
        if (pids[i] < 0) {
            perror("prefork: fork");
            return 1;
        }
    }
    printf("prefork v%d: %d workers on fd %d\n", PREFORK_VERSION, workers, listener);
    fflush(stdout);
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            perror("prefork: waitpid");
            return 1;
        }
        for (int i = 0; i < workers; i++) {
            if (pids[i] != pid)
                continue;
            if (WIFEXITED(status))
                printf("worker %d (pid %d) exited with %d\n", i, pid, WEXITSTATUS(status));
            else
                printf("worker %d (pid %d) killed by signal %d\n", i, pid, WTERMSIG(status));
            /* A fork refused (the process limit) is tried again later. */
            while ((pids[i] = start_worker(i)) < 0)
                sleep(1);
#if PREFORK_VERSION >= 2
            restarts++;
            printf("worker %d restarted as pid %d (restart %ld)\n", i, pids[i], restarts);
#else
            printf("worker %d restarted as pid %d\n", i, pids[i]);
#endif
            fflush(stdout);
        }
    }
}
