/*
 * heapgraph: a line server over linked structures on the heap, for the
 * heap conversion tests. One connection at a time (accept, then recv until
 * the client closes), on the listener the host preopens.
 *
 * The structures, all reached from globals: a singly linked list, a binary
 * search tree whose nodes point to their parents, and an array of records
 * allocated as malloc(n * sizeof) and grown with realloc(), with a pointer
 * into one record's member (`heaviest`).
 *
 * Commands: GROW n (adds n elements to every structure), SUM (checks every
 * structure and prints checksums), BALLAST n (allocates n MiB of bytes, for
 * a big heap), HOLD (answers HOLDING, keeps the list's head in a local
 * while it waits for the next line, then answers with the head's value),
 * CHAIN n (answers CHAINING, builds a list of n nodes that only its frame
 * holds, waits for the next line, then answers with the list's sum and its
 * last node's value, and from version 2 on how many nodes have a zero
 * `stamp`), LOOSE (answers LOOSE, makes a list node that only an integer
 * in its frame holds, waits for the next line, then answers with the node's
 * value: no typed pointer reaches the node, so an update that lands
 * meanwhile cannot convert it and must wait, or be refused), and from
 * version 2 on, FRESH (counts the elements whose new members are still
 * zero).
 *
 * -DGRAPH_VERSION=N:
 *   1  as above.
 *   2  every struct gains a member placed so that the members after it
 *      move: an update 1 -> 2 converts every element.
 *   3  is 2 with a transformer for `grown` that traps once the heap has
 *      been converted: an update 1 -> 3 is rolled back, memory and all.
 *   4  is 2 with the list nodes' `value` renamed `weight`: no automatic
 *      mapping can know, so a converter (UPSTARE_CONVERT) carries it.
 * -DGRAPH_OPAQUE also keeps a list node in a `void *` global, and
 * -DGRAPH_UNION in a union: the tracer cannot tell what those hold, so an
 * update that converts list nodes is refused.
 * -DGRAPH_TABLE also keeps a copy of each of the last 16 nodes in a table
 * of `void *` values (no typed pointer reaches the copies), with a command
 * TABLE (the copies' sum, and from version 2 on how many have a zero
 * `stamp`); -DGRAPH_TABLE_RULE declares what the values point to
 * (UPSTARE_POINTS_TO), so that an update that converts list nodes converts
 * the copies too instead of being refused.
 * -DGRAPH_BOXED=1 keeps a global `counter` (of GROW's calls), whose struct
 * gains a member in version 2, and its address in a heap allocation that
 * the global `box` points to, with a command BOX (whether the heap word
 * still holds the counter's address, and its count): an update 1 -> 2
 * moves the counter and rewrites the heap word. -DGRAPH_BOXED=2 is the
 * same with the heap word a `void *`: the tracer cannot tell it holds the
 * counter, so that update is refused.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <upstare.h>

#ifndef GRAPH_VERSION
#define GRAPH_VERSION 1
#endif

struct node {
#if GRAPH_VERSION >= 2
    long stamp;
#endif
#if GRAPH_VERSION == 4
    int weight; /* `value` before */
#define value weight
#else
    int value;
#endif
    struct node *next;
};

struct tree {
    int key;
#if GRAPH_VERSION >= 2
    int depth;
#endif
    struct tree *left, *right, *parent;
};

struct rec {
    int id;
#if GRAPH_VERSION >= 2
    double bias;
#endif
    double weight;
};

struct records {
    struct rec *recs; /* malloc(n * sizeof *recs), grown by realloc */
    int n, cap;
    double *heaviest; /* &recs[i].weight of the heaviest record */
};

/* Not static: the optimizer may split a static struct into one symbol per
   member, without the debug info the tracer types pointers by. */
