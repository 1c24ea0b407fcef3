/*
 * kv: an in-memory key-value server speaking a line protocol over TCP.
 *
 * One thread, one poll() loop, many connections, on a listener the host
 * preopens (see upstare.h). It is the long-running, stateful guest for
 * UpStare's update tests: its store lives on the heap, reachable from one
 * global, and connections carry partial input and pending output across
 * loop iterations. The protocol is described in guest-examples/README.md.
 *
 * One source, several versions, chosen with -DKV_VERSION=N (default 1), so
 * that each difference between versions sits in one #if here:
 *   1  the protocol above.
 *   2  counts handled requests and poll() wake-ups in a global struct and
 *      answers STATS; everything else answers as in 1. It changes main (the
 *      poll loop of serve() is inlined into it at -O2) without changing the
 *      size of its shadow-stack frame, so it can be updated to while main
 *      waits in poll(): the STATS reply is formatted in its own function,
 *      whose buffer lives in its own frame.
 *   3  adds a field to that struct, in the middle (bytes_in, bytes received),
 *      and STATS reports it: an update 2 -> 3 maps the other fields by name.
 *   4  changes the type of a field (requests becomes a pointer to the name
 *      of the last command): no automatic mapping can carry a count into a
 *      pointer, so an update 2 -> 4 must be refused. It exists to be refused.
 *   5  is 4 with a state transformer (UPSTARE_TRANSFORM, see upstare.h) that
 *      builds the new struct from version 2's: it carries `wakeups` and
 *      sets `requests` to "(from-v2)". Its STATS does not count itself as
 *      the last command, so the transformer's value shows until another
 *      command replaces it. An update 2 -> 5 goes through.
 *   6  is 5 with a transformer that overwrites version 2's `stats`, then
 *      traps: an update 2 -> 6 fails and is rolled back, memory and all. It
 *      exists to fail.
 *   7  is 2 with main's shadow-stack frame grown (the listening line is
 *      formatted in a buffer of main's): main waits in poll() for as long
 *      as the server runs, so its frame never leaves the stack and can
 *      never move to the new layout. An update 2 -> 7 must be refused.
 *   8  is 2 with the poll loop also checking that it has a listener: the
 *      code before poll() computes `listening` differently, so a compiler
 *      temporary live across the call may mean something else, and main's
 *      frame cannot move either: an update 2 -> 8 must be refused.
 *   9  is 2 with a SLEEP command (see sleep_command()), whose frame stays
 *      on the stack while it sleeps.
 *   10 is 9 with sleep_command() changed before its blocking call (its
 *      reply buffer grows): its frame cannot move while it sleeps, so an
 *      update 9 -> 10 during a SLEEP waits for it to return.
 *   11 is 2 keeping a pointer to `stats` in another global; 12 is 11 with
 *      v3's field added to `stats`: an update 11 -> 12 moves `stats` and
 *      rewrites the typed pointer to it.
 *   13 is 2 whose heap objects gain fields: every key's entry counts the
 *      GETs it served (HITS <key>), every connection the requests it sent
 *      (MINE). An update 2 -> 13 converts every entry and connection on
 *      the heap, with no code written for it.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <upstare.h>

#ifndef KV_VERSION
#define KV_VERSION 1
#endif
#if KV_VERSION < 1 || KV_VERSION > 13
#error "KV_VERSION must be 1 to 13"
#endif
/* Versions whose `stats.requests` is the last command's name. */
#define KV_LAST_NAME (KV_VERSION >= 4 && KV_VERSION <= 6)
/* Versions with the SLEEP command. */
#define KV_SLEEP (KV_VERSION >= 9 && KV_VERSION <= 10)
/* Versions whose stats count the bytes received (v3's field). */
#define KV_BYTES_IN (KV_VERSION == 3 || KV_VERSION == 12)
/* Versions that keep a pointer to `stats` in another global: an update that
   moves `stats` (its type changed) cannot redirect that pointer. */
