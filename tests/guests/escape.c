/* Test guest: tries to open each path given as an argument and prints
 * whether it was allowed, so the tests can check the host's sandbox from
 * the guest's side. Prints "PATH: ok CONTENT" or "PATH: refused ERRNO". */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY);
        if (fd < 0) {
            printf("%s: refused %s\n", argv[i], strerror(errno));
            continue;
        }
        char buf[64] = {0};
        ssize_t n = read(fd, buf, sizeof buf - 1);
        if (n > 0 && buf[n - 1] == '\n')
            buf[n - 1] = 0;
        printf("%s: ok %s\n", argv[i], buf);
        close(fd);
    }
    return 0;
}
