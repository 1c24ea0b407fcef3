/* Test guest: runs the file-system operations its arguments name, one per
 * argument, and prints what each did, so tests can probe the sandbox from
 * the guest's side. Each argument is `OP:PATH` or `OP:PATH:PATH`:
 *   read:P  write:P  unlink:P  mkdir:P  rmdir:P  stat:P  lstat:P
 *   rename:FROM:TO  link:FROM:TO  linkfollow:FROM:TO  symlink:TARGET:LINK
 * Prints `ARG: ok[ DETAIL]` or `ARG: refused ERRNAME`. */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "wasi_facts.h"

static int run(const char *op, const char *a, const char *b, char *detail, size_t size) {
    if (!strcmp(op, "read")) {
        int fd = open(a, O_RDONLY);
        if (fd < 0)
            return -1;
        ssize_t n = read(fd, detail, size - 1);
        close(fd);
        if (n < 0)
            return -1;
        detail[n] = 0;
        if (n && detail[n - 1] == '\n')
            detail[n - 1] = 0;
        return 0;
    }
    if (!strcmp(op, "write")) {
        int fd = open(a, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0)
            return -1;
        ssize_t n = write(fd, "written by the guest\n", 21);
        close(fd);
        return n < 0 ? -1 : 0;
    }
    if (!strcmp(op, "unlink"))
        return unlink(a);
    if (!strcmp(op, "mkdir"))
        return mkdir(a, 0755);
    if (!strcmp(op, "rmdir"))
        return rmdir(a);
    if (!strcmp(op, "stat") || !strcmp(op, "lstat")) {
        struct stat st;
        int r = op[0] == 's' ? stat(a, &st) : lstat(a, &st);
        if (r == 0)
            snprintf(detail, size, "%s", S_ISREG(st.st_mode) ? "file" : S_ISDIR(st.st_mode) ? "dir" : S_ISLNK(st.st_mode) ? "symlink" : "other");
        return r;
    }
    if (!b) {
        errno = EINVAL;
        return -1;
    }
    if (!strcmp(op, "rename"))
        return rename(a, b);
    if (!strcmp(op, "link"))
        return link(a, b);
    if (!strcmp(op, "linkfollow"))
        return linkat(AT_FDCWD, a, AT_FDCWD, b, AT_SYMLINK_FOLLOW);
    if (!strcmp(op, "symlink"))
        return symlink(a, b);
    errno = EINVAL;
    return -1;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        char arg[512];
        snprintf(arg, sizeof arg, "%s", argv[i]);
        char *a = strchr(arg, ':');
        if (!a) {
            printf("%s: malformed\n", argv[i]);
            continue;
        }
        *a++ = 0;
        char *b = strchr(a, ':');
        if (b)
            *b++ = 0;
        char detail[128] = "";
        errno = 0;
        if (run(arg, a, b, detail, sizeof detail) < 0)
            printf("%s: refused %s\n", argv[i], errname(errno));
        else
            printf("%s: ok%s%s\n", argv[i], detail[0] ? " " : "", detail);
    }
    return 0;
}
