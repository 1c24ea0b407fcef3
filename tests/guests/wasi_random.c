/* Differential WASI guest: seeded random reads, writes, seeks, truncations
 * and reopenings on a few files under /a, sizes and offsets drawn from the
 * seed in argv[1]. Prints each transfer's outcome and a hash of what reads
 * returned; also keeps its own model of each file and says whether the
 * files ended as the model says. Short transfers are carried on to the
 * end, as a program must: hosts may split them differently (wasmtime takes
 * one buffer of a readv and at most 64 KiB at a time). Then random
 * creations, renames, links, symlinks and removals among a few names in
 * /a/ns and /b. */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "wasi_facts.h"

#define FILES 3
#define MAX_SIZE (320 * 1024)
#define MAX_IO (96 * 1024)

struct model {
    unsigned char data[MAX_SIZE];
    long long size;
    long long pos;
    int fd;
    int append;
};

static struct model files[FILES];
static unsigned char io[MAX_IO];
static unsigned char back[MAX_IO];

static void reopen(int i) {
    struct model *m = &files[i];
    if (m->fd >= 0)
        close(m->fd);
    char path[32];
    snprintf(path, sizeof path, "/a/r%d.bin", i);
    m->append = rng_below(4) == 0;
    int trunc = rng_below(8) == 0;
    m->fd = open(path, O_RDWR | O_CREAT | (m->append ? O_APPEND : 0) | (trunc ? O_TRUNC : 0), 0644);
    if (m->fd < 0) {
        printf("open %s: %s\n", path, errname(errno));
        exit(1);
    }
    if (trunc)
        m->size = 0;
    m->pos = 0;
    printf("open r%d%s%s\n", i, m->append ? " append" : "", trunc ? " trunc" : "");
}

/* Splits [buf, buf+len) into 1..4 iovecs of random sizes, some empty. */
static int split(struct iovec *iov, unsigned char *buf, size_t len) {
    int n = 1 + (int)rng_below(4);
    size_t at = 0;
    for (int k = 0; k < n; k++) {
        size_t part = k == n - 1 ? len - at : rng_below(len - at + 1);
        iov[k].iov_base = buf + at;
        iov[k].iov_len = part;
        at += part;
    }
    return n;
}

static void model_write(struct model *m, long long at, const unsigned char *buf, size_t n) {
    if (at > m->size)
        memset(m->data + m->size, 0, (size_t)(at - m->size));
    memcpy(m->data + at, buf, n);
    if (at + (long long)n > m->size)
        m->size = at + (long long)n;
}

