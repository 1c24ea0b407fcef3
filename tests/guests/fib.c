/* Naive recursive Fibonacci: calls and no loop, so no update point inside
 * the computation. The host's pause limit must refuse a pause here and let
 * the program run on. usage: fib N */
#include <stdio.h>
#include <stdlib.h>

/* optnone: at -O2 clang turns one of the two calls into a loop, and a
 * loop is an update point. */
__attribute__((optnone, noinline)) static long fib(int n)
{
    return n < 2 ? n : fib(n - 1) + fib(n - 2);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 30;
    printf("fib(%d) = %ld\n", n, fib(n));
    return 0;
}