#define KV_STATS_VIEW (KV_VERSION == 11 || KV_VERSION == 12)
/* Versions whose entries and connections carry counters (see 13). */
#define KV_HEAP_FIELDS (KV_VERSION == 13)

#define READ_CHUNK 4096
/* A client that sends this much without a newline is not speaking the
   protocol; dropping it bounds the memory one connection can take. */
#define MAX_LINE (1024 * 1024)
/* Past this much unsent output, stop reading that client until it catches
   up, so a client that pipelines requests but never reads cannot make the
   server buffer without bound. */
#define OUTPUT_HIGH_WATER (1024 * 1024)
#define DEFAULT_MAX_CONNS 1024
/* wasi-libc's poll() puts 80 bytes per descriptor on the shadow stack; the
   1 MiB stack this guest is linked with (see build.flags) bounds this. */
#define LIMIT_MAX_CONNS 4096
#define INITIAL_BUCKETS 16

/* ---- the store ----------------------------------------------------------- */

struct entry {
    struct entry *next;
    uint32_t hash;
#if KV_HEAP_FIELDS
    uint32_t hits; /* GETs that found it */
#endif
    size_t key_len;
    size_t value_len;
    char *key;
    char *value;
};

struct table {
    struct entry **buckets;
    size_t nbuckets; /* a power of two */
    size_t count;
};

/* Everything the server knows hangs off this one global. Not static: the
   optimizer turns a static pointer that is assigned once from malloc() into
   static storage, or not, depending on how the code around it inlines, and
   two versions must agree on which the table is. */
struct table *store;

#if KV_VERSION >= 2
/* What STATS reports. Not static: a static struct whose address never
   escapes may be split by the optimizer into one symbol per field, which an
   update cannot map field by field; with external linkage it stays whole and
   its DWARF type lets v3's new field be added live. */
struct server_stats {
#if KV_LAST_NAME
    const char *requests; /* the last command's name, or NULL */
#else
    unsigned long requests; /* request lines handled */
#endif
#if KV_BYTES_IN
    unsigned long bytes_in; /* bytes received from clients */
#endif
    unsigned long wakeups; /* returns from poll() */
} stats;
#endif
#if KV_STATS_VIEW
/* Not static, so the optimizer keeps it. */
struct server_stats *stats_view = &stats;
/* STATS reads through the pointer, so a reply shows where it points. */
#define STATS_READ (*stats_view)
#else
#define STATS_READ stats
#endif

