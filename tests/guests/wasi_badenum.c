/* Differential WASI guest: preview1 calls given enum arguments out of
 * their range, one per run (argv[1] picks it). upstare-host answers EINVAL;
 * wasmtime traps, ending the program (see tests/wasidiff). */
#include <fcntl.h>
#include <string.h>
#include <wasi/api.h>

#include "wasi_facts.h"

int main(int argc, char **argv) {
    const char *which = argc > 1 ? argv[1] : "";
    uint64_t t = 0;
    int fd = open("/a/hello.txt", O_RDONLY);
    if (!strcmp(which, "clock"))
        RAW("clock_time_get clock 9", __wasi_clock_time_get(9, 1, &t));
    else if (!strcmp(which, "advice"))
        RAW("fd_advise advice 9", __wasi_fd_advise(fd, 0, 10, 9));
    else if (!strcmp(which, "whence"))
        RAW("fd_seek whence 7", __wasi_fd_seek(fd, 0, 7, &t));
    else
        printf("unknown case %s\n", which);
    return 0;
}
