/* Lua's ldo.c includes <setjmp.h> whatever LUAI_THROW is; the overhead
 * bench builds Lua with LUAI_THROW, LUAI_TRY and luai_jmpbuf defined (see
 * benches/guests/lua-workload.c), so it needs nothing from it, and wasi-libc
 * has no setjmp without wasm exception handling. */