static void step(int op_no) {
    int i = (int)rng_below(FILES);
    struct model *m = &files[i];
    size_t len = rng_below(8) == 0 ? rng_below(MAX_IO) : rng_below(600);
    long long off = (long long)rng_below(MAX_SIZE - MAX_IO);
    for (size_t k = 0; k < len; k++)
        io[k] = (unsigned char)rng_next();
    printf("%d r%d ", op_no, i);
    switch (rng_below(9)) {
    case 0: { /* write at the position, as writev */
        struct iovec iov[4];
        int n = split(iov, io, len);
        long long at = m->append ? m->size : m->pos;
        if (at + (long long)len > MAX_SIZE) {
            printf("skip\n");
            return;
        }
        errno = 0;
        ssize_t w = writev(m->fd, iov, n);
        /* A short transfer is allowed (wasmtime takes only the first
         * non-empty buffer); a program goes on with the rest, and the
         * buffers are consecutive. */
        for (ssize_t more = 1; w >= 0 && w < (ssize_t)len && more > 0; w += more > 0 ? more : 0)
            more = write(m->fd, io + w, len - (size_t)w);
        printf("writev %zu in %d: %s\n", len, n, w < 0 ? errname(errno) : w == (ssize_t)len ? "all" : "short");
        if (w > 0) {
            model_write(m, at, io, (size_t)w);
            m->pos = at + w;
        }
        break;
    }
    case 1: { /* read at the position, as readv */
        struct iovec iov[4];
        int n = split(iov, back, len);
        errno = 0;
        ssize_t r = readv(m->fd, iov, n);
        for (ssize_t more = 1; r >= 0 && r < (ssize_t)len && more > 0; r += more > 0 ? more : 0)
            more = read(m->fd, back + r, len - (size_t)r);
        long long expect = m->pos >= m->size ? 0 : m->size - m->pos < (long long)len ? m->size - m->pos : (long long)len;
        printf("readv %zu in %d: %s %016llx model %s\n", len, n, r < 0 ? errname(errno) : r == expect ? "all" : "short",
               (unsigned long long)fnv1a(back, r > 0 ? (size_t)r : 0), r >= 0 && memcmp(back, m->data + m->pos, (size_t)r) == 0 ? "agrees" : "differs");
        if (r > 0)
            m->pos += r;
        break;
    }
    case 2: { /* pwrite */
        if (m->append) {
            /* pwrite on an O_APPEND fd: Linux appends, POSIX says at the
             * offset; leave that unexercised. */
            printf("skip\n");
            return;
        }
        errno = 0;
        ssize_t w = pwrite(m->fd, io, len, off);
        for (ssize_t more = 1; w >= 0 && w < (ssize_t)len && more > 0; w += more > 0 ? more : 0)
            more = pwrite(m->fd, io + w, len - (size_t)w, off + w);
        printf("pwrite %zu at %lld: %s\n", len, off, w < 0 ? errname(errno) : w == (ssize_t)len ? "all" : "short");
        if (w > 0)
            model_write(m, off, io, (size_t)w);
        break;
    }
    case 3: { /* pread */
        errno = 0;
        ssize_t r = pread(m->fd, back, len, off);
        for (ssize_t more = 1; r >= 0 && r < (ssize_t)len && more > 0; r += more > 0 ? more : 0)
            more = pread(m->fd, back + r, len - (size_t)r, off + r);
        printf("pread %zu at %lld: %zd %016llx model %s\n", len, off, r < 0 ? -1 : r, (unsigned long long)fnv1a(back, r > 0 ? (size_t)r : 0),
               r >= 0 && memcmp(back, m->data + off, (size_t)r) == 0 ? "agrees" : "differs");
        break;
    }
    case 4: { /* seek */
        int how = (int)rng_below(3);
        long long to = how == SEEK_SET ? off : how == SEEK_CUR ? (long long)rng_below(2000) - 1000 : -(long long)rng_below(2000) + 500;
        errno = 0;
        off_t p = lseek(m->fd, to, how);
        printf("lseek %lld %s: ", to, how == SEEK_SET ? "SET" : how == SEEK_CUR ? "CUR" : "END");
        if (p < 0)
            printf("%s\n", errname(errno));
        else {
            printf("%lld\n", (long long)p);
            m->pos = p;
        }
        if (m->pos > MAX_SIZE - MAX_IO)
            m->pos = lseek(m->fd, 0, SEEK_SET);
        break;
    }
    case 5: { /* truncate */
        long long size = (long long)rng_below(MAX_SIZE - MAX_IO);
        errno = 0;
        int r = ftruncate(m->fd, size);
        printf("ftruncate %lld: %s\n", size, r < 0 ? errname(errno) : "ok");
        if (r == 0) {
            if (size > m->size)
                memset(m->data + m->size, 0, (size_t)(size - m->size));
            m->size = size;
        }
        break;
    }
    case 6: { /* size and position */
        struct stat st;
        errno = 0;
        int r = fstat(m->fd, &st);
        long long p = lseek(m->fd, 0, SEEK_CUR);
        printf("fstat: %s size %lld pos %lld model %s\n", r < 0 ? errname(errno) : "ok", (long long)st.st_size, p,
               st.st_size == m->size && p == m->pos ? "agrees" : "differs");
        break;
    }
    case 7:
        reopen(i);
        break;
    default: { /* a whole write through write(2), then read it back */
        long long at = m->append ? m->size : m->pos;
        if (at + (long long)len > MAX_SIZE) {
            printf("skip\n");
            return;
        }
        errno = 0;
        ssize_t w = write(m->fd, io, len);
        for (ssize_t more = 1; w >= 0 && w < (ssize_t)len && more > 0; w += more > 0 ? more : 0)
            more = write(m->fd, io + w, len - (size_t)w);
        printf("write %zu: %s", len, w < 0 ? errname(errno) : w == (ssize_t)len ? "all" : "short");
        if (w > 0) {
            model_write(m, at, io, (size_t)w);
            m->pos = at + w;
        }
        ssize_t r = pread(m->fd, back, len, at);
        for (ssize_t more = 1; r >= 0 && r < w && more > 0; r += more > 0 ? more : 0)
            more = pread(m->fd, back + r, len - (size_t)r, at + r);
        printf(", read back %s\n", r == w && memcmp(back, io, len) == 0 ? "equal" : "different");
        break;
    }
    }
}