static void die(const char *what)
{
    fprintf(stderr, "kv: %s\n", what);
    exit(1);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

static void *xrealloc(void *old, size_t n)
{
    void *p = realloc(old, n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (!p)
        die("out of memory");
    return p;
}

static char *copy_bytes(const char *s, size_t n)
{
    char *p = xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

/* FNV-1a: short keys, no adversary, and cheap. */
static uint32_t hash_bytes(const char *s, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

static struct table *table_new(void)
{
    struct table *t = xmalloc(sizeof *t);
    t->nbuckets = INITIAL_BUCKETS;
    t->buckets = xcalloc(t->nbuckets, sizeof *t->buckets);
    t->count = 0;
    return t;
}

static struct entry **table_slot(struct table *t, const char *key, size_t key_len, uint32_t h)
{
    struct entry **p = &t->buckets[h & (t->nbuckets - 1)];
    while (*p && !((*p)->hash == h && (*p)->key_len == key_len &&
                   memcmp((*p)->key, key, key_len) == 0))
        p = &(*p)->next;
    return p;
}

static void table_grow(struct table *t)
{
    size_t n = t->nbuckets * 2;
    struct entry **b = xcalloc(n, sizeof *b);
    for (size_t i = 0; i < t->nbuckets; i++) {
        struct entry *e = t->buckets[i];
        while (e) {
            struct entry *next = e->next;
            struct entry **head = &b[e->hash & (n - 1)];
            e->next = *head;
            *head = e;
            e = next;
        }
    }
    free(t->buckets);
    t->buckets = b;
    t->nbuckets = n;
}

static void table_set(struct table *t, const char *key, size_t key_len, const char *value,
                      size_t value_len)
{
    uint32_t h = hash_bytes(key, key_len);
    struct entry **slot = table_slot(t, key, key_len, h);
    if (*slot) {
        free((*slot)->value);
        (*slot)->value = copy_bytes(value, value_len);
        (*slot)->value_len = value_len;
        return;
    }
    struct entry *e = xmalloc(sizeof *e);
    e->next = NULL;
    e->hash = h;
#if KV_HEAP_FIELDS
    e->hits = 0;
#endif
    e->key = copy_bytes(key, key_len);
    e->key_len = key_len;
    e->value = copy_bytes(value, value_len);
    e->value_len = value_len;
    *slot = e;
    t->count++;
    /* grow after linking in, so the slot pointer above stayed valid */
    if (t->count > t->nbuckets / 4 * 3)
        table_grow(t);
}

static struct entry *table_get(struct table *t, const char *key, size_t key_len)
{
    return *table_slot(t, key, key_len, hash_bytes(key, key_len));
}

static int table_del(struct table *t, const char *key, size_t key_len)
{
    struct entry **slot = table_slot(t, key, key_len, hash_bytes(key, key_len));
    struct entry *e = *slot;
    if (!e)
        return 0;
    *slot = e->next;
    free(e->key);
    free(e->value);
    free(e);
    t->count--;
    return 1;
}

/* ---- connections --------------------------------------------------------- */

enum conn_state {
    CONN_OPEN,
    CONN_CLOSING, /* no more input; close once the output is sent */
    CONN_DEAD,    /* close now */
};

struct conn {
#if KV_HEAP_FIELDS
    unsigned long requests; /* request lines from this client */
#endif
    int fd;
    int nonblocking;
    enum conn_state state;
    char *in;
    size_t in_len;
    size_t in_cap;
    char *out;
    size_t out_len;
    size_t out_sent;
    size_t out_cap;
};

static struct conn **conns;
static size_t nconns;
static size_t max_conns = DEFAULT_MAX_CONNS;
static struct pollfd *pfds;
static int listener = -1;
static int listener_nonblocking;
static int shutdown_requested;

static int set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    return flags >= 0 && fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0;
}

static size_t pending_output(const struct conn *c)
{
    return c->out_len - c->out_sent;
}

static void out_append(struct conn *c, const char *s, size_t n)
{
    if (c->out_sent == c->out_len)
        c->out_sent = c->out_len = 0;
    if (c->out_len + n > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 256;
        while (cap < c->out_len + n)
            cap *= 2;
        c->out = xrealloc(c->out, cap);
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, s, n);
    c->out_len += n;
}

static void reply(struct conn *c, const char *s)
{
    out_append(c, s, strlen(s));
    out_append(c, "\n", 1);
}

static void conn_flush(struct conn *c)
{
    while (pending_output(c) > 0) {
        ssize_t n = send(c->fd, c->out + c->out_sent, pending_output(c), 0);
        if (n > 0) {
            c->out_sent += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n == 0 || errno == EAGAIN || errno == EWOULDBLOCK) {
            return; /* poll for POLLOUT and try again */
        } else {
            c->state = CONN_DEAD;
            return;
        }
    }
    c->out_sent = c->out_len = 0;
}

/* ---- the protocol --------------------------------------------------------- */

struct args {
    const char *p;
    size_t n;
};

static int word_is(const char *w, size_t n, const char *name)
{
    return strlen(name) == n && strncasecmp(w, name, n) == 0;
}

static void skip_spaces(struct args *a)
{
    while (a->n > 0 && a->p[0] == ' ') {
        a->p++;
        a->n--;
    }
}

static int only_spaces_left(struct args a)
{
    skip_spaces(&a);
    return a.n == 0;
}

/* Takes the next space-delimited word; returns its length (0: none). */
static size_t take_word(struct args *a, const char **word)
{
    skip_spaces(a);
    size_t n = 0;
    while (n < a->n && a->p[n] != ' ')
        n++;
    *word = a->p;
    a->p += n;
    a->n -= n;
    return n;
}

#if KV_HEAP_FIELDS
/* Out of line for the reason reply_stats() is. */
__attribute__((noinline)) static void reply_count(struct conn *c, const char *what, unsigned long n)
{
    char buf[40];
    snprintf(buf, sizeof buf, "%s %lu", what, n);
    reply(c, buf);
}
#endif

#if KV_VERSION >= 2
/* Kept out of line so that its buffer does not grow the frame of any
   function that is on the stack while the server waits (see the top). */
__attribute__((noinline)) static void reply_stats(struct conn *c)
{
    char buf[160];
#if KV_LAST_NAME
    snprintf(buf, sizeof buf, "STATS last=%s keys=%zu wakeups=%lu",
             stats.requests ? stats.requests : "-", store->count, stats.wakeups);
#elif KV_BYTES_IN
    snprintf(buf, sizeof buf, "STATS requests=%lu keys=%zu wakeups=%lu bytes_in=%lu",
             STATS_READ.requests, store->count, STATS_READ.wakeups, STATS_READ.bytes_in);
#elif KV_STATS_VIEW
    snprintf(buf, sizeof buf, "STATS requests=%lu keys=%zu wakeups=%lu", stats_view->requests,
             store->count, stats_view->wakeups);
#else
    snprintf(buf, sizeof buf, "STATS requests=%lu keys=%zu wakeups=%lu", stats.requests,
             store->count, stats.wakeups);
#endif
    reply(c, buf);
}
#endif

#if KV_LAST_NAME
static const char *const command_names[] = {"SET", "GET", "DEL", "COUNT", "QUIT", "SHUTDOWN", "STATS"};

static const char *command_name(const char *w, size_t n)
{
    for (size_t i = 0; i < sizeof command_names / sizeof command_names[0]; i++)
        if (strlen(command_names[i]) == n && strncasecmp(w, command_names[i], n) == 0)
            return command_names[i];
    return "?";
}
#endif

#if KV_VERSION == 5 || KV_VERSION == 6
/* `stats` as versions 2 and 7 to 10 lay it out: what the transformer reads. */
struct server_stats_v2 {
    unsigned long requests;
    unsigned long wakeups;
};

/* No automatic mapping turns a count into a name, so the update leaves the
   new `stats` zero and this fills it in. */
UPSTARE_TRANSFORM(stats)
{
#if KV_VERSION == 6
    /* A transformer with a bug: it overwrites the old version's state, then
       traps. The update must roll back with memory as it was before. */
    volatile struct server_stats_v2 *scribble = (volatile struct server_stats_v2 *)old_value;
    scribble->requests = 0xdeadbeef;
    scribble->wakeups = 0;
    __builtin_trap();
#endif
    const struct server_stats_v2 *old = old_value;
    struct server_stats *new = new_value;
    new->requests = "(from-v2)";
    new->wakeups = old->wakeups;
}
#endif

#if KV_SLEEP
#include <time.h>

#define SLEEP_MAX_MS 10000

/* SLEEP <ms>: blocks the whole server for that long, then replies. Kept
   out of line so that its frame is on the stack for as long as it sleeps.
   It sleeps until a deadline, not for an interval: a blocking call the host
   interrupts (to pause the program) starts again when the program resumes,
   and an interval would start over with it. */
__attribute__((noinline)) static void sleep_command(struct conn *c, long ms)
{
#if KV_VERSION == 10
    char buf[64];
#else
    char buf[32];
#endif
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += ms / 1000;
    deadline.tv_nsec += ms % 1000 * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL) == EINTR)
        ;
#if KV_VERSION == 10
    snprintf(buf, sizeof buf, "SLEPT %ld ms", ms);
#else
    snprintf(buf, sizeof buf, "SLEPT %ld", ms);
#endif
    reply(c, buf);
}
#endif

static void handle_line(struct conn *c, const char *line, size_t len)
{
    if (len > 0 && line[len - 1] == '\r')
        len--;
    struct args a = {line, len};
    const char *cmd;
    size_t cmd_len = take_word(&a, &cmd);
    if (cmd_len == 0)
        return; /* blank lines get no reply */
#if KV_VERSION == 4
    stats.requests = command_name(cmd, cmd_len);
#elif KV_LAST_NAME
    /* STATS shows the command before it, or what a transformer left */
    if (!word_is(cmd, cmd_len, "STATS"))
        stats.requests = command_name(cmd, cmd_len);
#elif KV_VERSION >= 2
    stats.requests++;
#endif
#if KV_HEAP_FIELDS
    c->requests++;
#endif

    const char *key;
    size_t key_len;
    if (word_is(cmd, cmd_len, "SET")) {
        key_len = take_word(&a, &key);
        /* the value is everything after the one space that ends the key */
        if (key_len == 0 || a.n == 0) {
            reply(c, "ERROR usage: SET <key> <value>");
            return;
        }
        table_set(store, key, key_len, a.p + 1, a.n - 1);
        reply(c, "OK");
    } else if (word_is(cmd, cmd_len, "GET")) {
        key_len = take_word(&a, &key);
        if (key_len == 0 || !only_spaces_left(a)) {
            reply(c, "ERROR usage: GET <key>");
            return;
        }
        struct entry *e = table_get(store, key, key_len);
        if (!e) {
            reply(c, "NOT_FOUND");
            return;
        }
#if KV_HEAP_FIELDS
        e->hits++;
#endif
        out_append(c, "VALUE ", 6);
        out_append(c, e->value, e->value_len);
        out_append(c, "\n", 1);
    } else if (word_is(cmd, cmd_len, "DEL")) {
        key_len = take_word(&a, &key);
        if (key_len == 0 || !only_spaces_left(a)) {
            reply(c, "ERROR usage: DEL <key>");
            return;
        }
        reply(c, table_del(store, key, key_len) ? "DELETED" : "NOT_FOUND");
    } else if (word_is(cmd, cmd_len, "COUNT")) {
        if (!only_spaces_left(a)) {
            reply(c, "ERROR usage: COUNT");
            return;
        }
        char buf[40];
        snprintf(buf, sizeof buf, "COUNT %zu", store->count);
        reply(c, buf);
    } else if (word_is(cmd, cmd_len, "QUIT")) {
        reply(c, "BYE");
        c->state = CONN_CLOSING;
    } else if (word_is(cmd, cmd_len, "SHUTDOWN")) {
        reply(c, "BYE");
        c->state = CONN_CLOSING;
        shutdown_requested = 1;
#if KV_VERSION >= 2
    } else if (word_is(cmd, cmd_len, "STATS")) {
        if (!only_spaces_left(a)) {
            reply(c, "ERROR usage: STATS");
            return;
        }
        reply_stats(c);
#endif
#if KV_HEAP_FIELDS
    } else if (word_is(cmd, cmd_len, "HITS")) {
        key_len = take_word(&a, &key);
        if (key_len == 0 || !only_spaces_left(a)) {
            reply(c, "ERROR usage: HITS <key>");
            return;
        }
        struct entry *e = table_get(store, key, key_len);
        if (e)
            reply_count(c, "HITS", e->hits);
        else
            reply(c, "NOT_FOUND");
    } else if (word_is(cmd, cmd_len, "MINE")) {
        reply_count(c, "MINE", c->requests);
#endif
#if KV_SLEEP
    } else if (word_is(cmd, cmd_len, "SLEEP")) {
        const char *ms_word;
        size_t ms_len = take_word(&a, &ms_word);
        char digits[8] = "";
        char *end = digits;
        long ms = -1;
        if (ms_len > 0 && ms_len < sizeof digits && only_spaces_left(a)) {
            memcpy(digits, ms_word, ms_len);
            digits[ms_len] = '\0';
            ms = strtol(digits, &end, 10);
        }
        if (ms < 0 || ms > SLEEP_MAX_MS || *end != '\0') {
            reply(c, "ERROR usage: SLEEP <ms>");
            return;
        }
        sleep_command(c, ms);
#endif
    } else {
        reply(c, "ERROR unknown command");
    }
}

/* Runs every complete line in the input buffer, keeping a partial last line
   for the next read: one read may hold many commands, or part of one. */
static void process_input(struct conn *c)
{
    size_t start = 0;
    while (c->state == CONN_OPEN && !shutdown_requested) {
        char *nl = memchr(c->in + start, '\n', c->in_len - start);
        if (!nl)
            break;
        size_t len = (size_t)(nl - (c->in + start));
        handle_line(c, c->in + start, len);
        start += len + 1;
    }
    if (c->state != CONN_OPEN || shutdown_requested) {
        c->in_len = 0; /* whatever follows QUIT is not answered */
        return;
    }
    memmove(c->in, c->in + start, c->in_len - start);
    c->in_len -= start;
    if (c->in_len > MAX_LINE) {
        reply(c, "ERROR line too long");
        c->state = CONN_CLOSING;
        c->in_len = 0;
    }
}

static void conn_read(struct conn *c)
{
    if (c->in_cap - c->in_len < READ_CHUNK) {
        c->in_cap = c->in_len + READ_CHUNK;
        c->in = xrealloc(c->in, c->in_cap);
    }
    ssize_t n = recv(c->fd, c->in + c->in_len, READ_CHUNK, 0);
    if (n > 0) {
        c->in_len += (size_t)n;
#if KV_BYTES_IN
        stats.bytes_in += (unsigned long)n;
#endif
        process_input(c);
    } else if (n == 0) {
        /* The client has finished sending. A last line without its newline
           still counts, and replies already due are still sent. */
        if (c->in_len > 0)
            handle_line(c, c->in, c->in_len);
        c->in_len = 0;
        if (c->state == CONN_OPEN)
            c->state = CONN_CLOSING;
    } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        c->state = CONN_DEAD;
    }
}

