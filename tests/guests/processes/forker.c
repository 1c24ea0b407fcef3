/*
 * forker: processes under upstare-host (upstare.h's fork, waitpid, kill).
 *
 *   forker basic   each of 3 children adds its index to a copy of a
 *                  counter and exits with it; the parent's own copy stays
 *                  as it was, and it waits for each, printing the statuses
 *   forker kill    a child that waits forever for input is killed with
 *                  SIGTERM, and the parent sees it so
 *   forker bomb    forks until fork() fails, then reaps every child
 *   forker orphan  a child forks a grandchild and exits; the grandchild,
 *                  an orphan, sees parent 0, and once it ends the host
 *                  has reaped it (the parent has no child left to wait for)
 *   forker pages   processes write pages of an 8 MiB block (some of it,
 *                  or all) after they fork and fork again, and each sees exactly its own
 *                  history: what was written before it was forked, and
 *                  what it wrote since, never another process's writes
 *                  (whether the host copies memory or shares it
 *                  copy-on-write)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <upstare.h>

static int counter = 100;

static int basic(void)
{
    pid_t kids[3];
    for (int i = 0; i < 3; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            counter += i + 1;
            printf("child %d: pid %d, parent %d, counter %d\n", i, upstare_getpid(), getppid(), counter);
            fflush(stdout);
            exit(counter - 100);
        }
        kids[i] = pid;
    }
    for (int i = 0; i < 3; i++) {
        int status;
        pid_t done = waitpid(kids[i], &status, 0);
        if (done != kids[i] || !WIFEXITED(status)) {
            fprintf(stderr, "waitpid(%d) = %d, status %#x\n", kids[i], done, status);
            return 1;
        }
        printf("child %d exited with %d\n", i, WEXITSTATUS(status));
    }
    int status;
    if (waitpid(-1, &status, 0) != -1 || errno != ECHILD) {
        fputs("a fourth child?\n", stderr);
        return 1;
    }
    printf("parent: pid %d, counter %d\n", upstare_getpid(), counter);
    return 0;
}

static int killed(void)
{
    pid_t pid = fork();
    if (pid == 0) {
        char c;
        read(0, &c, 1); /* stdin never sends anything */
        return 3;
    }
    int status;
    if (waitpid(pid, &status, WNOHANG) != 0) {
        fputs("the child ended early\n", stderr);
        return 1;
    }
    if (kill(pid, SIGTERM) != 0) {
        perror("kill");
        return 1;
    }
    if (waitpid(pid, &status, 0) != pid || !WIFSIGNALED(status)) {
        fputs("not killed\n", stderr);
        return 1;
    }
    printf("child killed by signal %d\n", WTERMSIG(status));
    if (kill(pid, 0) == 0 || errno != ESRCH) {
        fputs("the child is still there\n", stderr);
        return 1;
    }
    return 0;
}

static int bomb(void)
{
    int forked = 0;
    for (;;) {
        pid_t pid = fork();
        if (pid == 0) {
            char c;
            read(0, &c, 1);
            return 0;
        }
        if (pid < 0) {
            printf("fork failed after %d children: %s\n", forked, errno == EAGAIN ? "EAGAIN" : strerror(errno));
            break;
        }
        forked++;
    }
    for (int i = 0; i < forked; i++) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid > 0)
            continue;
    }
    return 0;
}

static int orphan(void)
{
    pid_t child = fork();
    if (child == 0) {
        pid_t grandchild = fork();
        if (grandchild == 0) {
            /* Until the child has ended: then this one is an orphan. */
            while (getppid() != 0)
                usleep(1000);
            printf("grandchild %d: parent now %d\n", upstare_getpid(), getppid());
            fflush(stdout);
            exit(5);
        }
        exit(grandchild > 0 ? 0 : 1);
    }
    int status;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fputs("the child failed\n", stderr);
        return 1;
    }
    /* The grandchild is not ours to wait for; it ends, and nobody waits. */
    while (kill(child + 1, 0) == 0)
        usleep(1000);
    if (waitpid(-1, &status, WNOHANG) != -1 || errno != ECHILD) {
        fputs("a child left to wait for\n", stderr);
        return 1;
    }
    printf("parent: no child left\n");
    return 0;
}

enum { PAGE = 4096, PAGES = 2048 };
static unsigned char *block;

/* The byte every byte of page `p` holds after generation `gen` wrote it. */
static unsigned char byte_of(int p, int gen)
{
    return (unsigned char)(p * 31 + gen * 7 + 1);
}

