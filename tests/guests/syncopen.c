/* Test guest: opens each `sync:PATH`, `dsync:PATH` or `plain:PATH`
 * argument for writing with that flag, prints "ready", and keeps the files
 * open until stdin ends, so a test can look at how the host opened them. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        char *path = strchr(argv[i], ':');
        if (!path)
            return 2;
        *path++ = 0;
        int flag = !strcmp(argv[i], "sync") ? O_SYNC : !strcmp(argv[i], "dsync") ? O_DSYNC : 0;
        if (open(path, O_WRONLY | O_CREAT | flag, 0644) < 0) {
            perror(path);
            return 1;
        }
    }
    printf("ready\n");
    fflush(stdout);
    char buf[16];
    while (read(0, buf, sizeof buf) > 0) {}
    return 0;
}