static void conn_add(int fd)
{
    struct conn *c = xcalloc(1, sizeof *c);
    c->fd = fd;
    /* Blocking connections still work, since reads and writes only follow
       poll() readiness; non-blocking ones also cope with partial sends. */
    c->nonblocking = set_nonblocking(fd);
    c->state = CONN_OPEN;
    conns[nconns++] = c;
}

static void conn_free(struct conn *c)
{
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

static void accept_new(void)
{
    while (nconns < max_conns) {
        struct sockaddr_storage addr;
        socklen_t addr_len = sizeof addr;
        /* this wasi-libc writes through addr and addr_len unchecked, so
           they must not be NULL */
        int fd = accept(listener, (struct sockaddr *)&addr, &addr_len);
        if (fd >= 0) {
            conn_add(fd);
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return;
        } else if (errno != EINTR && errno != ECONNABORTED) {
            fprintf(stderr, "kv: accept: %s\n", strerror(errno));
            return;
        }
        /* a blocking listener may only be asked once per readiness */
        if (!listener_nonblocking)
            return;
    }
}

/* Closes finished connections and packs the survivors, keeping their order. */
static void sweep(void)
{
    size_t kept = 0;
    for (size_t i = 0; i < nconns; i++) {
        struct conn *c = conns[i];
        if (c->state == CONN_DEAD || (c->state == CONN_CLOSING && pending_output(c) == 0))
            conn_free(c);
        else
            conns[kept++] = c;
    }
    nconns = kept;
}

static void shutdown_all(void)
{
    for (size_t i = 0; i < nconns; i++) {
        /* one last try at sending replies (the BYE to SHUTDOWN among them),
           without waiting on slow clients */
        if (conns[i]->state != CONN_DEAD)
            conn_flush(conns[i]);
        conn_free(conns[i]);
    }
    nconns = 0;
    close(listener);
    printf("kv: shutdown\n");
    fflush(stdout);
}

static void serve(void)
{
    for (;;) {
        size_t n = 0;
#if KV_VERSION == 8
        int listening = nconns < max_conns && listener >= 0;
#else
        int listening = nconns < max_conns;
#endif
        if (listening) {
            pfds[n].fd = listener;
            pfds[n].events = POLLIN;
            pfds[n].revents = 0;
            n++;
        }
        size_t first_conn = n;
        for (size_t i = 0; i < nconns; i++) {
            struct conn *c = conns[i];
            short ev = 0;
            if (c->state == CONN_OPEN && pending_output(c) < OUTPUT_HIGH_WATER)
                ev |= POLLIN;
            if (pending_output(c) > 0)
                ev |= POLLOUT;
            /* never 0: sweep() removed every connection with nothing to do,
               and wasi-libc's poll() rejects an entry that asks for nothing */
            pfds[n].fd = c->fd;
            pfds[n].events = ev;
            pfds[n].revents = 0;
            n++;
        }

        if (poll(pfds, n, -1) < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "kv: poll: %s\n", strerror(errno));
            exit(1);
        }
#if KV_VERSION >= 2
        stats.wakeups++;
#endif

        for (size_t i = 0; i < nconns && !shutdown_requested; i++) {
            struct conn *c = conns[i];
            short re = pfds[first_conn + i].revents;
            if (re & POLLNVAL) {
                c->state = CONN_DEAD;
                continue;
            }
            /* On hangup or error a read still drains what arrived before,
               then reports end of stream or the error itself. */
            if ((re & (POLLIN | POLLHUP | POLLERR)) && c->state == CONN_OPEN)
                conn_read(c);
            else if ((re & POLLERR) && c->state == CONN_CLOSING)
                c->state = CONN_DEAD;
            /* A hangup seen while closing may be only the client's half-close:
               keep sending, and let send() say whether anyone is left. */
            /* replies just produced usually fit in the socket buffer, so try
               now rather than after another poll() */
            if (c->state != CONN_DEAD && pending_output(c) > 0)
                conn_flush(c);
        }

        if (shutdown_requested) {
            shutdown_all();
            return;
        }
        if (listening && (pfds[0].revents & (POLLIN | POLLHUP | POLLERR)))
            accept_new();
        sweep();
    }
}

