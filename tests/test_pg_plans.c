/*
 * Every statement on a command's path is an index probe, whatever the
 * table's size, its statistics or the plan cache mode (promise 10).
 *
 * The lanes prepare their statements once per connection, and after five
 * executions PostgreSQL may keep a generic plan, chosen without the
 * parameters' values, until the next ANALYZE.  So each statement of the
 * store (es__pg_statement) is prepared here under plan_cache_mode =
 * force_generic_plan and EXPLAINed: on empty tables, on tables holding a
 * million events (and commands, snapshots, outbox messages and data keys
 * in proportion) before ANALYZE, as a fresh deployment that grew fast
 * sees them, and after it.  No plan may scan one of those tables.  The
 * test reads the plans; it times nothing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <libpq-fe.h>

#include "eventastic.h"
#include "fixtures/pg.h"
#include "store/pg/statements.h"

#define FILL_EVENTS 1000000

static const char *const tables[] = {"events", "commands", "snapshots",
                                     "outbox", "data_keys"};

static char schema[40];
static es_store *store;
static PGconn *conn;

static bool exec_ok(const char *sql)
{
    PGresult *r = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(r);
    bool ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
    if (!ok) fprintf(stderr, "# %s: %s", sql, PQerrorMessage(conn));
    PQclear(r);
    return ok;
}

/* The plan of one statement as text (the caller frees it), or NULL. */
static char *generic_plan(const char *sql)
{
    PGresult *r = PQprepare(conn, "plan_probe", sql, 0, NULL);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (!ok) fprintf(stderr, "# prepare: %s", PQerrorMessage(conn));
    PQclear(r);
    if (!ok) return NULL;
    r = PQdescribePrepared(conn, "plan_probe");
    int n = PQresultStatus(r) == PGRES_COMMAND_OK ? PQnparams(r) : -1;
    PQclear(r);
    char *plan = NULL;
    if (n >= 0) {
        /* NULL for every parameter: a generic plan does not look at them */
        char explain[512];
        int len = snprintf(explain, sizeof explain,
                           "EXPLAIN EXECUTE plan_probe");
        for (int i = 0; i < n; i++)
            len += snprintf(explain + len, sizeof explain - (size_t)len,
                            "%sNULL", i == 0 ? "(" : ", ");
        if (n > 0) snprintf(explain + len, sizeof explain - (size_t)len, ")");
        r = PQexec(conn, explain);
        if (PQresultStatus(r) == PGRES_TUPLES_OK) {
            size_t cap = 1;
            for (int i = 0; i < PQntuples(r); i++)
                cap += strlen(PQgetvalue(r, i, 0)) + 1;
            plan = calloc(1, cap);
            for (int i = 0; plan && i < PQntuples(r); i++) {
                strcat(plan, PQgetvalue(r, i, 0));
                strcat(plan, "\n");
            }
        } else {
            fprintf(stderr, "# explain: %s", PQerrorMessage(conn));
        }
        PQclear(r);
    }
    exec_ok("DEALLOCATE plan_probe");
    return plan;
}

/* The table a plan scans sequentially, or NULL. */
static const char *seq_scanned(const char *plan)
{
    for (const char *p = strstr(plan, "Seq Scan on "); p;
         p = strstr(p + 1, "Seq Scan on ")) {
        const char *rel = p + strlen("Seq Scan on ");
        for (size_t i = 0; i < sizeof tables / sizeof tables[0]; i++) {
            size_t n = strlen(tables[i]);
            if (strncmp(rel, tables[i], n) == 0 &&
                (rel[n] == ' ' || rel[n] == '\n'))
                return tables[i];
        }
    }
    return NULL;
}

/* Returns the number of command-path statements whose plan scans. */
static int check_plans(const char *when, int *checked)
{
    int bad = 0;
    *checked = 0;
    const char *name = NULL;
    bool admin = false;
    const char *sql;
    for (size_t i = 0; (sql = es__pg_statement(store, i, &name, &admin));
         i++) {
        if (admin) continue;
        char *plan = generic_plan(sql);
        if (plan == NULL) {
            printf("# %s: '%s' could not be explained\n", when, name);
            bad++;
            continue;
        }
        (*checked)++;
        const char *t = seq_scanned(plan);
        if (t != NULL) {
            printf("# %s: '%s' scans %s:\n%s", when, name, t, plan);
            bad++;
        }
        free(plan);
    }
    printf("# %s: %d statements read, %d scan a table\n", when, *checked,
           bad);
    return bad;
}

