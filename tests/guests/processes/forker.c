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
    fprintf(stderr, "usage: forker basic|kill|bomb|orphan\n");
    return 2;
}