static void usage(void)
{
    fprintf(stderr, "usage: kv [--max-conns N]   (N from 1 to %d, default %d)\n", LIMIT_MAX_CONNS,
            DEFAULT_MAX_CONNS);
    exit(2);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        if (strcmp(argv[i], "--max-conns") == 0 && i + 1 < argc)
            v = argv[++i];
        else if (strncmp(argv[i], "--max-conns=", 12) == 0)
            v = argv[i] + 12;
        else
            usage();
        char *end;
        long m = strtol(v, &end, 10);
        if (*v == '\0' || *end != '\0' || m < 1 || m > LIMIT_MAX_CONNS)
            usage();
        max_conns = (size_t)m;
    }

    listener = upstare_listener_fd(0);
    if (listener < 0) {
        fprintf(stderr, "kv: no preopened TCP listener (start the host with --tcplisten ADDR)\n");
        return 1;
    }
    listener_nonblocking = set_nonblocking(listener);

    store = table_new();
    conns = xcalloc(max_conns, sizeof *conns);
    pfds = xcalloc(max_conns + 1, sizeof *pfds);

#if KV_VERSION == 7
    char line[64];
    snprintf(line, sizeof line, "kv: listening on fd %d\n", listener);
    fputs(line, stdout);
#else
    printf("kv: listening on fd %d\n", listener);
#endif
    fflush(stdout);

    serve();
    return 0;
}