/* Random namespace operations on a few names in /a/ns and /b: which
 * succeed, with which errno the rest fail, and what is left. */
static void namespace_step(int op_no) {
    static const char *names[] = {"/a/ns/p", "/a/ns/q", "/a/ns/d", "/a/ns/d/p", "/a/ns/d/e", "/a/ns/d/e/q", "/b/p", "/b/d"};
    const size_t count = sizeof names / sizeof names[0];
    const char *x = names[rng_below(count)], *y = names[rng_below(count)];
    printf("%d ", op_no);
    switch (rng_below(8)) {
    case 0: {
        int fd = open(x, O_CREAT | O_WRONLY | (rng_below(2) ? O_EXCL : 0), 0644);
        printf("create %s: %s\n", x, fd < 0 ? errname(errno) : "ok");
        if (fd >= 0) {
            write(fd, x, strlen(x));
            close(fd);
        }
        break;
    }
    case 1: CHECK(x, mkdir(x, 0755)); break;
    case 2: printf("rename %s ", x); CHECK(y, rename(x, y)); break;
    case 3: printf("unlink "); CHECK(x, unlink(x)); break;
    case 4: printf("rmdir "); CHECK(x, rmdir(x)); break;
    case 5: printf("link %s ", x); CHECK(y, link(x, y)); break;
    case 6: {
        /* A relative target in the link's own directory, or one level up. */
        const char *base = strrchr(x, '/') + 1;
        char target[64];
        snprintf(target, sizeof target, "%s%s", rng_below(2) ? "../" : "", base);
        printf("symlink %s ", target);
        CHECK(y, symlink(target, y));
        break;
    }
    default: {
        struct stat st;
        errno = 0;
        int r = rng_below(2) ? stat(x, &st) : lstat(x, &st);
        printf("stat %s: %s\n", x, r < 0 ? errname(errno) : S_ISREG(st.st_mode) ? "file" : S_ISDIR(st.st_mode) ? "dir" : "symlink");
        break;
    }
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: wasi_random SEED STEPS\n");
        return 2;
    }
    rng_state = strtoull(argv[1], NULL, 10);
    int steps = atoi(argv[2]);
    for (int i = 0; i < FILES; i++) {
        files[i].fd = -1;
        reopen(i);
    }
    for (int s = 0; s < steps; s++)
        step(s);
    for (int i = 0; i < FILES; i++) {
        struct model *m = &files[i];
        close(m->fd);
        char path[32];
        snprintf(path, sizeof path, "/a/r%d.bin", i);
        int fd = open(path, O_RDONLY);
        static unsigned char whole[MAX_SIZE + 1];
        long long got = 0;
        ssize_t n;
        while ((n = read(fd, whole + got, sizeof whole - (size_t)got)) > 0)
            got += n;
        close(fd);
        printf("r%d: %lld bytes %016llx model %s\n", i, got, (unsigned long long)fnv1a(whole, (size_t)got),
               got == m->size && memcmp(whole, m->data, (size_t)got) == 0 ? "agrees" : "differs");
    }
    CHECK("mkdir /a/ns", mkdir("/a/ns", 0755));
    for (int s = 0; s < steps; s++)
        namespace_step(s);
    return 0;
}
