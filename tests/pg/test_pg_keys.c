/*
 * The keys of the PostgreSQL schema, as Citus needs them: every unique
 * index of a table includes the column it would be distributed by
 * (read from the catalog of a migrated schema, and of one upgraded from
 * the keys of migration 7).  events, snapshots and data keys go by
 * aggregate_id; commands by command_id, because a command id stays
 * unique across aggregates.  Under those keys an event id is unique per
 * aggregate: the same id twice for one aggregate is still a duplicate or
 * ES_EIDEMPOTENCY.  A command id used twice, for one aggregate or two,
 * is still refused, in a transaction and in the host's batch writer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <libpq-fe.h>

#include "core/internal.h"
#include "eventastic.h"
#include "fixtures/account.h"
#include "fixtures/helpers.h"
#include "fixtures/pg.h"
#include "store/batch_ops.h"
#include "store/store_impl.h"

static PGconn *g_sql;

static PGresult *sql(const char *query, int n, const char *const *vals)
{
    PGresult *r = PQexecParams(g_sql, query, n, NULL, vals, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        fail_msg("helper SQL failed: %s\n%s", PQresultErrorMessage(r), query);
    return r;
}

/* Several statements in one string (no parameters). */
static void sql_ok(const char *query)
{
    PGresult *r = PQexec(g_sql, query);
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        fail_msg("helper SQL failed: %s\n%s", PQresultErrorMessage(r), query);
    PQclear(r);
}

/* The first column of the first row as text ("" when NULL); caller
 * frees. */
static char *sql_text(const char *query, int n, const char *const *vals)
{
    PGresult *r = sql(query, n, vals);
    const char *v = PQntuples(r) > 0 && !PQgetisnull(r, 0, 0)
                        ? PQgetvalue(r, 0, 0)
                        : "";
    char *copy = strdup(v);
    PQclear(r);
    assert_non_null(copy);
    return copy;
}

static long long sql_int(const char *query, int n, const char *const *vals)
{
    char *s = sql_text(query, n, vals);
    long long v = atoll(s);
    free(s);
    return v;
}

/* Each table and the column it is distributed by (docs/scaling.md). */
#define DIST_COLUMNS                                                       \
    "(VALUES ('events', 'aggregate_id'), ('snapshots', 'aggregate_id'), "  \
    "('data_keys', 'aggregate_id'), ('commands', 'command_id')) "          \
    "AS d(tab, col)"
#define DISTRIBUTED "('events', 'snapshots', 'data_keys', 'commands')"

/* Unique indexes (primary keys and unique constraints have one each) in
 * schema $1 that do not include their table's distribution column: what
 * Citus refuses on a distributed table. */
static const char OFFENDERS[] =
    "SELECT string_agg(i.indexrelid::regclass::text, ' ' ORDER BY 1) "
    "FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "JOIN " DIST_COLUMNS " ON d.tab = c.relname "
    "WHERE n.nspname = $1 AND i.indisunique AND NOT EXISTS (SELECT 1 FROM "
    "pg_attribute a WHERE a.attrelid = i.indrelid AND a.attname = d.col "
    "AND a.attnum = ANY (i.indkey))";

/* Constraints that need a unique index (p, u, x) without the column:
 * the same question asked of pg_constraint. */
static const char CONSTRAINT_OFFENDERS[] =
    "SELECT count(*) FROM pg_constraint k JOIN pg_class c "
    "ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
    "JOIN " DIST_COLUMNS " ON d.tab = c.relname "
    "WHERE n.nspname = $1 AND k.contype IN ('p', 'u', 'x') AND NOT EXISTS "
    "(SELECT 1 FROM pg_attribute a WHERE a.attrelid = k.conrelid AND "
    "a.attname = d.col AND a.attnum = ANY (k.conkey))";

/* Every unique index of those tables as table(col,...), sorted. */
static const char UNIQUE_KEYS[] =
    "SELECT string_agg(k, ' ' ORDER BY k) FROM (SELECT c.relname || '(' || "
    "(SELECT string_agg(a.attname, ',' ORDER BY u.ord) FROM unnest(i.indkey) "
    "WITH ORDINALITY AS u(attnum, ord) JOIN pg_attribute a ON a.attrelid = "
    "i.indrelid AND a.attnum = u.attnum) || ')' AS k "
    "FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = $1 AND c.relname IN " DISTRIBUTED " "
    "AND i.indisunique) AS keys";

