/* A guest whose versions exercise what relinking must carry from one
 * version to the next, beyond plain globals and functions:
 *
 * - weak undefined functions and data: their addresses are null, tested
 *   and (for the function, guarded) called;
 * - an alias (`tally` names the same object as `counter`);
 * - a thread-local variable, which a build without threads lowers to an
 *   ordinary global;
 * - a section walked from `__start_relink_items` to `__stop_relink_items`;
 * - a constructor; version 2 adds one, which runs once when the program
 *   is updated to version 2, while version 1's does not run again;
 * - `counter`, the first object of .data, right after the read-only data;
 * - version 2: a function whose address is taken for the first time (the
 *   table grows) and libc objects only it pulls in (`chdir`, `access` and
 *   the wasi-libc code behind them, whose own constructor fills the table
 *   of preopened directories: `file=1` when `/data/relink.c` is there);
 * - version 3: one more entry in the walked section, which cannot stay
 *   side by side with the entries kept in place: refused;
 * - version 4: version 2 and a constructor that traps unless the program
 *   has just started: the update to it is rolled back.
 *
 * It prints one line per tick: `vN tick=T counter=C tls=L items=S ...`, then
 * sleeps 20 ms (an update point). Built as relink, relink-v2, relink-v3,
 * relink-v4 (see `versions`).
 */
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#ifndef RELINK_VERSION
#define RELINK_VERSION 1
#endif

extern int weak_data __attribute__((weak));
extern int weak_function(int) __attribute__((weak));

/* Initialised, and first in the file: the first object of .data, which
 * starts right where the read-only data ends. */
int counter = 1000;
extern int tally __attribute__((alias("counter")));

_Thread_local int per_thread = 7;

#define ITEM(name, value) \
    __attribute__((used, section("relink_items"))) static const int name = value
ITEM(item_a, 1);
ITEM(item_b, 10);
#if RELINK_VERSION == 3
ITEM(item_c, 100);
#endif
extern const int __start_relink_items[], __stop_relink_items[];

/* Read through a volatile, so clang cannot run the constructors at
 * compile time and fold them into initial values. */
volatile int one = 1;
int constructed;
__attribute__((constructor)) static void construct(void) { constructed += one; }
#if RELINK_VERSION >= 2
int constructed_v2;
__attribute__((constructor)) static void construct_v2(void) { constructed_v2 = one; }
#endif
#if RELINK_VERSION == 4
__attribute__((constructor)) static void construct_v4(void) {
    if (counter != 1000 * one)
        __builtin_trap();
}
#endif

static int items(void) {
    int sum = 0;
    for (const int *p = __start_relink_items; p < __stop_relink_items; p++)
        sum += *p;
    return sum;
}

#if RELINK_VERSION >= 2
__attribute__((noinline)) static int twice(int x) { return 2 * x; }
/* volatile, so the pointer is really taken and called through the table */
int (*volatile through_table)(int) = twice;
#endif

__attribute__((noinline)) static void tick(int t) {
    tally++;
    per_thread++;
    int weak = (&weak_data == 0) + 2 * (weak_function == 0);
    if (weak_function)
        weak = weak_function(weak);
#if RELINK_VERSION >= 2
    /* Never true: only links chdir and what it needs into version 2. */
    if (counter < 0)
        chdir("/");
    int file = access("/data/relink.c", F_OK) == 0;
    printf("v%d tick=%d counter=%d tls=%d items=%d weak=%d constructed=%d,%d twice=%d file=%d\n", RELINK_VERSION,
           t, counter, per_thread, items(), weak, constructed, constructed_v2, through_table(counter), file);
#else
    printf("v%d tick=%d counter=%d tls=%d items=%d weak=%d constructed=%d\n", RELINK_VERSION, t, counter,
           per_thread, items(), weak, constructed);
#endif
    fflush(stdout);
}

int main(void) {
    for (int t = 0;; t++) {
        tick(t);
        struct timespec pause = {0, 20 * 1000 * 1000};
        nanosleep(&pause, 0);
    }
}
