/* Opens a named pipe and echoes what it reads. Opening a FIFO for reading
 * blocks in the host until a writer opens it: a blocking call the host
 * cannot interrupt, where no pause can happen. usage: fifo PATH */
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 2) return 2;
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror("open"); return 1; }
    char buf[64];
    ssize_t n = read(fd, buf, sizeof buf);
    printf("read: %.*s\n", (int)(n > 0 ? n : 0), buf);
    return 0;
}
