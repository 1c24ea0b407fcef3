/*
 * The Lua workload of the overhead bench and the random-pause tests:
 * Lua 5.4 (from the sources the lua-src crate bundles) runs the script
 * below, whose work is spread over what a Lua program does: numeric
 * loops, table inserts, lookups and sorts, string building, formatting and
 * pattern matching, and calls of Lua functions and closures. Lua's
 * bytecode interpreter (luaV_execute) is one switch whose opcode cases
 * call helper functions (table access, string concatenation, calls), the
 * shape where update support used to cost most.
 *
 * Usage: lua-workload [SCALE]   (default 10; the output depends only on SCALE)
 *
 * Lua raises errors with setjmp/longjmp, which needs wasm exception handling;
 * the bench builds it with LUAI_THROW defined to abort(), and the script
 * raises no error. Only the libraries it uses are opened (no io, os or
 * coroutines, whose yields are errors too).
 */
#include <stdio.h>
#include <stdlib.h>

#include "lauxlib.h"
#include "lua.h"
#include "lualib.h"

static const char script[] =
    "local scale = ...\n"
    "local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end\n"
    "local function counter() local c = 0; return function(k) c = c + k; return c end end\n"
    "local check = 0\n"
    "local function mix(v) check = (check * 31 + v) % 4294967296 end\n"
    "for round = 1, scale do\n"
    "  -- numeric loops and calls\n"
    "  mix(fib(20 + round % 3))\n"
    "  local add = counter()\n"
    "  for i = 1, 20000 do add(i % 7) end\n"
    "  mix(add(0))\n"
    "  -- tables: array part, hash part, sort\n"
    "  local t, h = {}, {}\n"
    "  for i = 1, 20000 do t[i] = (i * 7919 + round) % 10007; h['k' .. (i % 5000)] = i end\n"
    "  table.sort(t)\n"
    "  local s = 0\n"
    "  for i = 1, #t, 13 do s = s + t[i] end\n"
    "  for k, v in pairs(h) do s = s + #k + v % 3 end\n"
    "  mix(s)\n"
    "  -- strings: building, formatting, patterns\n"
    "  local parts = {}\n"
    "  for i = 1, 3000 do parts[#parts + 1] = string.format('%d:%x;', i, i * round) end\n"
    "  local text = table.concat(parts)\n"
    "  local n = 0\n"
    "  for a, b in text:gmatch('(%d+):(%x+);') do n = n + #a + #b end\n"
    "  mix(n + #text:upper() + select(2, text:gsub('1', '!')))\n"
    "  -- objects with metatables\n"
    "  local V = {}; V.__index = V\n"
    "  V.__add = function(a, b) return setmetatable({x = a.x + b.x, y = a.y + b.y}, V) end\n"
    "  function V:len2() return self.x * self.x + self.y * self.y end\n"
    "  local acc = setmetatable({x = 0, y = 0}, V)\n"
    "  for i = 1, 5000 do acc = acc + setmetatable({x = i % 3, y = i % 5}, V) end\n"
    "  mix(acc:len2() % 1000003)\n"
    "end\n"
    "print(string.format('lua checksum %08x', check))\n";

int main(int argc, char **argv)
{
    int scale = argc > 1 ? atoi(argv[1]) : 10;
    lua_State *L = luaL_newstate();
    if (!L) {
        fputs("lua-workload: cannot create a Lua state\n", stderr);
        return 1;
    }
    static const luaL_Reg libs[] = {
        {LUA_GNAME, luaopen_base},     {LUA_TABLIBNAME, luaopen_table},
        {LUA_STRLIBNAME, luaopen_string}, {LUA_MATHLIBNAME, luaopen_math},
    };
    for (size_t i = 0; i < sizeof libs / sizeof libs[0]; i++) {
        luaL_requiref(L, libs[i].name, libs[i].func, 1);
        lua_pop(L, 1);
    }
    if (luaL_loadbuffer(L, script, sizeof script - 1, "workload") != LUA_OK) {
        fprintf(stderr, "lua-workload: %s\n", lua_tostring(L, -1));
        return 1;
    }
    lua_pushinteger(L, scale);
    lua_call(L, 1, 0);
    lua_close(L);
    return 0;
}