static const char EXPECTED_KEYS[] =
    "commands(command_id) data_keys(aggregate_id) "
    "events(aggregate_id,event_id) events(aggregate_id,version) "
    "snapshots(aggregate_id,snapshot_version)";

/* Readers follow (txid, position) (migration 12, docs/read-side.md):
 * one plain index on it, and none left on position alone. */
static const char ORDER_INDEXES[] =
    "SELECT (count(*) FILTER (WHERE i.indnatts = 2 AND a1.attname = "
    "'txid' AND a2.attname = 'position'))::text || ' ' || (count(*) "
    "FILTER (WHERE i.indnatts = 1 AND a1.attname = 'position'))::text "
    "FROM pg_index i JOIN pg_class c ON "
    "c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
    "JOIN pg_attribute a1 ON a1.attrelid = i.indrelid AND a1.attnum = "
    "i.indkey[0] LEFT JOIN pg_attribute a2 ON a2.attrelid = i.indrelid "
    "AND i.indnatts > 1 AND a2.attnum = i.indkey[1] WHERE n.nspname = $1 "
    "AND c.relname = 'events' AND NOT i.indisunique";

static void expect_distributable(const char *schema)
{
    const char *v[1] = {schema};
    char *bad = sql_text(OFFENDERS, 1, v);
    if (bad[0] != '\0') fail_msg("unique indexes without aggregate_id: %s",
                                 bad);
    free(bad);
    assert_int_equal(sql_int(CONSTRAINT_OFFENDERS, 1, v), 0);
    char *keys = sql_text(UNIQUE_KEYS, 1, v);
    assert_string_equal(keys, EXPECTED_KEYS);
    free(keys);
    char *idx = sql_text(ORDER_INDEXES, 1, v);
    assert_string_equal(idx, "1 0");
    free(idx);
}

static void test_pg_keys_unique_indexes_include_dist_column(void **state)
{
    (void)state;
    char schema[40], q[300];
    fixture_pg_random_name(schema, sizeof schema, "es_keys_");
    es_store *store = NULL;
    assert_int_equal(fixture_pg_open(schema, &store), 0);
    assert_int_equal(es_store_close(store), 0);
    expect_distributable(schema);

    /* The check can fail: a unique index without aggregate_id is named. */
    snprintf(q, sizeof q, "CREATE UNIQUE INDEX odd_unique ON \"%s\".events "
             "(event_id)", schema);
    sql_ok(q);
    const char *v[1] = {schema};
    char *bad = sql_text(OFFENDERS, 1, v);
    char want[80];
    snprintf(want, sizeof want, "%s.odd_unique", schema);
    assert_string_equal(bad, want);
    free(bad);
    fixture_pg_drop_schema(schema);
}

/* A schema with migration 7's keys (event_id unique across aggregates, a
 * unique index on position), with rows in it, is upgraded by migration
 * 8. */
static void test_pg_keys_upgrade_from_7(void **state)
{
    (void)state;
    char schema[40], q[900];
    fixture_pg_random_name(schema, sizeof schema, "es_up_");
    es_store *store = NULL;
    assert_int_equal(fixture_pg_open(schema, &store), 0);
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 5);
    es_error err = {0};
    assert_int_equal(account_builder_save(&b, store, NULL, &err), 0);
    assert_int_equal(es_store_close(store), 0);

    snprintf(q, sizeof q,
             "SET search_path = \"%s\";"
             "ALTER TABLE events DROP CONSTRAINT "
             "events_aggregate_id_event_id_key;"
             "ALTER TABLE events DROP COLUMN txid;"
             "DROP TABLE projections;"
             "ALTER TABLE events ADD UNIQUE (event_id);"
             "CREATE UNIQUE INDEX events_position_idx ON events (position);"
             "DELETE FROM es_migrations WHERE version IN (8, 12);"
             "RESET search_path",
             schema);
    sql_ok(q);
    const char *v[1] = {schema};
    char *bad = sql_text(OFFENDERS, 1, v);
    assert_true(strstr(bad, "events_event_id_key") != NULL);
    assert_true(strstr(bad, "events_position_idx") != NULL);
    free(bad);

    assert_int_equal(fixture_pg_open(schema, &store), 0);
    expect_distributable(schema);
    account_context *ctx = NULL;
    assert_int_equal(account_store_load(store, &b.account_id, &ctx, &err), 0);
    assert_int_equal(account_state(ctx)->balance, 5);
    account_context_free(ctx);
    assert_int_equal(es_store_close(store), 0);
    fixture_pg_drop_schema(schema);
}