struct node *list;
struct tree *root;
struct records records;
int grown;
char *ballast;
int client; /* the connection being served */
#if GRAPH_OPAQUE
void *opaque;
#endif
#if GRAPH_TABLE
struct slot {
    int key;
    void *value; /* a struct node */
};
struct slot table[16];
#if GRAPH_TABLE_RULE
UPSTARE_POINTS_TO(slot, value, struct node);
#endif
#endif
#if GRAPH_BOXED
struct counter {
    int calls;
#if GRAPH_VERSION >= 2
    long since; /* moves nothing, but the struct grows: `counter` moves */
#endif
};
struct counter counter;
#if GRAPH_BOXED == 1
struct counter **box;
#else
void **box;
#endif
#endif
#if GRAPH_UNION
union either {
    struct node *node;
    long bits;
} either;
#endif

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p) {
        fputs("heapgraph: out of memory\n", stderr);
        exit(1);
    }
    return p;
}

static struct node *new_node(int value, struct node *next)
{
    struct node *node = xmalloc(sizeof *node);
    node->value = value;
    node->next = next;
#if GRAPH_VERSION >= 2
    node->stamp = value;
#endif
    return node;
}

static void grow(int n)
{
    for (int i = 0; i < n; i++) {
        int k = ++grown;
        struct node *node = new_node(k, list);
        list = node;

        struct tree *t = xmalloc(sizeof *t);
        t->key = (int)((k * 7919L) % 100003);
        t->left = t->right = t->parent = NULL;
        struct tree **at = &root;
        struct tree *parent = NULL;
        int depth = 0;
        while (*at) {
            parent = *at;
            at = t->key < parent->key ? &parent->left : &parent->right;
            depth++;
        }
        t->parent = parent;
#if GRAPH_VERSION >= 2
        t->depth = depth + 1;
#else
        (void)depth;
#endif
        *at = t;

        if (records.n == records.cap) {
            size_t heaviest = records.heaviest ? (size_t)((char *)records.heaviest - (char *)records.recs) : 0;
            records.cap = records.cap ? records.cap * 2 : 4;
            records.recs = realloc(records.recs, records.cap * sizeof *records.recs);
            if (!records.recs)
                exit(1);
            if (records.heaviest)
                records.heaviest = (double *)((char *)records.recs + heaviest);
        }
        struct rec *r = &records.recs[records.n++];
        r->id = k;
        r->weight = (k * 37 % 1000) / 4.0;
#if GRAPH_VERSION >= 2
        r->bias = 1.0;
#endif
        if (!records.heaviest || r->weight > *records.heaviest)
            records.heaviest = &r->weight;
#if GRAPH_TABLE
        struct node *copy = xmalloc(sizeof *copy);
        *copy = *node;
        copy->next = NULL;
        free(table[k % 16].value);
        table[k % 16] = (struct slot){k, copy};
#endif
    }
#if GRAPH_OPAQUE
    opaque = list;
#endif
#if GRAPH_UNION
    either.node = list;
#endif
#if GRAPH_BOXED
    counter.calls++;
    if (!box) {
        box = xmalloc(sizeof *box);
        *box = &counter;
    }
#endif
}

/* Walks the tree in order: counts, sums, and checks order and parents. */
static int walk(const struct tree *t, const struct tree *parent, long *sum, int *last, int *ok)
{
    if (!t)
        return 0;
    if (t->parent != parent)
        *ok = 0;
    int n = walk(t->left, t, sum, last, ok);
    if (t->key < *last)
        *ok = 0;
    *last = t->key;
    *sum += t->key;
    return n + 1 + walk(t->right, t, sum, last, ok);
}

static void sum(char *out, size_t cap)
{
    long list_sum = 0, tree_sum = 0, ids = 0;
    int list_n = 0, last = -1, ok = 1;
    for (const struct node *n = list; n; n = n->next) {
        list_n++;
        list_sum += n->value;
    }
    int tree_n = walk(root, NULL, &tree_sum, &last, &ok);
    double weight = 0;
    int heaviest_ok = records.n == 0;
    for (int i = 0; i < records.n; i++) {
        ids += records.recs[i].id;
        weight += records.recs[i].weight;
        if (&records.recs[i].weight == records.heaviest)
            heaviest_ok = 1;
    }
    snprintf(out, cap, "SUM list=%d/%ld tree=%d/%ld/%s recs=%d/%ld/%.2f heaviest=%.2f/%s", list_n, list_sum,
             tree_n, tree_sum, ok ? "ok" : "broken", records.n, ids, weight,
             records.heaviest ? *records.heaviest : 0.0, heaviest_ok ? "ok" : "dangling");
}

