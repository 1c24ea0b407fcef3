/*
 * sessions: a thread-pool server whose workers each hold a heap object,
 * for as long as they serve a connection, in a frame of their own.
 *
 * The main thread accepts connections on the listener the host preopens
 * and hands each to a worker through a queue (a mutex and a condition
 * variable); the worker allocates a `struct session` for it and serves
 * it until the client closes it. Requests, one per line:
 *   COUNT  -> v1: "v1 LINES <n> NAME <name>", the lines this connection
 *             has sent, counted in its session;
 *             v2: "v2 LINES <n> BYTES <b> NAME <name>", b the bytes it
 *             has sent since the session gained that member
 *   anything else -> "ERR"
 *
 * Version 2 (-DSESSIONS_VERSION=2) adds `bytes` to struct session, ahead
 * of its name. A worker waits in read() with pointers to its session in
 * a wasm local of serve() and in worker()'s frame in linear memory: an
 * update must convert the session and rewrite both, in a spawned thread's
 * frames; the worker frees the session through the second when the
 * client closes the connection.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <upstare.h>

#ifndef SESSIONS_VERSION
#define SESSIONS_VERSION 1
#endif

#define WORKERS 4
#define QUEUE_SLOTS 64

struct session {
    int fd;
    unsigned lines;
#if SESSIONS_VERSION >= 2
    unsigned long long bytes;
#endif
    char name[24];
};

static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_ready = PTHREAD_COND_INITIALIZER;
static int queue[QUEUE_SLOTS];
static unsigned queue_head, queue_count, accepted;

static int take(void)
{
    pthread_mutex_lock(&queue_lock);
    while (queue_count == 0)
        pthread_cond_wait(&queue_ready, &queue_lock);
    int fd = queue[queue_head];
    queue_head = (queue_head + 1) % QUEUE_SLOTS;
    queue_count--;
    pthread_mutex_unlock(&queue_lock);
    return fd;
}

static void reply(struct session *s, const char *text)
{
    size_t len = strlen(text);
    while (len > 0) {
        ssize_t n = write(s->fd, text, len);
        if (n <= 0)
            return;
        text += n;
        len -= (size_t)n;
    }
}

/* Serves one line of `s`. Not inlined: serve() stays as it was. */
__attribute__((noinline)) static void answer(struct session *s, const char *line, size_t len)
{
    char out[128];
    s->lines++;
#if SESSIONS_VERSION >= 2
    s->bytes += len + 1;
#else
    (void)len;
#endif
    if (strcmp(line, "COUNT") != 0) {
        reply(s, "ERR\n");
        return;
    }
#if SESSIONS_VERSION >= 2
    snprintf(out, sizeof out, "v2 LINES %u BYTES %llu NAME %s\n", s->lines, s->bytes, s->name);
#else
    snprintf(out, sizeof out, "v1 LINES %u NAME %s\n", s->lines, s->name);
#endif
    reply(s, out);
}

/* Serves the connection of `s` until the client closes it. */
__attribute__((noinline)) static void serve(struct session *s)
{
    char buf[256];
    size_t used = 0;
    for (;;) {
        ssize_t n = read(s->fd, buf + used, sizeof buf - 1 - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        used += (size_t)n;
        char *start = buf, *nl;
        while ((nl = memchr(start, '\n', used - (size_t)(start - buf))) != NULL) {
            *nl = '\0';
            answer(s, start, (size_t)(nl - start));
            start = nl + 1;
        }
        used -= (size_t)(start - buf);
        memmove(buf, start, used);
        if (used == sizeof buf - 1)
            used = 0;
    }
}

/* Takes the address of the worker's pointer to its session, which puts
   the pointer in the worker's frame in linear memory: an update rewrites
   it there, and the worker frees the session through it. */
__attribute__((noinline)) static void look_at(struct session **sp)
{
    if ((*sp)->fd < 0)
        *sp = NULL;
}

static void *worker(void *arg)
{
    (void)arg;
    for (;;) {
        int fd = take();
        struct session *s = calloc(1, sizeof *s);
        if (s == NULL) {
            close(fd);
            continue;
        }
        s->fd = fd;
        snprintf(s->name, sizeof s->name, "conn-%d", fd);
        look_at(&s);
        serve(s);
        look_at(&s);
        if (s == NULL)
            continue;
        close(s->fd);
        free(s);
    }
    return NULL;
}

int main(void)
{
    int listener = upstare_listener_fd(0);
    if (listener < 0) {
        fputs("sessions: no listener (run with --tcplisten)\n", stderr);
        return 2;
    }
    for (int i = 0; i < WORKERS; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, NULL) != 0) {
            fputs("sessions: cannot start a worker\n", stderr);
            return 1;
        }
    }
    printf("sessions v%d: %d workers on fd %d\n", SESSIONS_VERSION, WORKERS, listener);
    fflush(stdout);
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED)
                continue;
            perror("sessions: accept");
            return 1;
        }
        pthread_mutex_lock(&queue_lock);
        if (queue_count < QUEUE_SLOTS) {
            queue[(queue_head + queue_count) % QUEUE_SLOTS] = fd;
            queue_count++;
            accepted++;
            pthread_cond_signal(&queue_ready);
            fd = -1;
        }
        pthread_mutex_unlock(&queue_lock);
        if (fd >= 0)
            close(fd);
    }
}
