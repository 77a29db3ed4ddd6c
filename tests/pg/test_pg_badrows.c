/*
 * Corrupted rows in the PostgreSQL store (issue 8, bad input on the
 * library side): an event row of an unknown kind or with truncated bytes
 * makes its aggregate's load fail with ES_EDECODE while other aggregates
 * keep loading; a snapshot of a future snapshot version, or one that
 * claims a version beyond the end of its stream, never changes the loaded
 * state (DESIGN.md, promise 6): the stream is replayed.
 *
 * What exists elsewhere is not repeated: garbage snapshot payloads and
 * older snapshot versions (test_pg_store), ciphertext under a wrong key
 * and tampered ciphertext (test_pg_encryption).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <libpq-fe.h>

#include "eventastic.h"
#include "fixtures/account.h"
#include "fixtures/helpers.h"
#include "fixtures/pg.h"

static es_store *g_store;
static PGconn *g_sql;

static void sql_id(const char *query, const es_uuid *id)
{
    char text[ES_UUID_STRLEN + 1];
    const char *vals[1] = {es_uuid_format(id, text)};
    PGresult *r = PQexecParams(g_sql, query, 1, NULL, vals, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        fail_msg("helper SQL failed: %s\n%s", PQresultErrorMessage(r), query);
    PQclear(r);
}

/* count(*) and max(version) of an aggregate's events, as "n/v". */
static void events_of(const es_uuid *id, char *out, size_t cap)
{
    char text[ES_UUID_STRLEN + 1];
    const char *vals[1] = {es_uuid_format(id, text)};
    PGresult *r = PQexecParams(g_sql,
                               "SELECT count(*) || '/' || "
                               "coalesce(max(version), -1) FROM events "
                               "WHERE aggregate_id = $1",
                               1, NULL, vals, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        snprintf(out, cap, "?");
        char msg[256];
        snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
        PQclear(r);
        fail_msg("helper SQL failed: %s", msg);
    }
    snprintf(out, cap, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
}

/* The host's decide: every command adds 1. */
static int add_one(void *user, const void *state, const es_command *cmd,
                   es_emitter *em)
{
    (void)user;
    (void)state;
    (void)cmd;
    account_event e = account_add(1);
    int rc = es_emit(em, &e);
    account_event_free(&e);
    return rc;
}

/* A command for the aggregate through a host of its own; its status. */
static int host_write(const es_uuid *id)
{
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    assert_int_equal(es_host_config_new(&cfg, NULL), 0);
    assert_int_equal(es_host_config_add_type(cfg, &account_type, add_one,
                                             NULL, NULL),
                     0);
    assert_int_equal(es_host_open(cfg, g_store, &host, NULL), 0);
    es_host_config_free(cfg);
    es_command c = {{{0}}, 1, NULL, 0};
    es_uuid_v7(&c.id);
    int rc = es_host_call(host, &account_type, id, &c, NULL, NULL);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    return rc;
}

/* A saved account: opened, +100, -30 (versions 0 to 2), balance 70. */
static es_uuid saved_account(void)
{
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_builder_with_remove(&b, 30);
    es_error err = {0};
    int rc = account_builder_save(&b, g_store, NULL, &err);
    if (rc != 0) fail_msg("save: %s %s", es_status_name(rc), err.message);
    return b.account_id;
}

static int load(const es_uuid *id, int64_t *balance, uint64_t *version)
{
    account_context *ctx = NULL;
    es_error err = {0};
    int rc = account_store_load(g_store, id, &ctx, &err);
    if (rc == 0) {
        *balance = account_state(ctx)->balance;
        *version = es_context_version(account_context_raw(ctx));
        account_context_free(ctx);
    }
    return rc;
}

static void assert_intact(const es_uuid *id)
{
    int64_t balance = -1;
    uint64_t version = 0;
    assert_int_equal(load(id, &balance, &version), 0);
    assert_int_equal(balance, 70);
    assert_int_equal(version, 2);
}

/* A snapshot row written by hand with the account codec. */
static void put_snapshot(const es_uuid *id, uint64_t sv, uint64_t version,
                         int64_t balance)
{
    assert_int_equal(
        fixture_pg_put_account_snapshot(g_sql, id, sv, version, balance), 0);
}

static void corrupt_and_check(const char *update)
{
    es_uuid bad = saved_account();
    es_uuid good = saved_account();
    /* Without its snapshot, the load must read the corrupted row. */
    sql_id("DELETE FROM snapshots WHERE aggregate_id = $1", &bad);
    sql_id(update, &bad);
    int64_t balance = 0;
    uint64_t version = 0;
    assert_int_equal(load(&bad, &balance, &version), ES_EDECODE);
    assert_intact(&good);
    /* Writing to it is refused too, and changes nothing: the library
     * gives no context to record on, and a command through the host fails
     * with the load's status.  (A context loaded before the row went bad
     * could still append: a save does not read the stream back, so that
     * its cost stays flat; the next load fails all the same.) */
    char before[64], after[64];
    events_of(&bad, before, sizeof before);
    account_context *ctx = NULL;
    es_error err = {0};
    assert_int_equal(account_store_load(g_store, &bad, &ctx, &err),
                     ES_EDECODE);
    assert_null(ctx);
    assert_int_equal(host_write(&bad), ES_EDECODE);
    events_of(&bad, after, sizeof after);
    assert_string_equal(after, before);
    assert_string_equal(after, "3/2");
    assert_int_equal(load(&bad, &balance, &version), ES_EDECODE);
    assert_intact(&good);
    /* the same write to a good aggregate goes in */
    assert_int_equal(host_write(&good), 0);
    events_of(&good, after, sizeof after);
    assert_string_equal(after, "4/3");
}

static void test_pg_badrows_unknown_event_kind(void **state)
{
    (void)state;
    corrupt_and_check("UPDATE events SET kind = 999 WHERE aggregate_id = $1 "
                      "AND version = 1");
}

static void test_pg_badrows_negative_event_kind(void **state)
{
    (void)state;
    corrupt_and_check("UPDATE events SET kind = -2147483648 WHERE "
                      "aggregate_id = $1 AND version = 2");
}

static void test_pg_badrows_truncated_event(void **state)
{
    (void)state;
    corrupt_and_check("UPDATE events SET payload = substring(payload from 1 "
                      "for 3) WHERE aggregate_id = $1 AND version = 1");
}

static void test_pg_badrows_empty_event(void **state)
{
    (void)state;
    corrupt_and_check("UPDATE events SET payload = ''::bytea WHERE "
                      "aggregate_id = $1 AND version = 0");
}

static void test_pg_badrows_event_with_trailing_bytes(void **state)
{
    (void)state;
    corrupt_and_check("UPDATE events SET payload = payload || '\\xdeadbeef'"
                      "::bytea WHERE aggregate_id = $1 AND version = 2");
}

static void test_pg_badrows_future_snapshot_version(void **state)
{
    (void)state;
    es_uuid id = saved_account();
    sql_id("DELETE FROM snapshots WHERE aggregate_id = $1", &id);
    put_snapshot(&id, ACCOUNT_SNAPSHOT_VERSION + 1, 2, 999);
    put_snapshot(&id, UINT32_MAX, 2, 998);
    assert_intact(&id);
}

static void test_pg_badrows_snapshot_beyond_the_stream(void **state)
{
    (void)state;
    es_uuid id = saved_account();
    put_snapshot(&id, ACCOUNT_SNAPSHOT_VERSION, 50, 999);
    assert_intact(&id);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_badrows_unknown_event_kind),
        cmocka_unit_test(test_pg_badrows_negative_event_kind),
        cmocka_unit_test(test_pg_badrows_truncated_event),
        cmocka_unit_test(test_pg_badrows_empty_event),
        cmocka_unit_test(test_pg_badrows_event_with_trailing_bytes),
        cmocka_unit_test(test_pg_badrows_future_snapshot_version),
        cmocka_unit_test(test_pg_badrows_snapshot_beyond_the_stream),
    };
    static const fixture_pg_group group = {.store = &g_store, .sql = &g_sql};
    return FIXTURE_PG_RUN("test_pg_badrows", tests, &group);
}
