/*
 * poll-server: a small line server in the classic shape, one poll() loop in
 * main() over a pollfd array kept on main's stack. It exists to be updated
 * while its main loop runs: each version below changes that loop before its
 * poll() call, which is exactly where a server's main loop always stands.
 *
 * Protocol (one request per line, one reply line each):
 *   PING      -> PONG v<version>
 *   INCR      -> COUNT <n>  (a counter shared by all clients)
 *   TICKS     -> TICKS <n>  (v2 on: how many times poll() timed out)
 *   WAKEUPS   -> WAKEUPS <n> (v3 on: how many times poll() returned)
 *   ACCEPTS   -> ACCEPTS <n> (v4 on: how many times the listener was ready)
 *   CONNS     -> CONNS <n>  (v5: connections open at the last poll())
 *   anything else -> ERR unknown command
 *
 * POLL_VERSION selects the version (undefined: 1); each of 2 to 5 is the
 * one before it with one more change:
 *   1  poll() blocks forever
 *   2  poll() times out after 20 ms; a timeout counts an idle tick (new
 *      global `ticks`, new branch in the loop)
 *   3  a new local before poll(): the timeout, computed each time round
 *      (longer once the server has been idle a while); poll()'s returns
 *      counted (new global `wakeups`)
 *   4  the loop body reordered: new connections are accepted before the
 *      others are served (and counted, new global `accepts`), and wakeups
 *      are counted at the end
 *   5  a new call before poll(): census() counts the open connections
 *      (new global `open_conns`)
 *   6  v1 that writes a global (`loops`) between the loop header and
 *      poll(): a frame waiting in that poll() must not go back to the loop
 *      header, since the write would happen twice
 *   7  v4 with a new call before poll() that shortens the array, trim():
 *      the count of entries in use, which the debug information places in
 *      no local inside the loop, is computed anew by code the old version
 *      does not have, so the value the old frame holds is not the one the
 *      new code would hold: main cannot move to the new version while it
 *      waits in poll()
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <upstare.h>

#ifndef POLL_VERSION
#define POLL_VERSION 1
#endif

#define MAX_FDS 32
#define LINE_MAX_LEN 256

/* Per connection: bytes of a line received but not yet ended. */
struct pending {
    char buf[LINE_MAX_LEN];
    size_t len;
};

static struct pending pending[MAX_FDS];
static unsigned long counter;

/* What each version has (v6 is v1 with an effect before poll()). */
#define SINCE(v) (POLL_VERSION >= (v) && POLL_VERSION != 6)
#define HAS_TICKS SINCE(2)
#define HAS_WAKEUPS SINCE(3)
#define ACCEPTS_FIRST SINCE(4)
#define HAS_CENSUS (POLL_VERSION == 5)
#define TRIMS (POLL_VERSION == 7)

#if HAS_TICKS
static unsigned long ticks;
#endif
#if HAS_WAKEUPS
static unsigned long wakeups;
#endif
#if ACCEPTS_FIRST
static unsigned long accepts;
#endif
#if HAS_CENSUS
static unsigned long open_conns;
#endif
#if POLL_VERSION == 6
static unsigned long loops;
#endif