static long long events_with_id(const char *schema, const es_uuid *event_id)
{
    char id[ES_UUID_STRLEN + 1], q[160];
    es_uuid_format(event_id, id);
    snprintf(q, sizeof q, "SELECT count(*) FROM \"%s\".events WHERE "
             "event_id = $1", schema);
    const char *v[1] = {id};
    return sql_int(q, 1, v);
}

/* Event ids: the same id and content twice for one aggregate is stored
 * once; with other content, ES_EIDEMPOTENCY; for another aggregate it is
 * another event. */
static void test_pg_keys_event_id_per_aggregate(void **state)
{
    (void)state;
    char schema[40];
    fixture_pg_random_name(schema, sizeof schema, "es_evid_");
    es_store *store = NULL;
    assert_int_equal(fixture_pg_open(schema, &store), 0);
    es_error err = {0};
    account_builder a, b;
    account_builder_init(&a);
    account_builder_init(&b);
    account_context *ca = NULL, *cb = NULL;
    assert_int_equal(account_builder_save(&a, store, &ca, &err), 0);
    assert_int_equal(account_builder_save(&b, store, &cb, &err), 0);

    account_event add = account_add(10);
    assert_int_equal(account_record(ca, &add, &err), 0);
    assert_int_equal(fixture_save_commit(store, account_context_raw(ca),
                                         &err),
                     0);
    /* the same event again: a duplicate, stored once */
    assert_int_equal(account_record(ca, &add, &err), 0);
    assert_int_equal(fixture_save_commit(store, account_context_raw(ca),
                                         &err),
                     0);
    assert_int_equal(account_version(ca), 1);
    assert_int_equal(events_with_id(schema, &add.event_id), 1);
    /* other content under the same id: refused */
    account_event other = add;
    other.amount = 20;
    assert_int_equal(account_record(ca, &other, &err), 0);
    assert_int_equal(fixture_save_commit(store, account_context_raw(ca),
                                         &err),
                     ES_EIDEMPOTENCY);
    assert_true(es_uuid_equal(&err.event_id, &add.event_id));
    assert_int_equal(events_with_id(schema, &add.event_id), 1);
    /* the same id for another aggregate: that aggregate's event */
    assert_int_equal(account_record(cb, &other, &err), 0);
    assert_int_equal(fixture_save_commit(store, account_context_raw(cb),
                                         &err),
                     0);
    assert_int_equal(events_with_id(schema, &add.event_id), 2);

    account_context *la = NULL, *lb = NULL;
    assert_int_equal(account_store_load(store, &a.account_id, &la, &err), 0);
    assert_int_equal(account_store_load(store, &b.account_id, &lb, &err), 0);
    assert_int_equal(account_state(la)->balance, 10);
    assert_int_equal(account_state(lb)->balance, 20);
    account_context_free(la);
    account_context_free(lb);
    account_context_free(ca);
    account_context_free(cb);
    assert_int_equal(es_store_close(store), 0);
    fixture_pg_drop_schema(schema);
}

static es__command_record record(const es_uuid *cmd, const es_uuid *agg,
                                 const char *payload, uint64_t version)
{
    es__command_record r;
    memset(&r, 0, sizeof r);
    r.command_id = *cmd;
    r.aggregate_id = *agg;
    r.kind = 7;
    r.payload = (const uint8_t *)payload;
    r.len = strlen(payload);
    r.first_version = version;
    r.event_count = 0;
    r.version = version;
    return r;
}

/* Command ids in a transaction: an id is taken once, whatever the
 * aggregate, and the lookup by command id alone finds its record. */
static void test_pg_keys_command_id_across_aggregates(void **state)
{
    (void)state;
    char schema[40];
    fixture_pg_random_name(schema, sizeof schema, "es_cmd_");
    es_store *store = NULL;
    assert_int_equal(fixture_pg_open(schema, &store), 0);
    es_uuid c1, a1, a2;
    es_uuid_v7(&c1);
    es_uuid_v7(&a1);
    es_uuid_v7(&a2);
    es__command_record recs[2] = {record(&c1, &a1, "one", 0),
                                  record(&c1, &a2, "two", 0)};
    bool ins[2];
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    assert_int_equal(es__txn_insert_commands(txn, &recs[0], 1, ins, &err), 0);
    assert_true(ins[0]);
    assert_int_equal(es_txn_commit(txn, &err), 0);

    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    assert_int_equal(es__txn_insert_commands(txn, recs, 2, ins, &err), 0);
    assert_false(ins[0]); /* the same aggregate: taken */
    assert_false(ins[1]); /* another aggregate: taken too */
    es__command_record *got = NULL;
    assert_int_equal(es__txn_get_command(txn, &c1, &got, &err), 0);
    assert_true(es_uuid_equal(&got->aggregate_id, &a1));
    assert_true(es__command_matches(got, 7, "one", 3));
    assert_false(es__command_matches(got, 7, "two", 3));
    es__free(got);
    es_txn_rollback(txn);
    assert_int_equal(es_store_close(store), 0);
    fixture_pg_drop_schema(schema);
}

