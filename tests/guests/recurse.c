/* Naive recursive Fibonacci, compiled without optimisation so that it
 * stays a pure recursion with no loop: the only update points inside the
 * computation are function entries. usage: recurse N */
#include <stdio.h>
#include <stdlib.h>

__attribute__((optnone, noinline)) static long fib(int n)
{
    return n < 2 ? n : fib(n - 1) + fib(n - 2);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 20;
    printf("fib(%d) = %ld\n", n, fib(n));
    return 0;
}
