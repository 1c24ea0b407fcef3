/*
 * sqlite-kv: a key-value server whose rows live in an in-memory SQLite
 * database. It is built, unchanged, against several consecutive releases
 * of SQLite's amalgamation (tests/releases.rs), and each running build is
 * updated live to the next: the server's own code is the same in every
 * build, SQLite's changes from release to release.
 *
 * The database and three prepared statements are kept in globals, as a
 * real server keeps them, so every update carries SQLite's heap (the
 * connection, its page cache, the statements' virtual machines) to the new
 * release's code. sqlite3.h declares those types without defining them:
 * the planner learns their layouts from SQLite's own globals, whose types
 * reach them (sqlite3SharedCacheList, a list of connections' shared
 * b-trees, reaches `struct sqlite3` and from it most of SQLite's structs).
 *
 * The protocol is kv-protocol.h's; VERSION answers sqlite3_libversion().
 * A SQLite error replies `ERROR sqlite: <message>`.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sqlite3.h"
#include "kv-protocol.h"

sqlite3 *db;
sqlite3_stmt *put_stmt;
sqlite3_stmt *get_stmt;
sqlite3_stmt *count_stmt;

static void reply_text(int fd, const char *head, const char *text)
{
    reply(fd, head, text, strlen(text));
}

static void reply_error(int fd)
{
    reply_text(fd, "ERROR sqlite: ", sqlite3_errmsg(db));
}

static void set_value(int fd, const char *key, const char *value)
{
    sqlite3_reset(put_stmt);
    sqlite3_bind_text(put_stmt, 1, key, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(put_stmt, 2, value, -1, SQLITE_TRANSIENT);
    if (sqlite3_step(put_stmt) == SQLITE_DONE)
        reply(fd, "OK", NULL, 0);
    else
        reply_error(fd);
    sqlite3_reset(put_stmt);
}

static void get_value(int fd, const char *key)
{
    sqlite3_reset(get_stmt);
    sqlite3_bind_text(get_stmt, 1, key, -1, SQLITE_TRANSIENT);
    int rc = sqlite3_step(get_stmt);
    if (rc == SQLITE_ROW)
        reply_text(fd, "VALUE ", (const char *)sqlite3_column_text(get_stmt, 0));
    else if (rc == SQLITE_DONE)
        reply(fd, "NOT_FOUND", NULL, 0);
    else
        reply_error(fd);
    sqlite3_reset(get_stmt);
}

static void count_keys(int fd)
{
    char out[32];
    sqlite3_reset(count_stmt);
    if (sqlite3_step(count_stmt) != SQLITE_ROW) {
        reply_error(fd);
    } else {
        snprintf(out, sizeof out, "%lld", (long long)sqlite3_column_int64(count_stmt, 0));
        reply_text(fd, "COUNT ", out);
    }
    sqlite3_reset(count_stmt);
}

static const char *release(void)
{
    return sqlite3_libversion();
}

static int other_command(int fd, const char *command, const char *arg)
{
    (void)fd, (void)command, (void)arg;
    return 0;
}

static void prepare(const char *sql, sqlite3_stmt **stmt)
{
    if (sqlite3_prepare_v2(db, sql, -1, stmt, NULL) != SQLITE_OK) {
        fprintf(stderr, "sqlite-kv: %s: %s\n", sql, sqlite3_errmsg(db));
        exit(1);
    }
}

static void open_database(void)
{
    if (sqlite3_open(":memory:", &db) != SQLITE_OK) {
        fprintf(stderr, "sqlite-kv: cannot open the database\n");
        exit(1);
    }
    char *err = NULL;
    if (sqlite3_exec(db, "CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT NOT NULL)", NULL, NULL, &err) != SQLITE_OK) {
        fprintf(stderr, "sqlite-kv: %s\n", err);
        exit(1);
    }
    prepare("INSERT OR REPLACE INTO kv (k, v) VALUES (?1, ?2)", &put_stmt);
    prepare("SELECT v FROM kv WHERE k = ?1", &get_stmt);
    prepare("SELECT count(*) FROM kv", &count_stmt);
}

int main(void)
{
    int listener = upstare_listener_fd(0);
    if (listener < 0) {
        fprintf(stderr, "sqlite-kv: no preopened TCP listener (start the host with --tcplisten ADDR)\n");
        return 1;
    }
    open_database();
    printf("sqlite-kv: SQLite %s, listening on fd %d\n", sqlite3_libversion(), listener);
    fflush(stdout);

    return serve("sqlite-kv", listener);
}
