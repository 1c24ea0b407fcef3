/* Shared by the guests of the differential WASI test (tests/wasidiff):
 * each prints facts about what its WASI calls did, one line per step, in a
 * form that two correct hosts must print alike: errno names, sizes, content
 * hashes, relative order. Never inode numbers, fd numbers or times that
 * legitimately differ between hosts. */
#ifndef WASI_FACTS_H
#define WASI_FACTS_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static inline const char *errname(int e) {
    switch (e) {
    case 0: return "0";
    case E2BIG: return "E2BIG";
    case EACCES: return "EACCES";
    case EAGAIN: return "EAGAIN";
    case EBADF: return "EBADF";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case EFAULT: return "EFAULT";
    case EFBIG: return "EFBIG";
    case EINVAL: return "EINVAL";
    case EIO: return "EIO";
    case EISDIR: return "EISDIR";
    case ELOOP: return "ELOOP";
    case EMLINK: return "EMLINK";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ENOENT: return "ENOENT";
    case ENOSPC: return "ENOSPC";
    case ENOSYS: return "ENOSYS";
    case ENOTDIR: return "ENOTDIR";
    case ENOTEMPTY: return "ENOTEMPTY";
    case ENOTSUP: return "ENOTSUP";
    case ENOTTY: return "ENOTTY";
    case ENXIO: return "ENXIO";
    case EOVERFLOW: return "EOVERFLOW";
    case EPERM: return "EPERM";
    case EPIPE: return "EPIPE";
    case ERANGE: return "ERANGE";
    case EROFS: return "EROFS";
    case ESPIPE: return "ESPIPE";
    case EXDEV: return "EXDEV";
    case ENOTCAPABLE: return "ENOTCAPABLE";
    default: {
        static char other[16];
        snprintf(other, sizeof other, "E#%d", e);
        return other;
    }
    }
}

/* `label: ok` or `label: ENAME` for a libc call returning -1 on failure. */
#define CHECK(label, expr)                                                   \
    do {                                                                     \
        errno = 0;                                                           \
        long r_ = (long)(expr);                                              \
        if (r_ < 0)                                                          \
            printf("%s: %s\n", (label), errname(errno));                     \
        else                                                                 \
            printf("%s: ok\n", (label));                                     \
    } while (0)

/* As CHECK, printing the value on success (sizes, offsets, counts). */
#define VALUE(label, expr)                                                   \
    do {                                                                     \
        errno = 0;                                                           \
        long long r_ = (long long)(expr);                                    \
        if (r_ < 0)                                                          \
            printf("%s: %s\n", (label), errname(errno));                     \
        else                                                                 \
            printf("%s: %lld\n", (label), r_);                               \
    } while (0)

/* A raw WASI call's errno (`__wasi_errno_t`), which is also a C errno. */
#define RAW(label, expr)                                                     \
    do {                                                                     \
        int e_ = (int)(expr);                                                \
        printf("%s: %s\n", (label), e_ ? errname(e_) : "ok");                \
    } while (0)

static inline uint64_t fnv1a(const void *data, size_t len) {
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* splitmix64: the random guest's parameters come from its seed only. */
__attribute__((unused)) static uint64_t rng_state;

static inline uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [0, n). */
static inline uint64_t rng_below(uint64_t n) {
    return n ? rng_next() % n : 0;
}

#endif
