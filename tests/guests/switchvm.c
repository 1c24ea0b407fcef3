/* A bytecode interpreter whose `switch` cases each call a helper that can
 * unwind (each has a loop), the shape clang lowers to one block per case
 * around a br_table: the rewind dispatch of that nest must resume inside the
 * right case. usage: switchvm [ROUNDS [REPS]]; prints a checksum per round. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

enum op { PUSH, ADD, MUL, MIX, ROT, SQ, FOLD, DUP, DROP, SWAP, HALT };

struct insn { uint8_t op; int32_t arg; };

static uint64_t stack[64];
static int sp;
/* Set at run time, so the compiler cannot unroll the helpers' loops. */
static int reps;

/* Each helper stirs its result in a loop the compiler cannot close, so it
 * is an update point and every case of the dispatch is a call that can
 * unwind. */
#define STIR(x)                                                  \
    for (int i_ = 0; i_ < reps; i_++)                            \
        (x) = ((x) ^ ((x) >> 29)) * 0x9e3779b97f4a7c15ull + 1

__attribute__((noinline)) static void push(int32_t v)
{
    uint64_t x = (uint64_t)v;
    STIR(x);
    stack[sp++] = x;
}

__attribute__((noinline)) static void add(void)
{
    uint64_t b = stack[--sp];
    STIR(b);
    stack[sp - 1] += b;
}

__attribute__((noinline)) static void mul(int32_t k)
{
    uint64_t x = stack[sp - 1] * (uint64_t)k;
    STIR(x);
    stack[sp - 1] = x;
}

__attribute__((noinline)) static void mix(void)
{
    uint64_t x = stack[sp - 1] ^ 0x5555;
    STIR(x);
    stack[sp - 1] = x;
}

__attribute__((noinline)) static void rot(int32_t n)
{
    uint64_t x = stack[sp - 1];
    x = (x << n) | (x >> (64 - n));
    STIR(x);
    stack[sp - 1] = x;
}

__attribute__((noinline)) static void sq(void)
{
    uint64_t x = stack[sp - 1];
    x *= x;
    STIR(x);
    stack[sp - 1] = x;
}

__attribute__((noinline)) static void fold(void)
{
    uint64_t x = stack[sp - 1];
    x ^= x >> 32;
    STIR(x);
    stack[sp - 1] = x;
}

__attribute__((noinline)) static void dup(void)
{
    uint64_t x = stack[sp - 1];
    STIR(x);
    stack[sp++] = x;
}

__attribute__((noinline)) static void drop(void)
{
    uint64_t x = stack[--sp];
    STIR(x);
    stack[sp - 1] ^= x;
}

__attribute__((noinline)) static void swap(void)
{
    uint64_t t = stack[sp - 1];
    STIR(t);
    stack[sp - 1] = stack[sp - 2];
    stack[sp - 2] = t;
}

__attribute__((noinline)) static uint64_t run(const struct insn *code, int len)
{
    sp = 0;
    for (int pc = 0; pc < len; pc++) {
        const struct insn *i = &code[pc];
        switch (i->op) {
        case PUSH: push(i->arg); break;
        case ADD: add(); break;
        case MUL: mul(i->arg); break;
        case MIX: mix(); break;
        case ROT: rot(i->arg); break;
        case SQ: sq(); break;
        case FOLD: fold(); break;
        case DUP: dup(); break;
        case DROP: drop(); break;
        case SWAP: swap(); break;
        case HALT: pc = len; break;
        }
    }
    return sp > 0 ? stack[sp - 1] : 0;
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 20;
    reps = argc > 2 ? atoi(argv[2]) : 1;
    const struct insn program[] = {
        {PUSH, 7}, {PUSH, 11}, {ADD, 0}, {DUP, 0}, {MUL, 2}, {MIX, 0},
        {SWAP, 0}, {ROT, 5}, {ADD, 0}, {SQ, 0}, {FOLD, 0}, {DUP, 0},
        {PUSH, 3}, {ADD, 0}, {SWAP, 0}, {DROP, 0}, {MIX, 0}, {HALT, 0},
    };
    int len = (int)(sizeof program / sizeof program[0]);
    uint64_t acc = 0;
    for (int r = 0; r < rounds; r++) {
        /* Many passes per round keep the dispatch hot for timing. */
        for (int k = 0; k < 1000; k++)
            acc = acc * 31 + run(program, len) + (uint64_t)r;
        printf("round %d: %016llx\n", r, (unsigned long long)acc);
    }
    return 0;
}
