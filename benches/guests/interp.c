/* A small stack-machine interpreter running a loop-heavy bytecode program
 * (nested counting loops with arithmetic): one `switch` dispatch loop, the
 * shape of every interpreter and the worst case for a per-iteration check. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

enum op { PUSH, LOAD, STORE, ADD, SUB, MUL, XOR, SHR, JNZ, JMP, DEC, HALT };

struct insn { uint8_t op; int32_t arg; };

static int64_t run(const struct insn *code, int64_t *vars)
{
    int64_t stack[64];
    int sp = 0;
    for (int pc = 0;;) {
        const struct insn *i = &code[pc++];
        switch (i->op) {
        case PUSH: stack[sp++] = i->arg; break;
        case LOAD: stack[sp++] = vars[i->arg]; break;
        case STORE: vars[i->arg] = stack[--sp]; break;
        case ADD: sp--; stack[sp - 1] += stack[sp]; break;
        case SUB: sp--; stack[sp - 1] -= stack[sp]; break;
        case MUL: sp--; stack[sp - 1] *= stack[sp]; break;
        case XOR: sp--; stack[sp - 1] ^= stack[sp]; break;
        case SHR: sp--; stack[sp - 1] = (int64_t)((uint64_t)stack[sp - 1] >> stack[sp]); break;
        case JNZ: if (stack[--sp] != 0) pc = i->arg; break;
        case JMP: pc = i->arg; break;
        case DEC: vars[i->arg]--; break;
        case HALT: return vars[0];
        }
    }
}

int main(int argc, char **argv)
{
    int outer = argc > 1 ? atoi(argv[1]) : 10000;
    /* acc = 0; for (i = outer; i; i--) for (j = 1000; j; j--)
     *     acc = (acc * 31 + i * j) ^ (acc >> 7); */
    const struct insn program[] = {
        /* 0 */ {PUSH, 0}, {STORE, 0},
        /* 2 */ {LOAD, 3}, {STORE, 1},
        /* 4 */ {PUSH, 1000}, {STORE, 2},
        /* 6 */ {LOAD, 0}, {PUSH, 31}, {MUL, 0}, {LOAD, 1}, {LOAD, 2}, {MUL, 0}, {ADD, 0},
        /* 13 */ {LOAD, 0}, {PUSH, 7}, {SHR, 0}, {XOR, 0}, {STORE, 0},
        /* 18 */ {DEC, 2}, {LOAD, 2}, {JNZ, 6},
        /* 21 */ {DEC, 1}, {LOAD, 1}, {JNZ, 4},
        /* 24 */ {HALT, 0},
    };
    int64_t vars[4] = {0, 0, 0, outer};
    /* Start the outer loop at 2 with i = outer: the STORE at 3 sets it. */
    printf("acc %lld\n", (long long)run(program, vars));
    return 0;
}
