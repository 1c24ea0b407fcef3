/*
 * What both release servers share: their protocol and their connections.
 * One poll() loop in serve() (which returns only for SHUTDOWN) over the
 * listener and up to MAX_CONNS connections; one request per line, one
 * reply line each, in order (`\r` before `\n` ignored, a line longer than
 * LINE_MAX_LEN - 1 bytes dropped):
 *   SET <key> <value>  -> OK                   (value: the rest of the line)
 *   GET <key>          -> VALUE <value> | NOT_FOUND
 *   COUNT              -> COUNT <keys>
 *   VERSION            -> VERSION <the embedded library's release>
 *   QUIT               -> BYE, and this connection is closed
 *   SHUTDOWN           -> BYE, and the server exits with status 0
 *   anything else      -> the server's other_command(), else
 *                         ERROR unknown command (or ERROR usage: ...)
 * (kv-server's replies for the same commands.) A server includes this once
 * and defines the functions declared below; each answers with reply().
 */
#ifndef KV_PROTOCOL_H
#define KV_PROTOCOL_H

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <upstare.h>

#define MAX_CONNS 64
#define LINE_MAX_LEN 4096

enum outcome { KEEP, CLOSE, EXIT };

static void set_value(int fd, const char *key, const char *value);
static void get_value(int fd, const char *key);
static void count_keys(int fd);
static const char *release(void);
/* Answers a command this protocol does not know; returns 0 if it is not
   the server's either. */
static int other_command(int fd, const char *command, const char *arg);

/* One connection: its socket (-1 when the entry is free) and the bytes of
   a line received but not yet ended. */
struct conn {
    int fd;
    size_t len;
    char buf[LINE_MAX_LEN];
};

static struct conn conns[MAX_CONNS];

static void send_all(int fd, const char *data, size_t len)
{
    for (size_t off = 0; off < len;) {
        ssize_t n = send(fd, data + off, len - off, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        off += (size_t)n;
    }
}

/* Sends one reply line: `head`, then `len` bytes of `tail` (if any). */
static void reply(int fd, const char *head, const char *tail, size_t len)
{
    send_all(fd, head, strlen(head));
    if (tail)
        send_all(fd, tail, len);
    send_all(fd, "\n", 1);
}

/* Answers one request line (ended by '\0'). */
static enum outcome handle(int fd, char *line)
{
    if (*line == '\0')
        return KEEP;
    char *arg = strchr(line, ' ');
    if (arg)
        *arg++ = '\0';
    char *value = arg ? strchr(arg, ' ') : NULL;
    if (strcmp(line, "SET") == 0 && (!value || value == arg)) {
        reply(fd, "ERROR usage: SET <key> <value>", NULL, 0);
    } else if (strcmp(line, "SET") == 0) {
        *value++ = '\0';
        set_value(fd, arg, value);
    } else if (strcmp(line, "GET") == 0) {
        if (!arg || !*arg || value)
            reply(fd, "ERROR usage: GET <key>", NULL, 0);
        else
            get_value(fd, arg);
    } else if (strcmp(line, "COUNT") == 0) {
        count_keys(fd);
    } else if (strcmp(line, "VERSION") == 0) {
        reply(fd, "VERSION ", release(), strlen(release()));
    } else if (strcmp(line, "QUIT") == 0 || strcmp(line, "SHUTDOWN") == 0) {
        reply(fd, "BYE", NULL, 0);
        return line[0] == 'Q' ? CLOSE : EXIT;
    } else if (!other_command(fd, line, arg)) {
        reply(fd, "ERROR unknown command", NULL, 0);
    }
    return KEEP;
}

/* Reads what arrived on `c` and answers every complete line in it. */
static enum outcome read_requests(struct conn *c)
{
    ssize_t n = recv(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len, 0);
    if (n < 0)
        return errno == EAGAIN || errno == EINTR ? KEEP : CLOSE;
    if (n == 0)
        return CLOSE;
    c->len += (size_t)n;
    size_t done = 0;
    enum outcome outcome = KEEP;
    char *nl;
    while (outcome == KEEP && (nl = memchr(c->buf + done, '\n', c->len - done)) != NULL) {
        *nl = '\0';
        if (nl > c->buf + done && nl[-1] == '\r')
            nl[-1] = '\0';
        outcome = handle(c->fd, c->buf + done);
        done = (size_t)(nl - c->buf) + 1;
    }
    c->len -= done;
    memmove(c->buf, c->buf + done, c->len);
    if (c->len == sizeof c->buf - 1)
        c->len = 0; /* an overlong line is dropped */
    return outcome;
}

/* Serves the listener until a SHUTDOWN; returns main's status. */
static int serve(const char *name, int listener)
{
    struct pollfd fds[MAX_CONNS + 1];
    struct conn *polled[MAX_CONNS + 1];
    for (int i = 0; i < MAX_CONNS; i++)
        conns[i].fd = -1;
    for (;;) {
        /* The listener first, then every open connection. */
        nfds_t nfds = 0;
        fds[nfds++] = (struct pollfd){ .fd = listener, .events = POLLIN };
        for (int i = 0; i < MAX_CONNS; i++) {
            if (conns[i].fd >= 0) {
                polled[nfds] = &conns[i];
                fds[nfds++] = (struct pollfd){ .fd = conns[i].fd, .events = POLLIN };
            }
        }
        if (poll(fds, nfds, -1) < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "%s: poll: %s\n", name, strerror(errno));
            return 1;
        }
        for (nfds_t i = 1; i < nfds; i++) {
            if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            switch (read_requests(polled[i])) {
            case EXIT:
                printf("%s: shutdown\n", name);
                return 0;
            case CLOSE:
                close(polled[i]->fd);
                polled[i]->fd = -1;
                polled[i]->len = 0;
                break;
            case KEEP:
                break;
            }
        }
        if (fds[0].revents & POLLIN) {
            int fd = accept(listener, NULL, NULL);
            struct conn *free_entry = NULL;
            for (int i = 0; fd >= 0 && i < MAX_CONNS && !free_entry; i++)
                free_entry = conns[i].fd < 0 ? &conns[i] : NULL;
            if (free_entry)
                *free_entry = (struct conn){ .fd = fd, .len = 0 };
            else if (fd >= 0)
                close(fd); /* full: a client that comes back later is served */
        }
    }
}

#endif
