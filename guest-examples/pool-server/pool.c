/*
 * pool: a thread-pool server speaking a line protocol over TCP.
 *
 * The main thread accepts connections on the listener the host preopens
 * (see upstare.h) and hands each to a pool of worker threads through a
 * queue guarded by a mutex and a condition variable; a worker serves one
 * connection until the client closes it, then takes the next. Built with
 * `upstare-cc --threads` (POSIX threads on wasi-threads). The number of
 * workers is the first argument (default 8, at most 64).
 *
 * Requests, one per line, one reply line each:
 *   PING        -> PONG v<version>
 *   ADD <n>     -> TOTAL <t>   (adds n to a total shared by all workers)
 *   WHO         -> WORKER <id> V<version>   (the worker serving the line;
 *                  version 2 adds SERVED <k>, the lines it has served;
 *                  version 3 adds CONN <seq>, the connection's number in
 *                  accept order)
 *   anything else -> ERR unknown command
 *
 * One source, several versions, chosen with -DPOOL_VERSION=N (default 1):
 *   1  the protocol above.
 *   2  changes the workers' request handling (answer()): it counts the
 *      lines each worker has served, in a per-worker array (a new global),
 *      and WHO reports it.
 *   3  changes the queue's element type: a job carries the connection's
 *      accept number as well as its fd; the worker that takes it keeps the
 *      number in a per-worker array, and WHO reports it.
 *
 * What a live update of this server meets: the main thread waits in
 * accept(), idle workers in pthread_cond_wait() (a futex wait), busy ones
 * in read(). The functions that change between versions are never on a
 * stack while it waits, or keep the same live values there: take() uses
 * the worker's id after its wait in every version.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <upstare.h>

#ifndef POOL_VERSION
#define POOL_VERSION 1
#endif
#if POOL_VERSION < 1 || POOL_VERSION > 3
#error "POOL_VERSION must be 1 to 3"
#endif

#define MAX_WORKERS 64
#define QUEUE_SLOTS 256
#define LINE_MAX_LEN 256

/* One connection waiting for a worker. */
struct job {
    int fd;
#if POOL_VERSION >= 3
    unsigned seq;
#endif
};

/* Connections accepted and not yet taken, a ring under `queue_lock`. The
   lock and the condition variable idle workers wait on live apart from the
   ring, whose element type a version may change: a global whose type
   changes moves, and waiters hold the addresses of these two. */
static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_ready = PTHREAD_COND_INITIALIZER;
static struct {
    struct job jobs[QUEUE_SLOTS];
    unsigned head, count;
} queue;

static pthread_mutex_t total_lock = PTHREAD_MUTEX_INITIALIZER;
static long long total;
static unsigned accepted;
/* Connections each worker has taken from the queue. */
static unsigned long taken[MAX_WORKERS];
#if POOL_VERSION >= 2
static unsigned long served[MAX_WORKERS];
#endif
#if POOL_VERSION >= 3
/* The accept number of the connection each worker serves. */
static unsigned conn_seq[MAX_WORKERS];
#endif

/* Queues a connection; false when the queue is full. */
static int put(struct job job)
{
    pthread_mutex_lock(&queue_lock);
    int ok = queue.count < QUEUE_SLOTS;
    if (ok) {
        queue.jobs[(queue.head + queue.count) % QUEUE_SLOTS] = job;
        queue.count++;
        pthread_cond_signal(&queue_ready);
    }
    pthread_mutex_unlock(&queue_lock);
    return ok;
}

/* Waits for a connection for worker `id` to serve; returns its fd. Not
   inlined, so that a version changing it leaves worker() as it was. */
__attribute__((noinline)) static int take(int id)
{
    pthread_mutex_lock(&queue_lock);
    while (queue.count == 0)
        pthread_cond_wait(&queue_ready, &queue_lock);
    struct job job = queue.jobs[queue.head];
    queue.head = (queue.head + 1) % QUEUE_SLOTS;
    queue.count--;
    taken[id]++;
#if POOL_VERSION >= 3
    conn_seq[id] = job.seq;
#endif
    pthread_mutex_unlock(&queue_lock);
    return job.fd;
}

static int send_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Answers one request line of worker `id` into `out`. Not inlined, so
   that a version changing it leaves serve() as it was. */
__attribute__((noinline)) static void answer(int id, const char *line, char *out, size_t cap)
{
#if POOL_VERSION >= 2
    served[id]++;
#endif
    if (strcmp(line, "PING") == 0) {
        snprintf(out, cap, "PONG v%d\n", POOL_VERSION);
    } else if (strncmp(line, "ADD ", 4) == 0) {
        long long n = strtoll(line + 4, NULL, 10);
        pthread_mutex_lock(&total_lock);
        total += n;
        long long t = total;
        pthread_mutex_unlock(&total_lock);
        snprintf(out, cap, "TOTAL %lld\n", t);
    } else if (strcmp(line, "WHO") == 0) {
#if POOL_VERSION == 1
        snprintf(out, cap, "WORKER %d V1\n", id);
#elif POOL_VERSION == 2
        snprintf(out, cap, "WORKER %d V2 SERVED %lu\n", id, served[id]);
#else
        snprintf(out, cap, "WORKER %d V3 SERVED %lu CONN %u\n", id, served[id], conn_seq[id]);
#endif
    } else {
        snprintf(out, cap, "ERR unknown command\n");
    }
}

/* Serves the connection `fd` until the client closes it. */
static void serve(int id, int fd)
{
    char buf[LINE_MAX_LEN];
    char reply[LINE_MAX_LEN + 64];
    size_t used = 0;
    for (;;) {
        ssize_t n = read(fd, buf + used, sizeof buf - 1 - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        used += (size_t)n;
        char *start = buf;
        char *nl;
        while ((nl = memchr(start, '\n', used - (size_t)(start - buf))) != NULL) {
            *nl = '\0';
            if (nl > start && nl[-1] == '\r')
                nl[-1] = '\0';
            answer(id, start, reply, sizeof reply);
            if (send_all(fd, reply, strlen(reply)) != 0)
                goto done;
            start = nl + 1;
        }
        used -= (size_t)(start - buf);
        memmove(buf, start, used);
        if (used == sizeof buf - 1)
            used = 0; /* a line too long to keep: dropped */
    }
done:
    close(fd);
}

static void *worker(void *arg)
{
    int id = (int)(long)arg;
    for (;;)
        serve(id, take(id));
    return NULL;
}

int main(int argc, char **argv)
{
    int workers = argc > 1 ? atoi(argv[1]) : 8;
    if (workers < 1 || workers > MAX_WORKERS) {
        fprintf(stderr, "pool: workers must be 1 to %d\n", MAX_WORKERS);
        return 2;
    }
    int listener = upstare_listener_fd(0);
    if (listener < 0) {
        fputs("pool: no listener (run with --tcplisten)\n", stderr);
        return 2;
    }
    for (int i = 0; i < workers; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)(long)i) != 0) {
            fprintf(stderr, "pool: cannot start worker %d\n", i);
            return 1;
        }
    }
    printf("pool v%d: %d workers on fd %d\n", POOL_VERSION, workers, listener);
    fflush(stdout);
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED)
                continue;
            perror("pool: accept");
            return 1;
        }
        struct job job = { .fd = fd };
#if POOL_VERSION >= 3
        job.seq = accepted;
#endif
        accepted++;
        if (!put(job)) {
            send_all(fd, "ERR busy\n", 9);
            close(fd);
        }
    }
}
