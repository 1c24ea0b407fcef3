/*
 * recv-server: a blocking line server in the simplest shape: accept one
 * connection, then a loop of recv() on it until the peer goes away, then
 * the next connection. The serving loop keeps the line being received in a
 * buffer in its own frame in linear memory. It exists to be updated while a
 * client is in the middle of a line: the serving loop's frame stands at
 * recv() with half a line in that buffer when the update comes.
 *
 * Protocol (one request per line, one reply line each):
 *   PING        -> PONG v<version>
 *   INCR        -> COUNT <n>   (a counter shared by all connections)
 *   ECHO <text> -> <text>      (v2: ECHO[<n>] <text>, n the text's length)
 *   LINES       -> LINES <n>   (v2: how many lines were begun, counted
 *                               before the recv() that brings their start)
 *   DATA <n>    followed by n bytes (no line end): -> DATA <n> <sum>, sum
 *               the bytes' total (v3: DATA <n> bytes, sum <sum>, v3); the
 *               handler receives the n bytes itself, one recv() after
 *               another, so a request sent in two halves waits inside it
 *   anything else -> ERR unknown command
 *
 * RECV_VERSION selects the version (undefined: 1):
 *   1  as above
 *   2  the serving loop changes before recv(): a new branch counts the
 *      lines begun (a new global, `lines`); the reply buffer is twice as
 *      big and a second one holds ECHO's tag, so the loop's frame in linear
 *      memory grows (320 to 416 bytes) and the line buffer moves within it
 *   3  v1 with DATA's handler changed: a new reply, and it counts the
 *      requests it answered (a new global, `data_requests`); a request
 *      half received waits in the handler when the update comes
 *
 * RECV_PINNED (defined or not, with either version) keeps a pointer to the
 * line buffer in a global (`line_in_progress`): a frame standing at recv()
 * whose area moves cannot be rebuilt, since that pointer would go on
 * pointing at the buffer's old place, so an update from pinned v1 to
 * pinned v2 is refused naming it.
 *
 * Every version counts its recv() calls in a global before each call
 * (`reads`), so the serving loop cannot go back to its loop header: its
 * frame is rebuilt where it stands, at the call.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <upstare.h>

#ifndef RECV_VERSION
#define RECV_VERSION 1
#endif

#define LINE_MAX_LEN 256

static unsigned long counter;
unsigned long reads;
#if RECV_VERSION == 2
unsigned long lines, connections;
#endif
#if RECV_VERSION == 3
unsigned long data_requests;
#endif
#ifdef RECV_PINNED
char *volatile line_in_progress;
#endif

static void reply(int fd, const char *text, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(fd, text + off, len - off, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        off += (size_t)n;
    }
}

/* Answers one request line into out; returns the reply's length. */
static __attribute__((noinline)) size_t answer(const char *line, const char *tag, char *out, size_t size)
{
    int n;
    (void)tag;
    if (strcmp(line, "PING") == 0)
        n = snprintf(out, size, "PONG v%d\n", RECV_VERSION);
    else if (strcmp(line, "INCR") == 0)
        n = snprintf(out, size, "COUNT %lu\n", ++counter);
    else if (strncmp(line, "ECHO ", 5) == 0)
#if RECV_VERSION == 2
        n = snprintf(out, size, "%s %s\n", tag, line + 5);
#else
        n = snprintf(out, size, "%s\n", line + 5);
#endif
#if RECV_VERSION == 2
    else if (strcmp(line, "LINES") == 0)
        n = snprintf(out, size, "LINES %lu\n", lines);
#endif
    else
        n = snprintf(out, size, "ERR unknown command\n");
    return n < 0 ? 0 : (size_t)n >= size ? size - 1 : (size_t)n;
}

/* The line being received on a connection: its first len bytes. */
struct pending {
    size_t len;
    char buf[LINE_MAX_LEN];
};

#define DATA_MAX 4096

/* Answers a DATA request of n bytes whose first len bytes are at have: it
   receives the rest itself. */
static __attribute__((noinline)) void data_request(int conn, size_t n, const char *have, size_t len)
{
    unsigned long sum = 0;
    size_t got;
    for (got = 0; got < len; got++)
        sum += (unsigned char)have[got];
    char chunk[64];
    while (got < n) {
        size_t want = n - got < sizeof chunk ? n - got : sizeof chunk;
        ssize_t r = recv(conn, chunk, want, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return;
        for (ssize_t i = 0; i < r; i++)
            sum += (unsigned char)chunk[i];
        got += (size_t)r;
    }
    char out[64];
#if RECV_VERSION == 3
    data_requests++;
    int m = snprintf(out, sizeof out, "DATA %zu bytes, sum %lu, v3\n", n, sum);
#else
    int m = snprintf(out, sizeof out, "DATA %zu %lu\n", n, sum);
#endif
    reply(conn, out, m < 0 ? 0 : (size_t)m);
}

/* Answers every complete line at the start of p->buf and keeps the rest. */
static __attribute__((noinline)) void take_lines(int conn, struct pending *p)
{
    size_t done = 0;
    char *nl;
    while ((nl = memchr(p->buf + done, '\n', p->len - done)) != NULL) {
        char *start = p->buf + done;
        *nl = '\0';
        if (nl > start && nl[-1] == '\r')
            nl[-1] = '\0';
        done = (size_t)(nl - p->buf) + 1;
        size_t n;
        if (sscanf(start, "DATA %zu", &n) == 1 && n <= DATA_MAX) {
            /* the payload's bytes already here are the request's */
            size_t have = p->len - done < n ? p->len - done : n;
            data_request(conn, n, p->buf + done, have);
            done += have;
            continue;
        }
#if RECV_VERSION == 2
        char out[128], tag[32];
        snprintf(tag, sizeof tag, "ECHO[%zu]", strlen(start) > 5 ? strlen(start) - 5 : 0);
#else
        char out[64], *tag = NULL;
#endif
        reply(conn, out, answer(start, tag, out, sizeof out));
    }
    p->len -= done;
    memmove(p->buf, p->buf + done, p->len);
    if (p->len == sizeof p->buf - 1)
        p->len = 0; /* an overlong line is dropped */
}

/* Serves one connection until the peer goes away. */
static __attribute__((noinline)) void serve(int conn)
{
#if RECV_VERSION == 2
    {
        /* a log line per connection, built in a second buffer of the frame */
        char note[64];
        snprintf(note, sizeof note, "recv-server v%d: connection %lu", RECV_VERSION, ++connections);
        fprintf(stderr, "%s\n", note);
    }
#endif
    struct pending p;
    p.len = 0;
#ifdef RECV_PINNED
    line_in_progress = p.buf;
#endif
    for (;;) {
#if RECV_VERSION == 2
        if (p.len == 0)
            lines++;
#endif
        reads++;
        ssize_t got = recv(conn, p.buf + p.len, sizeof p.buf - 1 - p.len, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return;
        p.len += (size_t)got;
        take_lines(conn, &p);
    }
}

int main(void)
{
    int listener = upstare_listener_fd(0);
    if (listener < 0) {
        fprintf(stderr, "recv-server: no preopened TCP listener (start the host with --tcplisten ADDR)\n");
        return 1;
    }
    printf("recv-server v%d: listening on fd %d\n", RECV_VERSION, listener);
    fflush(stdout);
    for (;;) {
        int conn = accept(listener, NULL, NULL);
        if (conn < 0)
            continue;
        serve(conn);
        close(conn);
    }
}
