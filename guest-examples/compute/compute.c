/*
 * compute: a CPU-bound guest that never calls the host inside its loops.
 *
 * It exercises what an update has to carry across a pause in the middle of
 * computation: deep recursion on the engine's stack, recursion whose frames
 * live on the shadow stack in linear memory, a heap-allocated tree, and
 * locals of all four wasm value types (i32, i64, f32, f64) live across
 * calls. Every value depends on the input, so the optimizer cannot fold
 * them away, and the output is exact and deterministic (no libm beyond
 * sqrt, which IEEE 754 rounds exactly; floats printed with fixed precision).
 *
 * usage: compute [ROUNDS [DEPTH]]   (defaults DEFAULT_ROUNDS, DEFAULT_DEPTH)
 *        compute trap               (traps four named frames below main)
 *
 * Two versions, chosen with -DCOMPUTE_VERSION=N (default 1), for updates in
 * the middle of the computation. Version 2 changes only main's report after
 * the rounds (one label changes, `deep: sum' to `deep: mean', and a last
 * line names the version): main is on the stack for the whole run, so an
 * update lands in a changed function, and the numbers printed after it come
 * from state carried over. Every other function, descend() and the other
 * recursions included, has the same body in both versions, and main keeps
 * the same wasm locals and shadow-stack frame (version 2 prints nothing that
 * version 1 lets die, which would keep it live and renumber the locals), so
 * its frames map one to one.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef COMPUTE_VERSION
#define COMPUTE_VERSION 1
#endif
#if COMPUTE_VERSION < 1 || COMPUTE_VERSION > 2
#error "COMPUTE_VERSION must be 1 or 2"
#endif

#define DEFAULT_ROUNDS 500
/* Default depth of the recursion on the engine's stack. At -O2 a frame of
   descend() takes 50 to 100 bytes of native stack (measured in V8), so 2000
   frames leave room within wasmtime's default 512 KiB wasm stack for the
   larger frames of an instrumented version. An -O0 build's frames are about
   500 bytes: give it a smaller DEPTH or the engine a bigger stack. */
#define DEFAULT_DEPTH 2000
#define MAX_DEPTH 1000000
/* Shadow-stack recursion depth: each frame holds a 64-byte array in linear
   memory, about 100 bytes in all. At -O2 the whole program fits wasm-ld's
   default 64 KiB stack; build.flags still asks for 1 MiB because at -O0
   every local of descend() moves to the shadow stack too. */
#define SHADOW_DEPTH 300
#define TREE_NODES 4096

/* ---- recursion on the wasm stack ------------------------------------------ */

/* Every local of every type is computed before the recursive call and used
   after it, so each frame on the way down holds live i32, i64, f32 and f64
   values. The floating-point tail keeps clang from turning this into a loop. */
__attribute__((noinline)) static double descend(int32_t level, int64_t acc, float f, double d)
{
    if (level == 0)
        return d + (double)f + (double)(acc & 0xffff);
    int32_t i = level * 3 + (int32_t)(acc & 7);
    int64_t w = (int64_t)((uint64_t)acc * 6364136223846793005ULL + (uint64_t)level);
    float g = f * 0.5f + (float)(level & 7);
    double e = d * 0.75 + (double)(level % 13);
    double below = descend(level - 1, w, g, e);
    return below * 0.5 + (double)(i ^ (int32_t)(w >> 40)) * 1e-6 + (double)g * 0.25 + e * 1e-3;
}

/* ---- recursion on the shadow stack ---------------------------------------- */

/* `block` has its address passed down, so it must live in linear memory:
   each level takes a slice of the shadow stack below __stack_pointer. */
__attribute__((noinline)) static uint32_t shadow_descend(int level, const uint32_t *parent)
{
    uint32_t block[16];
    for (int k = 0; k < 16; k++)
        block[k] = parent[k] * 2654435761u + (uint32_t)level + (uint32_t)k;
    uint32_t below = level > 0 ? shadow_descend(level - 1, block) : 0;
    return (below ^ block[level & 15]) * 31u + block[(level + 7) & 15];
}

/* ---- a tree on the heap ------------------------------------------------------ */

struct node {
    struct node *left;
    struct node *right;
    int32_t key;
    int64_t weight;
    float scale;
    double value;
};

static uint32_t next_random(uint32_t *state)
{
    /* xorshift32: deterministic and the same on every platform */
    uint32_t x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *state = x;
}

static struct node *tree_insert(struct node *root, struct node *n)
{
    struct node **p = &root;
    while (*p)
        p = n->key < (*p)->key ? &(*p)->left : &(*p)->right;
    *p = n;
    return root;
}

static struct node *tree_build(uint32_t *rng, int count)
{
    struct node *root = NULL;
    for (int k = 0; k < count; k++) {
        struct node *n = malloc(sizeof *n);
        if (!n) {
            fprintf(stderr, "compute: out of memory\n");
            exit(1);
        }
        uint32_t r = next_random(rng);
        n->left = n->right = NULL;
        n->key = (int32_t)(r >> 1);
        n->weight = (int64_t)r * (k + 1);
        n->scale = (float)(r & 1023) / 1024.0f;
        n->value = (double)(r % 100003) / 7.0;
        root = tree_insert(root, n);
    }
    return root;
}