#if GRAPH_VERSION >= 2
/* Out of line, so that its stack does not grow handle()'s frame, which is
   on the stack during a HOLD. */
__attribute__((noinline)) static void fresh(char *out, size_t cap)
{
    int nodes = 0, trees = 0, recs = 0;
    for (const struct node *n = list; n; n = n->next)
        nodes += n->stamp == 0;
    /* every tree node is reachable from its parent: walk them by pointer */
    const struct tree *stack[64];
    int top = 0;
    if (root)
        stack[top++] = root;
    while (top) {
        const struct tree *t = stack[--top];
        trees += t->depth == 0;
        if (t->left && top < 64)
            stack[top++] = t->left;
        if (t->right && top < 64)
            stack[top++] = t->right;
    }
    for (int i = 0; i < records.n; i++)
        recs += records.recs[i].bias == 0;
    snprintf(out, cap, "FRESH nodes=%d trees=%d recs=%d", nodes, trees, recs);
}
#endif

#if GRAPH_VERSION == 4
/* A list node as versions 1 to 3 lay it out. */
struct node_v1 {
    int value;
    struct node *next;
};

UPSTARE_CONVERT(node)
{
    const struct node_v1 *old = old_object;
    struct node *new = new_object;
    new->weight = old->value;
}
#endif

#if GRAPH_VERSION == 3
UPSTARE_TRANSFORM(grown)
{
    *(int *)new_value = *(const int *)old_value;
    __builtin_trap();
}
#endif

/* Waits for a line with the list's head in a local: an update that lands
   meanwhile must redirect the local to the head's new copy. */
__attribute__((noinline)) static void hold(char *out, size_t cap)
{
    struct node *head = list;
    char c = 0;
    send(client, "HOLDING\n", 8, 0);
    while (recv(client, &c, 1, 0) == 1 && c != '\n')
        ;
    snprintf(out, cap, "HELD %d", head ? head->value : -1);
}

#if GRAPH_TABLE
static void table_sum(char *out, size_t cap)
{
    long total = 0;
    int stale = 0;
    for (int i = 0; i < 16; i++) {
        const struct node *n = table[i].value;
        if (!n)
            continue;
        total += n->value;
#if GRAPH_VERSION >= 2
        stale += n->stamp == 0;
#endif
    }
    (void)stale;
#if GRAPH_VERSION >= 2
    snprintf(out, cap, "TABLE sum=%ld fresh=%d", total, stale);
#else
    snprintf(out, cap, "TABLE sum=%ld", total);
#endif
}
#endif

/* Keeps `ends` in the frame's memory: its address escapes. */
__attribute__((noinline)) static void keep(struct node **ends)
{
    __asm__ volatile("" : : "r"(ends) : "memory");
}

/* Sums a list CHAIN built, frees it, and answers. Out of line, so that
   what chain() holds across its wait is the same in every version. */
__attribute__((noinline)) static void chained(struct node *head, struct node *tail, char *out, size_t cap)
{
    int last = tail ? tail->value : -1;
    long total = 0;
    int stale = 0;
    while (head) {
        struct node *next = head->next;
        total += head->value;
#if GRAPH_VERSION >= 2
        stale += head->stamp == 0;
#endif
        free(head);
        head = next;
    }
    (void)stale;
#if GRAPH_VERSION >= 2
    snprintf(out, cap, "CHAINED %ld tail=%d fresh=%d", total, last, stale);
#else
    snprintf(out, cap, "CHAINED %ld tail=%d", total, last);
#endif
}

/* Builds a list of n nodes out of line, so that chain()'s code is the same
   in every version. */
__attribute__((noinline)) static struct node *build_chain(int n, struct node **tail)
{
    struct node *head = NULL;
    for (int i = 1; i <= n; i++) {
        struct node *node = new_node(i, head);
        if (!*tail)
            *tail = node;
        head = node;
    }
    return head;
}

/* Waits for a line with a list that no global reaches: its head in a local,
   its last node in the frame's memory. An update that lands meanwhile must
   convert its nodes all the same, and redirect both. */