typedef struct batch_row {
    es__commit_item item;
    es_event ev;
    uint8_t data[8];
} batch_row;

static void batch_row_init(batch_row *r, const es_uuid *agg,
                           uint64_t version, const es_uuid *command_id)
{
    memset(r, 0, sizeof *r);
    es_uuid_v7(&r->ev.id);
    r->ev.version = version;
    r->ev.kind = 1;
    r->ev.data = r->data;
    r->ev.len = sizeof r->data;
    r->item.type_name = "keys";
    r->item.aggregate_id = *agg;
    r->item.group = r;
    r->item.events = &r->ev;
    r->item.n_events = 1;
    r->item.status = ES__COMMIT_PENDING;
    es__command_record rec = {*command_id, *agg, 1, r->data, 8, version, 1,
                              version, false, false, NULL, false};
    r->item.record = rec;
}

/* The host's batch writer under the new keys: one event id for two
 * aggregates commits for each; a command id taken (for its own aggregate
 * or another) fails that item with ES_EIDEMPOTENCY and the others in its
 * batch commit. */
static void test_pg_keys_batch_ids(void **state)
{
    (void)state;
    char schema[40];
    fixture_pg_random_name(schema, sizeof schema, "es_batch_");
    es_store *store = NULL;
    assert_int_equal(fixture_pg_open(schema, &store), 0);
    assert_true(es__store_has_batch_writer(store));
    es_uuid agg[5], cmd[5];
    for (int i = 0; i < 5; i++) {
        es_uuid_v7(&agg[i]);
        es_uuid_v7(&cmd[i]);
    }
    void *slot = NULL;

    static batch_row rows[5];
    batch_row_init(&rows[0], &agg[0], 0, &cmd[0]);
    batch_row_init(&rows[1], &agg[1], 0, &cmd[1]);
    rows[1].ev.id = rows[0].ev.id; /* one event id, two aggregates */
    es__commit_item *items[3] = {&rows[0].item, &rows[1].item};
    assert_int_equal(es__store_write_batch(store, &slot, items, 2), 1);
    assert_int_equal(rows[0].item.status, 0);
    assert_int_equal(rows[1].item.status, 0);

    batch_row_init(&rows[2], &agg[0], 1, &cmd[0]); /* taken, same agg */
    batch_row_init(&rows[3], &agg[2], 0, &cmd[1]); /* taken, other agg */
    batch_row_init(&rows[4], &agg[3], 0, &cmd[4]); /* new */
    items[0] = &rows[2].item;
    items[1] = &rows[3].item;
    items[2] = &rows[4].item;
    assert_true(es__store_write_batch(store, &slot, items, 3) >= 1);
    assert_int_equal(rows[2].item.status, ES_EIDEMPOTENCY);
    assert_int_equal(rows[3].item.status, ES_EIDEMPOTENCY);
    assert_int_equal(rows[4].item.status, 0);
    es__store_background_close(store, &slot);

    char q[200];
    snprintf(q, sizeof q, "SELECT count(*) FROM \"%s\".events", schema);
    assert_int_equal(sql_int(q, 0, NULL), 3);
    assert_int_equal(events_with_id(schema, &rows[0].ev.id), 2);
    snprintf(q, sizeof q, "SELECT count(*) FROM \"%s\".commands", schema);
    assert_int_equal(sql_int(q, 0, NULL), 3);
    assert_int_equal(es_store_close(store), 0);
    fixture_pg_drop_schema(schema);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_keys_unique_indexes_include_dist_column),
        cmocka_unit_test(test_pg_keys_upgrade_from_7),
        cmocka_unit_test(test_pg_keys_event_id_per_aggregate),
        cmocka_unit_test(test_pg_keys_command_id_across_aggregates),
        cmocka_unit_test(test_pg_keys_batch_ids),
    };
    static const fixture_pg_group group = {.sql = &g_sql};
    return FIXTURE_PG_RUN("test_pg_keys", tests, &group);
}
