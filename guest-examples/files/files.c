/*
 * files: exercises a host's WASI layer for arguments, environment, files
 * and directories, and its sandbox.
 *
 * usage: files DIR [NAME...]
 *   DIR   a directory the host preopened (its guest path), ideally empty
 *   NAME  further environment variables to print, besides GREETING
 *
 * Each step prints one line, deterministic for a given DIR, environment and
 * host. It leaves DIR as it found it except for DIR/result.txt ("files: ok\n"
 * or "files: N failures\n"), which a test can check from outside.
 * Exit status: $EXIT_CODE if set (to test exit-status propagation through
 * exit()); else 1 if any step failed, else 0 (returned from main).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *dir;
static int failures;

static const char *errno_name(int e)
{
    /* a table, not a switch: some of these share a value on some libcs */
    static const struct {
        int value;
        const char *name;
    } names[] = {
        {ENOENT, "ENOENT"},
#ifdef ENOTCAPABLE
        {ENOTCAPABLE, "ENOTCAPABLE"},
#endif
        {EACCES, "EACCES"},   {EPERM, "EPERM"},         {EBADF, "EBADF"},
        {EEXIST, "EEXIST"},   {ENOTDIR, "ENOTDIR"},     {EISDIR, "EISDIR"},
        {EINVAL, "EINVAL"},   {ENOTEMPTY, "ENOTEMPTY"}, {ENOSYS, "ENOSYS"},
        {ENOTSUP, "ENOTSUP"}, {EXDEV, "EXDEV"},         {ELOOP, "ELOOP"},
        {EROFS, "EROFS"},     {ENAMETOOLONG, "ENAMETOOLONG"}, {EIO, "EIO"},
        {ENOSPC, "ENOSPC"},   {EMFILE, "EMFILE"},
    };
    static char other[32];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (names[i].value == e)
            return names[i].name;
    snprintf(other, sizeof other, "errno %d", e);
    return other;
}

static const char *in_dir(const char *name)
{
    /* two buffers, so a rename can hold both paths at once */
    static char bufs[2][4096];
    static int which;
    char *p = bufs[which];
    which ^= 1;
    snprintf(p, sizeof bufs[0], "%s/%s", dir, name);
    return p;
}

static void fail(const char *step)
{
    printf("%s: failed (%s)\n", step, errno_name(errno));
    failures++;
}

static void print_quoted(const char *s, size_t n)
{
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\n')
            fputs("\\n", stdout);
        else if (s[i] == '"' || s[i] == '\\')
            printf("\\%c", s[i]);
        else if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] >= 0x7f)
            printf("\\x%02x", (unsigned char)s[i]);
        else
            putchar(s[i]);
    }
    putchar('"');
}

static void write_file(const char *step, const char *name, int flags, const char *text)
{
    char label[128];
    snprintf(label, sizeof label, "%s %s", step, name);
    int fd = open(in_dir(name), flags, 0644);
    if (fd < 0) {
        fail(label);
        return;
    }
    ssize_t n = write(fd, text, strlen(text));
    if (n < 0) {
        fail(label);
        close(fd);
        return;
    }
    printf("%s: %zd bytes\n", label, n);
    if (close(fd) != 0)
        fail(label);
}

static void read_file(const char *name)
{
    char buf[256];
    char label[128];
    snprintf(label, sizeof label, "read %s", name);
    int fd = open(in_dir(name), O_RDONLY);
    if (fd < 0) {
        fail(label);
        return;
    }
    size_t total = 0;
    for (;;) {
        ssize_t n = read(fd, buf + total, sizeof buf - total);
        if (n < 0) {
            fail(label);
            close(fd);
            return;
        }
        if (n == 0 || (total += (size_t)n) == sizeof buf)
            break;
    }
    close(fd);
    printf("%s: %zu bytes ", label, total);
    print_quoted(buf, total);
    putchar('\n');
}

