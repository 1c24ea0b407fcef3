/* Named pipes, in the modes a program meets them:
 *
 *   fifo PATH        opens PATH for reading and echoes each read
 *                    ("read: TEXT") until end of stream ("end");
 *   fifo -w PATH TEXT  opens PATH for writing and writes TEXT ("wrote N");
 *   fifo -p PATH TEXT  the same, waiting in poll() until it can write;
 *   fifo -n PATH     opens PATH with O_NONBLOCK, with no other process at
 *                    the other end, and prints what each call gives;
 *   fifo -d PATH     opens a device (/dev/null) and prints what it is.
 *
 * In blocking mode, opening waits for the other end and reading waits for
 * data; the host must be able to pause the program while it waits. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int echo(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0) { perror("open"); return 1; }
    char buf[64];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        printf("read: %.*s\n", (int)n, buf);
    if (n < 0) { perror("read"); return 1; }
    printf("end\n");
    return 0;
}

static int send_text(const char *path, const char *text, int wait_in_poll)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0) { perror("open"); return 1; }
    if (wait_in_poll) {
        struct pollfd p = { .fd = fd, .events = POLLOUT };
        if (poll(&p, 1, -1) != 1 || !(p.revents & POLLOUT)) { perror("poll"); return 1; }
    }
    ssize_t n = write(fd, text, strlen(text));
    if (n < 0) { perror("write"); return 1; }
    printf("wrote %zd\n", n);
    return close(fd) == 0 ? 0 : 1;
}

static void report(const char *what, ssize_t r)
{
    if (r < 0)
        printf("%s: %s\n", what, strerror(errno));
    else
        printf("%s: %zd\n", what, r);
}

static int nonblocking(const char *path)
{
    report("open for writing, no reader", open(path, O_WRONLY | O_NONBLOCK));
    int r = open(path, O_RDONLY | O_NONBLOCK);
    if (r < 0) { perror("open for reading"); return 1; }
    char buf[8];
    report("read, no writer yet", read(r, buf, sizeof buf));
    int w = open(path, O_WRONLY | O_NONBLOCK);
    report("open for writing, with a reader", w < 0 ? -1 : 0);
    report("read, no data", read(r, buf, sizeof buf));
    report("write", write(w, "x", 1));
    report("read", read(r, buf, sizeof buf));
    close(w);
    report("read, writer gone", read(r, buf, sizeof buf));
    /* Opened non-blocking, the open did not wait for a writer: a read in
     * blocking mode with none there is end of stream, as in POSIX. */
    int r2 = open(path, O_RDONLY | O_NONBLOCK);
    report("set blocking", fcntl(r2, F_SETFL, 0));
    report("read in blocking mode, no writer", read(r2, buf, sizeof buf));
    return 0;
}

static int device(const char *path)
{
    int fd = open(path, O_RDWR);
    if (fd < 0) { perror("open"); return 1; }
    char buf[8];
    printf("isatty: %d\n", isatty(fd));
    report("write", write(fd, "abc", 3));
    report("read", read(fd, buf, sizeof buf));
    report("seek", lseek(fd, 0, SEEK_CUR));
    return 0;
}

int main(int argc, char **argv)
{
    /* Each line goes out as it is printed: the tests wait for them. */
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 2) return echo(argv[1]);
    if (argc == 4 && strcmp(argv[1], "-w") == 0) return send_text(argv[2], argv[3], 0);
    if (argc == 4 && strcmp(argv[1], "-p") == 0) return send_text(argv[2], argv[3], 1);
    if (argc == 3 && strcmp(argv[1], "-n") == 0) return nonblocking(argv[2]);
    if (argc == 3 && strcmp(argv[1], "-d") == 0) return device(argv[2]);
    fprintf(stderr, "usage: fifo PATH | fifo -w|-p PATH TEXT | fifo -n|-d PATH\n");
    return 2;
}