struct tree_sums {
    int32_t nodes;
    int64_t weight;
    float scale;
    double value;
    int32_t depth;
};

/* In-order, so the float and double sums are added in one fixed order. */
static void tree_walk(const struct node *n, int32_t depth, struct tree_sums *s)
{
    if (!n)
        return;
    tree_walk(n->left, depth + 1, s);
    s->nodes++;
    s->weight += n->weight ^ (int64_t)depth;
    s->scale = s->scale * 0.5f + n->scale;
    s->value += n->value * (double)n->scale;
    if (depth > s->depth)
        s->depth = depth;
    tree_walk(n->right, depth + 1, s);
}

static void tree_free(struct node *n)
{
    if (!n)
        return;
    tree_free(n->left);
    tree_free(n->right);
    free(n);
}

/* ---- a deliberate trap --------------------------------------------------------- */

/* Four named frames so the host's trap backtrace has something to show:
   main -> trap_outer -> trap_middle -> trap_inner -> trap_now. */
__attribute__((noinline)) static int trap_now(int x)
{
    if (x >= 0)
        __builtin_trap();
    return x;
}

__attribute__((noinline)) static int trap_inner(int x)
{
    return trap_now(x + 1) * 3;
}

__attribute__((noinline)) static int trap_middle(int x)
{
    return trap_inner(x + 1) * 5;
}

__attribute__((noinline)) static int trap_outer(int x)
{
    return trap_middle(x + 1) * 7;
}

/* ---- main -------------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr, "usage: compute [ROUNDS (1..1000000000) [DEPTH (0..%d)]] | compute trap\n",
            MAX_DEPTH);
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "trap") == 0) {
        printf("compute: about to trap\n");
        fflush(stdout);
        /* argc keeps the argument unknown to the compiler */
        return trap_outer(argc - 2);
    }

    long rounds = DEFAULT_ROUNDS;
    if (argc > 1) {
        char *end;
        rounds = strtol(argv[1], &end, 10);
        if (*argv[1] == '\0' || *end != '\0' || rounds < 1 || rounds > 1000000000L)
            usage();
    }
    long depth_arg = DEFAULT_DEPTH;
    if (argc > 2) {
        char *end;
        depth_arg = strtol(argv[2], &end, 10);
        if (*argv[2] == '\0' || *end != '\0' || depth_arg < 0 || depth_arg > MAX_DEPTH)
            usage();
    }
    if (argc > 3)
        usage();
    int32_t depth = (int32_t)depth_arg;
    printf("compute: rounds %ld, depth %d\n", rounds, (int)depth);

    /* Accumulators of each wasm value type, live across every call below. */
    int32_t acc32 = (int32_t)rounds;
    int64_t acc64 = rounds * 1000003LL;
    float accf = (float)(rounds % 97) * 0.125f;
    double accd = (double)rounds / 3.0;

    uint32_t rng = 2463534242u ^ (uint32_t)rounds;
    uint32_t seed_block[16];
    for (int k = 0; k < 16; k++)
        seed_block[k] = (uint32_t)rounds + (uint32_t)k * 0x9e3779b9u;

    double deep_sum = 0.0;
    uint32_t shadow_sum = 0;
    struct tree_sums last = {0, 0, 0.0f, 0.0, 0};

    for (long r = 0; r < rounds; r++) {
        double deep = descend(depth, acc64 + r, accf + (float)(r & 3), accd);
        deep_sum += deep;

        seed_block[r & 15] ^= (uint32_t)acc32;
        uint32_t sh = shadow_descend(SHADOW_DEPTH, seed_block);
        shadow_sum = shadow_sum * 33u + sh;

        struct node *root = tree_build(&rng, TREE_NODES);
        struct tree_sums s = {0, 0, 0.0f, 0.0, 0};
        tree_walk(root, 0, &s);
        tree_free(root);
        last = s;

        acc32 = (int32_t)((uint32_t)acc32 * 1103515245u + 12345u + sh);
        acc64 ^= s.weight + (int64_t)r;
        accf = accf * 0.5f + s.scale * 0.001f;
        accd = accd * 0.5 + s.value * 1e-9 + deep * 1e-6;
    }

#if COMPUTE_VERSION == 2
    /* the figure is the mean over the rounds: version 2 says so */
    printf("deep: mean %.6f\n", deep_sum / (double)rounds);
#else
    printf("deep: sum %.6f\n", deep_sum / (double)rounds);
#endif
    printf("shadow: depth %d, checksum %08x\n", SHADOW_DEPTH, (unsigned)shadow_sum);
    printf("tree: nodes %d, depth %d, weight %lld, scale %.6f, value %.6f\n", (int)last.nodes,
           (int)last.depth, (long long)last.weight, (double)last.scale, last.value);
    printf("locals: i32 %d, i64 %lld, f32 %.6f, f64 %.6f\n", (int)acc32, (long long)acc64,
           (double)accf, accd);
#if COMPUTE_VERSION == 2
    printf("compute: done (version 2)\n");
#endif
    return 0;
}