static void reply(int fd, const char *line)
{
    size_t len = strlen(line), off = 0;
    while (off < len) {
        ssize_t n = send(fd, line + off, len - off, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        off += (size_t)n;
    }
}

static void handle(int fd, const char *line)
{
    char out[64];
    if (strcmp(line, "PING") == 0)
        snprintf(out, sizeof out, "PONG v%d\n", POLL_VERSION);
    else if (strcmp(line, "INCR") == 0)
        snprintf(out, sizeof out, "COUNT %lu\n", ++counter);
#if HAS_TICKS
    else if (strcmp(line, "TICKS") == 0)
        snprintf(out, sizeof out, "TICKS %lu\n", ticks);
#endif
#if HAS_WAKEUPS
    else if (strcmp(line, "WAKEUPS") == 0)
        snprintf(out, sizeof out, "WAKEUPS %lu\n", wakeups);
#endif
#if ACCEPTS_FIRST
    else if (strcmp(line, "ACCEPTS") == 0)
        snprintf(out, sizeof out, "ACCEPTS %lu\n", accepts);
#endif
#if HAS_CENSUS
    else if (strcmp(line, "CONNS") == 0)
        snprintf(out, sizeof out, "CONNS %lu\n", open_conns);
#endif
    else
        snprintf(out, sizeof out, "ERR unknown command\n");
    reply(fd, out);
}

/* Reads what arrived on fd and answers every complete line. Returns 0 once
   the peer is gone. */
static int serve_input(int slot, int fd)
{
    struct pending *p = &pending[slot];
    ssize_t n = recv(fd, p->buf + p->len, sizeof p->buf - 1 - p->len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 1;
    if (n <= 0)
        return 0;
    p->len += (size_t)n;
    char *start = p->buf, *nl;
    while ((nl = memchr(start, '\n', p->len - (size_t)(start - p->buf))) != NULL) {
        *nl = '\0';
        if (nl > start && nl[-1] == '\r')
            nl[-1] = '\0';
        handle(fd, start);
        start = nl + 1;
    }
    p->len -= (size_t)(start - p->buf);
    memmove(p->buf, start, p->len);
    if (p->len == sizeof p->buf - 1)
        p->len = 0; /* an overlong line is dropped */
    return 1;
}

/* Accepts one connection into the first free slot. Returns the new count
   of entries in use. */
static size_t accept_client(int listener, struct pollfd *fds, size_t nfds)
{
    int c = accept(listener, NULL, NULL);
    if (c < 0)
        return nfds;
    size_t slot = 1;
    while (slot < nfds && fds[slot].fd >= 0)
        slot++;
    if (slot == MAX_FDS) {
        close(c);
        return nfds;
    }
    fds[slot].fd = c;
    fds[slot].events = POLLIN;
    fds[slot].revents = 0;
    pending[slot].len = 0;
    return slot == nfds ? nfds + 1 : nfds;
}

#if HAS_CENSUS
/* Counts the connections open, for CONNS. */
static void census(const struct pollfd *fds, size_t nfds)
{
    unsigned long n = 0;
    for (size_t i = 1; i < nfds; i++)
        if (fds[i].fd >= 0)
            n++;
    open_conns = n;
}
#endif

#if TRIMS
/* Drops closed entries from the end of the array. */
static size_t trim(const struct pollfd *fds, size_t nfds)
{
    while (nfds > 1 && fds[nfds - 1].fd < 0)
        nfds--;
    return nfds;
}
#endif

int main(void)
{
    int listener = upstare_listener_fd(0);
    if (listener < 0) {
        fprintf(stderr, "poll-server: no preopened TCP listener (start the host with --tcplisten ADDR)\n");
        return 1;
    }
    struct pollfd fds[MAX_FDS];
    fds[0].fd = listener;
    fds[0].events = POLLIN;
    size_t nfds = 1;
    printf("poll-server v%d: listening on fd %d\n", POLL_VERSION, listener);
    fflush(stdout);

    for (;;) {
#if POLL_VERSION == 1
        int ready = poll(fds, nfds, -1);
#elif POLL_VERSION == 2
        int ready = poll(fds, nfds, 20);
        if (ready == 0) {
            ticks++;
            continue;
        }
#elif POLL_VERSION == 6
        loops++;
        int ready = poll(fds, nfds, -1);
#else
#if TRIMS
        nfds = trim(fds, nfds);
#endif
#if HAS_CENSUS
        census(fds, nfds);
#endif
        /* back off once the server has been idle for a while */
        int timeout = ticks < 1000 ? 20 : 50;
        int ready = poll(fds, nfds, timeout);
        if (ready == 0) {
            ticks++;
            continue;
        }
#if !ACCEPTS_FIRST
        wakeups++;
#endif
#endif
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            perror("poll-server: poll");
            return 1;
        }
#if ACCEPTS_FIRST
        if (fds[0].revents & POLLIN) {
            accepts++;
            nfds = accept_client(listener, fds, nfds);
        }
#endif
        for (size_t i = 1; i < nfds; i++) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            if (!serve_input((int)i, fds[i].fd)) {
                close(fds[i].fd);
                fds[i].fd = -1;
                pending[i].len = 0;
            }
        }
#if ACCEPTS_FIRST
        wakeups++;
#else
        if (fds[0].revents & POLLIN)
            nfds = accept_client(listener, fds, nfds);
#endif
    }
}