/* Events from .. to - 1 (ten per aggregate); a command id for every
 * tenth event; a snapshot, a data key and an outbox message (most of them
 * done) for every tenth aggregate. */
static bool fill(int from, int to)
{
    char sql[2048];
    snprintf(sql, sizeof sql,
             "SET search_path = \"%s\";"
             "INSERT INTO events (aggregate_type, aggregate_id, version, "
             "event_id, kind, payload) SELECT 'fill', md5((i / 10)::text)::"
             "uuid, i %% 10, md5('e' || i)::uuid, 1, '\\x00' FROM "
             "generate_series(%d, %d) AS i;"
             "INSERT INTO commands (command_id, aggregate_id, kind, digest, "
             "first_version, event_count, version) SELECT md5('c' || i)::"
             "uuid, md5((i / 10)::text)::uuid, 1, '\\x00', i %% 10, 1, "
             "i %% 10 FROM generate_series(%d, %d, 10) AS i;"
             "INSERT INTO snapshots (aggregate_id, snapshot_version, version, "
             "payload) SELECT md5(i::text)::uuid, 1, 9, '\\x00' FROM "
             "generate_series(%d, %d, 100) AS i;"
             "INSERT INTO data_keys (aggregate_id, key_id, wrapped) SELECT "
             "md5(i::text)::uuid, 'k', '\\x00' FROM generate_series(%d, %d, "
             "100) AS i;"
             "INSERT INTO outbox (id, aggregate_id, event_id, aggregate_type, "
             "kind, payload, status) SELECT md5('o' || i)::uuid, md5(i::text)"
             "::uuid, md5('e' || i)::uuid, 'fill', 1, '\\x00', CASE WHEN i "
             "%% 1000 = 0 THEN 'pending' ELSE 'done' END FROM "
             "generate_series(%d, %d, 100) AS i;"
             "RESET search_path",
             schema, from, to - 1, from, to - 1, from / 10, to / 10 - 1,
             from / 10, to / 10 - 1, from, to - 1);
    return exec_ok(sql);
}

static bool analyze(void)
{
    char sql[512];
    snprintf(sql, sizeof sql,
             "ANALYZE \"%s\".events, \"%s\".commands, \"%s\".snapshots, "
             "\"%s\".outbox, \"%s\".data_keys",
             schema, schema, schema, schema, schema);
    return exec_ok(sql);
}

static void test_pg_plans_command_path_never_scans(void **state)
{
    (void)state;
    assert_true(exec_ok("SET plan_cache_mode = force_generic_plan"));
    assert_true(exec_ok(ES__PG_SESSION)); /* as the store's connections */
    int checked = 0;
    int bad = check_plans("empty tables", &checked);
    /* the store's statements, not a list of the test's: most of them */
    assert_true(checked >= 20);
    /* a small store, analyzed: where a scan is cheapest, and where a
     * generic plan chosen then would be kept while the tables grow */
    assert_true(fill(0, 1000));
    assert_true(analyze());
    bad += check_plans("a thousand events, analyzed", &checked);
    assert_true(fill(1000, FILL_EVENTS));
    bad += check_plans("a million events, not analyzed", &checked);
    assert_true(analyze());
    bad += check_plans("a million events, analyzed", &checked);
    assert_int_equal(bad, 0);
}

/* The check can fail: a statement that scans is seen as one. */
static void test_pg_plans_a_scan_is_seen(void **state)
{
    (void)state;
    assert_true(exec_ok("SET plan_cache_mode = force_generic_plan"));
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM \"%s\".events WHERE kind = $1", schema);
    char *plan = generic_plan(sql);
    assert_non_null(plan);
    assert_non_null(seq_scanned(plan));
    free(plan);
}

static int setup(void **state)
{
    (void)state;
    fixture_pg_random_name(schema, sizeof schema, "plans_");
    if (fixture_pg_open(schema, &store) != 0) return -1;
    conn = fixture_pg_connect();
    return conn ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    PQfinish(conn);
    es_store_close(store);
    fixture_pg_drop_schema(schema);
    return 0;
}

int main(void)
{
    if (getenv("DATABASE_URL") == NULL) {
        printf("test_pg_plans: DATABASE_URL is not set (tests/run.py sets "
               "it)\n");
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_plans_a_scan_is_seen),
        cmocka_unit_test(test_pg_plans_command_path_never_scans),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
