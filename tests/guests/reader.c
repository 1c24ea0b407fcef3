/* Opens a file, reads part of it, waits until DIR/go exists (so a
 * checkpoint can land while the file is open), then reads the rest through
 * the same descriptor and appends a line to a log: a restored process must
 * have the file open at the same offset. usage: reader DIR */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

int main(int argc, char **argv)
{
    if (argc < 2) return 2;
    char path[256], log_path[256], go[256];
    snprintf(go, sizeof go, "%s/go", argv[1]);
    snprintf(path, sizeof path, "%s/input.txt", argv[1]);
    snprintf(log_path, sizeof log_path, "%s/log.txt", argv[1]);
    int fd = open(path, O_RDONLY);
    int log = open(log_path, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0 || log < 0) { perror("open"); return 1; }
    char buf[64] = {0};
    ssize_t n = read(fd, buf, 10);
    printf("first: %.*s\n", (int)n, buf);
    fflush(stdout);
    write(log, "before\n", 7);
    struct timespec t = {0, 10 * 1000 * 1000};
    while (access(go, F_OK) != 0) nanosleep(&t, 0);
    memset(buf, 0, sizeof buf);
    n = read(fd, buf, sizeof buf - 1);
    printf("rest: %.*s\n", (int)n, buf);
    write(log, "after\n", 6);
    close(fd);
    close(log);
    return 0;
}