static void stat_path(const char *name)
{
    struct stat st;
    if (stat(in_dir(name), &st) != 0) {
        printf("stat %s: failed (%s)\n", name, errno_name(errno));
        return;
    }
    if (S_ISDIR(st.st_mode))
        printf("stat %s: directory\n", name);
    else if (S_ISREG(st.st_mode))
        printf("stat %s: regular file, size %lld\n", name, (long long)st.st_size);
    else
        printf("stat %s: other (mode %o)\n", name, (unsigned)st.st_mode);
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* readdir's order is the host file system's; sorting makes it ours. */
static void list_dir(const char *label, const char *path)
{
    DIR *d = opendir(path);
    if (!d) {
        printf("list %s: failed (%s)\n", label, errno_name(errno));
        failures++;
        return;
    }
    char **names = NULL;
    size_t count = 0, cap = 0;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        if (count == cap) {
            cap = cap ? cap * 2 : 16;
            char **grown = realloc(names, cap * sizeof *names);
            if (!grown) {
                fprintf(stderr, "files: out of memory\n");
                exit(1);
            }
            names = grown;
        }
        names[count] = strdup(e->d_name);
        if (!names[count]) {
            fprintf(stderr, "files: out of memory\n");
            exit(1);
        }
        count++;
    }
    if (errno != 0) {
        printf("list %s: readdir failed (%s)\n", label, errno_name(errno));
        failures++;
    }
    closedir(d);
    if (count > 1)
        qsort(names, count, sizeof *names, by_name);
    printf("list %s:", label);
    if (count == 0)
        printf(" (empty)");
    for (size_t i = 0; i < count; i++) {
        printf(" %s", names[i]);
        free(names[i]);
    }
    putchar('\n');
    free(names);
}

static void step_ok(const char *what, int result)
{
    if (result != 0)
        fail(what);
    else
        printf("%s: ok\n", what);
}

/* The host must refuse paths outside the preopened directories. Read-only,
   so a host that wrongly allows it still changes nothing; a test should put
   a real file at DIR/../outside.txt so ENOENT cannot pass for a refusal. */
static void try_escape(const char *label, const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd >= 0) {
        printf("escape %s: ALLOWED\n", label);
        close(fd);
    } else {
        printf("escape %s: refused (%s)\n", label, errno_name(errno));
    }
}

int main(int argc, char **argv)
{
    printf("argc %d\n", argc);
    for (int i = 0; i < argc; i++)
        printf("argv[%d] %s\n", i, argv[i]);
    if (argc < 2) {
        fprintf(stderr, "usage: files DIR [NAME...]\n");
        return 2;
    }
    dir = argv[1];

    const char *greeting = getenv("GREETING");
    printf("env GREETING%s%s\n", greeting ? "=" : " ", greeting ? greeting : "(unset)");
    for (int i = 2; i < argc; i++) {
        const char *v = getenv(argv[i]);
        printf("env %s%s%s\n", argv[i], v ? "=" : " ", v ? v : "(unset)");
    }

    write_file("create", "hello.txt", O_WRONLY | O_CREAT | O_TRUNC, "hello, world\n");
    read_file("hello.txt");
    write_file("append", "hello.txt", O_WRONLY | O_APPEND, "second line\n");
    stat_path("hello.txt");
    write_file("create", "notes.txt", O_WRONLY | O_CREAT | O_EXCL, "notes\n");
    list_dir(".", dir);

    step_ok("mkdir sub", mkdir(in_dir("sub"), 0755));
    stat_path("sub");
    const char *from = in_dir("hello.txt");
    const char *to = in_dir("sub/moved.txt");
    step_ok("rename hello.txt sub/moved.txt", rename(from, to));
    stat_path("hello.txt");
    read_file("sub/moved.txt");
    list_dir("sub", in_dir("sub"));
    if (rmdir(in_dir("sub")) == 0) {
        printf("rmdir non-empty sub: ALLOWED\n");
        failures++;
    } else {
        printf("rmdir non-empty sub: refused (%s)\n", errno_name(errno));
    }
    step_ok("unlink sub/moved.txt", unlink(in_dir("sub/moved.txt")));
    step_ok("rmdir sub", rmdir(in_dir("sub")));
    step_ok("unlink notes.txt", unlink(in_dir("notes.txt")));
    list_dir(".", dir);

    try_escape("../outside.txt", in_dir("../outside.txt"));
    try_escape("/etc/passwd", "/etc/passwd");

    char result[64];
    if (failures == 0)
        snprintf(result, sizeof result, "files: ok\n");
    else
        snprintf(result, sizeof result, "files: %d failures\n", failures);
    write_file("write", "result.txt", O_WRONLY | O_CREAT | O_TRUNC, result);

    printf("done: %d failures\n", failures);
    fflush(stdout);

    const char *code = getenv("EXIT_CODE");
    if (code)
        exit(atoi(code));
    return failures ? 1 : 0;
}