/* Writes generation `gen` into every page whose number is a multiple of
 * `every`. */
static void write_pages(int gen, int every)
{
    for (int p = 0; p < PAGES; p += every)
        memset(block + (size_t)p * PAGE, byte_of(p, gen), PAGE);
}

/* Checks every byte of the block against `gen_of(p)`, the generation
 * this process's history says page p holds; prints the first difference
 * and returns 1 if there is one. */
static int check_pages(const char *who, int (*gen_of)(int))
{
    for (int p = 0; p < PAGES; p++) {
        unsigned char want = byte_of(p, gen_of(p));
        for (int i = 0; i < PAGE; i++) {
            unsigned char got = block[(size_t)p * PAGE + i];
            if (got != want) {
                printf("%s: page %d byte %d is %d, not %d (generation %d)\n", who, p, i, got, want, gen_of(p));
                return 1;
            }
        }
    }
    printf("%s: every page as written\n", who);
    return 0;
}

static int gen_all0(int p) { (void)p; return 0; }
static int gen_c1_forked(int p) { return p % 2 == 0 ? 1 : 0; }
static int gen_c1_end(int p) { return p % 7 == 0 ? 3 : gen_c1_forked(p); }
static int gen_p_forked2(int p) { return p % 3 == 0 ? 2 : 0; }
static int gen_p_end(int p) { return p % 5 == 0 ? 4 : gen_p_forked2(p); }

static int wait_ok(pid_t pid)
{
    int status;
    return waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static int gen_all5(int p) { (void)p; return 5; }
static int gen_gg_forked(int p) { return p % 4 == 0 ? 6 : 5; }
static int gen_g_end(int p) { return p % 3 == 0 ? 7 : 5; }

/* g's part of `pages`: a process that wrote its whole block forks, twice
 * over (g writes 5 everywhere, forks gg, writes 7; gg writes 6, forks
 * ggg). */
static int whole_block(void)
{
    write_pages(5, 1);
    fflush(stdout);
    pid_t gg = fork();
    if (gg == 0) {
        usleep(50000);
        int bad = check_pages("gg at its fork", gen_all5);
        write_pages(6, 4);
        fflush(stdout);
        pid_t ggg = fork();
        if (ggg == 0) {
            usleep(50000);
            exit(check_pages("ggg at its fork", gen_gg_forked));
        }
        bad |= !wait_ok(ggg);
        bad |= check_pages("gg after ggg", gen_gg_forked);
        exit(bad);
    }
    write_pages(7, 3);
    int bad = !wait_ok(gg);
    return bad | check_pages("g after gg", gen_g_end);
}

/* The histories: the parent writes generation 0 everywhere, forks c1,
 * writes 2, forks c2, writes 4. c1 writes 1, forks g, writes 3. g writes
 * 5 everywhere and goes on in `whole_block`. Each child sleeps before it checks, so that the writes
 * that must not reach it have happened. */
static int pages(void)
{
    block = aligned_alloc(PAGE, (size_t)PAGES * PAGE); /* pages as the host counts them */
    if (block == NULL)
        return 1;
    write_pages(0, 1);
    fflush(stdout);
    pid_t c1 = fork();
    if (c1 == 0) {
        usleep(50000);
        int bad = check_pages("c1 at its fork", gen_all0);
        write_pages(1, 2);
        fflush(stdout);
        pid_t g = fork();
        if (g == 0) {
            usleep(50000);
            bad |= check_pages("g at its fork", gen_c1_forked);
            exit(bad | whole_block());
        }
        write_pages(3, 7);
        bad |= !wait_ok(g);
        bad |= check_pages("c1 after g", gen_c1_end);
        exit(bad);
    }
    write_pages(2, 3);
    fflush(stdout);
    pid_t c2 = fork();
    if (c2 == 0) {
        usleep(50000);
        exit(check_pages("c2 at its fork", gen_p_forked2));
    }
    write_pages(4, 5);
    int bad = c1 < 0 || c2 < 0;
    bad |= !wait_ok(c1);
    bad |= !wait_ok(c2);
    bad |= check_pages("parent after all", gen_p_end);
    return bad;
}

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "basic";
    if (strcmp(what, "basic") == 0)
        return basic();
    if (strcmp(what, "kill") == 0)
        return killed();
    if (strcmp(what, "bomb") == 0)
        return bomb();
    if (strcmp(what, "orphan") == 0)
        return orphan();
    if (strcmp(what, "pages") == 0)
        return pages();
    fprintf(stderr, "usage: forker basic|kill|bomb|orphan|pages\n");
    return 2;
}
