/*
 * upstare.h: helpers for C programs run under upstare-host.
 *
 * bin/upstare-cc puts this folder on the include path, so a guest writes
 * `#include <upstare.h>`. Everything here is plain C over wasi-libc; a guest
 * that uses it still builds and runs on any WASI runtime.
 *
 * It holds the guest side of UpStare: finding the listeners the host
 * preopens (upstare_listener_fd), and the naming convention for state
 * transformers written in C (UPSTARE_TRANSFORM, UPSTARE_CONVERT), and
 * what an untyped pointer holds (UPSTARE_POINTS_TO); and processes (fork,
 * waitpid, kill), which only upstare-host provides: a guest that calls
 * them imports them from the host and runs nowhere else.
 */
#ifndef UPSTARE_H
#define UPSTARE_H

#include <sys/stat.h>
#include <sys/types.h>

/*
 * Returns the n-th (0-based) preopened TCP listener, or -1 if there is none.
 *
 * WASI preview 1 cannot create or bind sockets; the host opens listeners for
 * the guest. upstare-host, like the wasmtime CLI, numbers them from fd 3 in
 * the order of its --tcplisten flags, before any preopened directories. The
 * scan does not rely on that exact numbering: it counts the descriptors from
 * 3 up that fstat() reports as sockets, so it also works if a runtime puts
 * them elsewhere below 1024.
 *
 * Call it at startup, before accepting: an accepted connection is a socket
 * too and would be counted from then on.
 */
static inline int upstare_listener_fd(int n)
{
    int seen = 0;
    for (int fd = 3; fd < 1024; fd++) {
        struct stat st;
        if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode))
            continue;
        if (seen == n)
            return fd;
        seen++;
    }
    return -1;
}

/*
 * UPSTARE_TRANSFORM(global): a state transformer, written in the NEW version
 * of a program, for a global whose type changed in a way no automatic
 * mapping can carry (a field that changed type, a value to recompute):
 *
 *     UPSTARE_TRANSFORM(stats)
 *     {
 *         const struct old_stats *o = old_value;   (the old layout, declared
 *         struct server_stats *n = new_value;       by hand in the new code)
 *         n->requests = o->requests;
 *     }
 *
 * During `upstare-host update`, after the automatic field-by-field mapping
 * (which leaves what it cannot map zeroed), the host calls it with the
 * address of the old value and of the new one, before the program resumes.
 * It must write only the new value; if it traps, the update is rolled back
 * and the old version runs on. The naming convention is the export name
 * `upstare_transform_<global>`.
 */
