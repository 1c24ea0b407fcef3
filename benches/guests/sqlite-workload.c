/* An insert/index/query workload on SQLite, for the overhead bench.
 *
 * usage: sqlite-workload DIR [ROWS]
 *
 * Creates DIR/bench.db (DIR is a preopened directory; an existing database
 * is removed first), inserts ROWS rows (default 100000) in one transaction
 * through a prepared statement, then indexes them, runs range and point
 * queries through the index, an aggregate, an update and a delete, and
 * prints one line of results that depends on every step. Keys come from a
 * fixed linear congruential generator, so the output is the same on every
 * run and every engine; the figures the bench compares are run times.
 *
 * Built from SQLite's amalgamation with bin/upstare-cc and the flags in
 * benches/benches/common/sqlite.rs (no threads, no extension loading,
 * WASI's emulated mmap, getpid and process clocks).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sqlite3.h"

static sqlite3 *db;

static void fail(const char *what)
{
    fprintf(stderr, "sqlite-workload: %s: %s\n", what, db ? sqlite3_errmsg(db) : "no database");
    exit(1);
}

static void exec(const char *sql)
{
    char *err = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK) {
        fprintf(stderr, "sqlite-workload: %s: %s\n", sql, err ? err : "error");
        exit(1);
    }
}

static sqlite3_stmt *prepare(const char *sql)
{
    sqlite3_stmt *stmt;
    if (sqlite3_prepare_v2(db, sql, -1, &stmt, NULL) != SQLITE_OK)
        fail(sql);
    return stmt;
}

static uint32_t rng = 12345;

static uint32_t next(void)
{
    rng = rng * 1103515245u + 12345u;
    return rng >> 8;
}

/* Steps a statement that returns one integer row, then resets it. */
static int64_t one_int(sqlite3_stmt *stmt)
{
    if (sqlite3_step(stmt) != SQLITE_ROW)
        fail("query returned no row");
    int64_t v = sqlite3_column_int64(stmt, 0);
    sqlite3_reset(stmt);
    return v;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: sqlite-workload DIR [ROWS]\n");
        return 2;
    }
    long rows = argc == 3 ? strtol(argv[2], NULL, 10) : 100000;
    if (rows < 1 || rows > 100000000) {
        fprintf(stderr, "sqlite-workload: ROWS must be 1..100000000\n");
        return 2;
    }
    char path[1024];
    snprintf(path, sizeof path, "%s/bench.db", argv[1]);
    unlink(path);
    if (sqlite3_open(path, &db) != SQLITE_OK)
        fail(path);
    exec("PRAGMA journal_mode=MEMORY; PRAGMA synchronous=OFF; PRAGMA cache_size=-16384");
    exec("CREATE TABLE item(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, name TEXT NOT NULL, price REAL NOT NULL)");

    /* Inserts. */
    exec("BEGIN");
    sqlite3_stmt *insert = prepare("INSERT INTO item(k, name, price) VALUES (?1, ?2, ?3)");
    char name[32];
    for (long i = 0; i < rows; i++) {
        uint32_t k = next() % (uint32_t)(rows * 4);
        int n = snprintf(name, sizeof name, "item-%08x", next());
        sqlite3_bind_int64(insert, 1, k);
        sqlite3_bind_text(insert, 2, name, n, SQLITE_STATIC);
        sqlite3_bind_double(insert, 3, (double)(next() % 100000) / 100.0);
        if (sqlite3_step(insert) != SQLITE_DONE)
            fail("insert");
        sqlite3_reset(insert);
    }
    sqlite3_finalize(insert);
    exec("COMMIT");

    /* Index, then queries through it. */
    exec("CREATE INDEX item_k ON item(k); CREATE INDEX item_name ON item(name)");
    sqlite3_stmt *range = prepare("SELECT count(*) FROM item WHERE k BETWEEN ?1 AND ?2");
    sqlite3_stmt *point = prepare("SELECT coalesce(sum(id), 0) FROM item WHERE k = ?1");
    int64_t in_ranges = 0, point_ids = 0;
    long queries = rows / 4;
    for (long i = 0; i < queries; i++) {
        uint32_t lo = next() % (uint32_t)(rows * 4);
        sqlite3_bind_int64(range, 1, lo);
        sqlite3_bind_int64(range, 2, lo + 16);
        in_ranges += one_int(range);
        sqlite3_bind_int64(point, 1, next() % (uint32_t)(rows * 4));
        point_ids += one_int(point);
    }
    sqlite3_finalize(range);
    sqlite3_finalize(point);

    /* An aggregate over the whole table, an update and a delete. */
    sqlite3_stmt *groups = prepare("SELECT count(*) FROM (SELECT k % 1000 AS g, avg(price) FROM item GROUP BY g HAVING count(*) > 1)");
    int64_t group_count = one_int(groups);
    sqlite3_finalize(groups);
    exec("BEGIN; UPDATE item SET price = price * 1.1 WHERE k % 7 = 0; DELETE FROM item WHERE k % 11 = 0; COMMIT");
    sqlite3_stmt *rest = prepare("SELECT count(*) FROM item");
    int64_t remaining = one_int(rest);
    sqlite3_finalize(rest);
    sqlite3_stmt *total = prepare("SELECT CAST(sum(price) * 100 AS INTEGER) FROM item");
    int64_t cents = one_int(total);
    sqlite3_finalize(total);

    if (sqlite3_close(db) != SQLITE_OK)
        fail("close");
    printf("sqlite: rows %ld, in ranges %lld, point ids %lld, groups %lld, remaining %lld, cents %lld\n", rows,
           (long long)in_ranges, (long long)point_ids, (long long)group_count, (long long)remaining,
           (long long)cents);
    return 0;
}