__attribute__((noinline)) static void chain(int n, char *out, size_t cap)
{
    struct node *ends[1] = {NULL};
    struct node *head = build_chain(n, ends);
    keep(ends);
    char c = 0;
    send(client, "CHAINING\n", 9, 0);
    while (recv(client, &c, 1, 0) == 1 && c != '\n')
        ;
    chained(head, ends[0], out, cap);
}

/* Out of line, so that what loose() holds across its wait is computed the
   same in every version. */
__attribute__((noinline)) static struct node *loose_node(void)
{
    return new_node(7, NULL);
}

/* Waits for a line with a list node that only an integer holds, as a
   compiler temporary would: the trace cannot see it. */
__attribute__((noinline)) static void loose(char *out, size_t cap)
{
    uintptr_t held = (uintptr_t)loose_node();
    /* Made now: nothing else would keep clang from sinking the malloc past
       the wait, where its result is used. */
    __asm__ volatile("" : : "r"(held) : "memory");
    char c = 0;
    send(client, "LOOSE\n", 6, 0);
    while (recv(client, &c, 1, 0) == 1 && c != '\n')
        ;
    struct node *node = (struct node *)held;
    snprintf(out, cap, "LOOSE %d", node->value);
    free(node);
}

/* Answers one line into `out`. Out of line, so that main's frame stays the
   same in every version. */
__attribute__((noinline)) static void handle(const char *line, char *out, size_t cap)
{
    if (strncmp(line, "GROW ", 5) == 0) {
        grow(atoi(line + 5));
        snprintf(out, cap, "GREW %d", grown);
    } else if (strncmp(line, "BALLAST ", 8) == 0) {
        size_t bytes = (size_t)atoi(line + 8) << 20;
        ballast = malloc(bytes);
        if (ballast)
            memset(ballast, 1, bytes);
        snprintf(out, cap, ballast ? "BALLAST %s" : "ERROR out of memory", line + 8);
    } else if (strcmp(line, "HOLD") == 0) {
        hold(out, cap);
#if GRAPH_TABLE
    } else if (strcmp(line, "TABLE") == 0) {
        table_sum(out, cap);
#endif
#if GRAPH_BOXED
    } else if (strcmp(line, "BOX") == 0) {
        snprintf(out, cap, "BOX %s calls=%d", *box == (void *)&counter ? "same" : "stale", counter.calls);
#endif
    } else if (strcmp(line, "LOOSE") == 0) {
        loose(out, cap);
    } else if (strncmp(line, "CHAIN ", 6) == 0) {
        chain(atoi(line + 6), out, cap);
    } else if (strcmp(line, "SUM") == 0) {
        sum(out, cap);
#if GRAPH_VERSION >= 2
    } else if (strcmp(line, "FRESH") == 0) {
        fresh(out, cap);
#endif
    } else {
        snprintf(out, cap, "ERROR unknown command");
    }
}

/* Out of line: inlined into main(), the `struct stat` upstare_listener_fd
   fills would stay in main's frame for good, and the socket's inode number
   there falls inside a big heap, where a conversion's scan of the untyped
   stack must take it for a possible pointer and refuse. */
__attribute__((noinline)) static int listener_fd(void)
{
    return upstare_listener_fd(0);
}

int main(void)
{
    int listener = listener_fd();
    if (listener < 0) {
        fputs("heapgraph: no listener\n", stderr);
        return 1;
    }
    printf("heapgraph: listening\n");
    fflush(stdout);
    static char in[4096], out[256];
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0)
            continue;
        client = fd;
        size_t len = 0;
        for (;;) {
            ssize_t got = recv(fd, in + len, sizeof in - 1 - len, 0);
            if (got <= 0)
                break;
            len += (size_t)got;
            char *nl;
            while ((nl = memchr(in, '\n', len))) {
                *nl = '\0';
                handle(in, out, sizeof out);
                size_t n = strlen(out);
                out[n++] = '\n';
                send(fd, out, n, 0);
                len -= (size_t)(nl + 1 - in);
                memmove(in, nl + 1, len);
            }
            if (len == sizeof in - 1)
                break;
        }
        close(fd);
    }
}