#define UPSTARE_TRANSFORM(global)                                                            \
    __attribute__((export_name("upstare_transform_" #global))) void                         \
        upstare_transform_##global(const void *old_value, void *new_value)

/*
 * UPSTARE_CONVERT(tag): the same for every object of `struct tag` that an
 * update converts on the heap (the objects a changed struct's pointers
 * reach, found by tracing the heap from the globals), where the automatic
 * member-by-member mapping misses something (a member renamed, a value to
 * recompute):
 *
 *     UPSTARE_CONVERT(node)
 *     {
 *         const struct old_node *o = old_object;
 *         struct node *n = new_object;
 *         n->weight = o->value;                      (renamed)
 *     }
 *
 * It runs once per object (once per element of an array of them), after
 * the automatic mapping and after every pointer the old object held to a
 * converted object was rewritten to the new copy. It must write only the
 * new object; if it traps, the update is rolled back. The export name is
 * `upstare_convert_<tag>`.
 */
#define UPSTARE_CONVERT(tag)                                                                 \
    __attribute__((export_name("upstare_convert_" #tag))) void                              \
        upstare_convert_##tag(const void *old_object, void *new_object)

/*
 * UPSTARE_POINTS_TO(tag, member, type): in the new version, says that the
 * `void *` member `member` of `struct tag` points to a `type`:
 *
 *     UPSTARE_POINTS_TO(slot, value, struct entry);   (a hash table's values)
 *     UPSTARE_POINTS_TO(slot, key, char);             (plain bytes)
 *
 * The heap trace cannot tell what a `void *` holds. When some struct's type
 * changes, an allocation that only `void *` members reach and whose size
 * fits that struct refuses the update; with this declaration the member is
 * followed as a `type *` instead, and the objects behind it are converted
 * like those any typed pointer reaches (`type` not a struct: they are plain
 * data and stay as they are). Only the declared global's type is read; it
 * is never used.
 */
#define UPSTARE_POINTS_TO(tag, member, type) __attribute__((used)) type *upstare_points_to_##tag##__##member

/*
 * Processes. WASI has none; upstare-host gives a program several, each
 * with its own copy of the memory, sharing open files and sockets:
 *
 *     pid_t pid = fork();            (0 in the child, the child's pid in
 *     if (pid == 0) serve();          the parent, -1 and errno if not)
 *     int status;
 *     pid_t done = waitpid(-1, &status, 0);
 *     if (WIFSIGNALED(status)) ...
 *     kill(pid, SIGTERM);
 *
 * fork() copies the calling process's memory and stack into a new one
 * (through an unwind, so the module must be instrumented: under
 * --no-instrument it fails with ENOSYS), and the child shares every open
 * descriptor of its parent. waitpid() takes -1 (any child) or a child's
 * pid, and the option WNOHANG. kill() ends a process as SIGTERM or SIGKILL
 * (no handlers: WASI has no signals) at its next update point; signal 0
 * checks that it exists. A process that ends waits as a zombie for its
 * parent's waitpid(); the children of one that ends pass to the host
 * (getppid() returns 0 then), which reaps them. The end of process 1 ends
 * the whole program. upstare-host --max-processes bounds how many there
 * are at once (fork() fails with EAGAIN past it).
 *
 * fork, waitpid, getppid and kill are names wasi-libc's headers leave
 * undeclared, so they are defined here, with WNOHANG, the W* status
 * macros, SIGTERM and SIGKILL (<signal.h> refuses to compile without
 * wasi-libc's signal emulation); getpid is declared there (for an
 * emulation that returns a constant), so it is upstare_getpid() here.
 */
#include <errno.h>

#ifndef WNOHANG
#define WNOHANG 1
#endif
#ifndef WEXITSTATUS
#define WEXITSTATUS(s) (((s) & 0xff00) >> 8)
#define WTERMSIG(s) ((s) & 0x7f)
#define WIFEXITED(s) (!WTERMSIG(s))
#define WIFSIGNALED(s) (((s) & 0xffff) - 1U < 0xffu)
#endif
#ifndef SIGKILL
#define SIGKILL 9
#endif
#ifndef SIGTERM
#define SIGTERM 15
#endif

__attribute__((import_module("upstare"), import_name("fork"))) int upstare_fork_(void);
__attribute__((import_module("upstare"), import_name("waitpid"))) int upstare_waitpid_(int pid, int *status, int options);
__attribute__((import_module("upstare"), import_name("getpid"))) int upstare_getpid_(void);
__attribute__((import_module("upstare"), import_name("getppid"))) int upstare_getppid_(void);
__attribute__((import_module("upstare"), import_name("kill"))) int upstare_kill_(int pid, int signal);

/* The imports return a negative errno on failure; these set errno. */
static inline int upstare_result_(int r)
{
    if (r < 0) {
        errno = -r;
        return -1;
    }
    return r;
}

static inline pid_t fork(void) { return upstare_result_(upstare_fork_()); }
static inline pid_t waitpid(pid_t pid, int *status, int options) { return upstare_result_(upstare_waitpid_(pid, status, options)); }
static inline pid_t getppid(void) { return upstare_getppid_(); }
static inline int kill(pid_t pid, int signal) { return upstare_result_(upstare_kill_(pid, signal)); }
static inline pid_t upstare_getpid(void) { return upstare_getpid_(); }

#endif /* UPSTARE_H */
