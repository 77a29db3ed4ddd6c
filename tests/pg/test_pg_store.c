/*
 * The PostgreSQL store against a real server (DATABASE_URL): the cases of
 * the reference's postgres.rs, snapshots.rs, validation.rs, side_effect.rs
 * and multi_aggregate.rs, then what the reference never tested:
 * concurrency, failed saves, migrations, names, connection failures.
 *
 * Every test uses fresh aggregate ids (and fresh schemas where it changes
 * the schema), so tests do not see each other's rows.  Helper SQL runs on
 * a connection of the test's own (libpq directly).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <libpq-fe.h>
#include <pthread.h>

#include "eventastic.h"
#include "fixtures/account.h"
#include "fixtures/helpers.h"
#include "fixtures/ids.h"
#include "fixtures/pg.h"

static es_store *g_store;
static PGconn *g_sql;

/* ---- helper SQL (text parameters) ---- */

static PGresult *sql(const char *query, int n, const char *const *vals)
{
    PGresult *r = PQexecParams(g_sql, query, n, NULL, vals, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        fail_msg("helper SQL failed: %s\n%s", PQresultErrorMessage(r), query);
    return r;
}

static void sql_ok(const char *query, int n, const char *const *vals)
{
    PQclear(sql(query, n, vals));
}

static long long sql_int(const char *query, int n, const char *const *vals)
{
    PGresult *r = sql(query, n, vals);
    long long v = -1;
    if (PQntuples(r) > 0 && !PQgetisnull(r, 0, 0))
        v = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

typedef struct idtext {
    char s[ES_UUID_STRLEN + 1];
} idtext;

static idtext txt(const es_uuid *id)
{
    idtext t;
    es_uuid_format(id, t.s);
    return t;
}

/* ---- account helpers ---- */

static account_context *saved_account(account_builder *b)
{
    account_context *ctx = NULL;
    es_error err = {0};
    int rc = account_builder_save(b, g_store, &ctx, &err);
    if (rc != 0) fail_msg("save: %s %s", es_status_name(rc), err.message);
    return ctx;
}

static int load_account(const es_uuid *id, account_context **out)
{
    es_error err = {0};
    return account_store_load(g_store, id, out, &err);
}

static int64_t balance_of(const es_uuid *id)
{
    account_context *ctx = NULL;
    int rc = load_account(id, &ctx);
    if (rc != 0) fail_msg("load: %s", es_status_name(rc));
    int64_t b = account_state(ctx)->balance;
    account_context_free(ctx);
    return b;
}

static int save_commit(es_context *ctx, es_error *err)
{
    return fixture_save_commit(g_store, ctx, err);
}

static es_context *raw(account_context *ctx)
{
    return account_context_raw(ctx);
}

/* The stored snapshot's balance (-1 when there is none). */
static int64_t snapshot_balance(const es_uuid *id, uint64_t sv)
{
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    es_snapshot *snap = NULL;
    int rc = es_txn_get_snapshot(txn, id, sv, &snap, &err);
    es_txn_rollback(txn);
    if (rc == ES_ENOTFOUND) return -1;
    assert_int_equal(rc, 0);
    account state;
    memset(&state, 0, sizeof state);
    assert_int_equal(account_type.state_decode(snap->data, snap->len, &state,
                                               &err),
                     0);
    es_free(snap);
    int64_t b = state.balance;
    account_type.state_free(&state);
    return b;
}

static long long snapshot_count(const es_uuid *id)
{
    idtext a = txt(id);
    const char *v[1] = {a.s};
    return sql_int("SELECT count(*) FROM snapshots WHERE aggregate_id = $1",
                   1, v);
}

/* A snapshot row written by hand, as the reference's helpers do. */
static void insert_snapshot(const es_uuid *id, uint64_t sv, uint64_t version,
                            int64_t balance)
{
    assert_int_equal(
        fixture_pg_put_account_snapshot(g_sql, id, sv, version, balance), 0);
}

/* ==== postgres.rs ==== */

static void test_pg_store_saved_and_loaded(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_context *ctx = saved_account(&b);
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    account_context *loaded = NULL;
    assert_int_equal(account_load(txn, &b.account_id, &loaded, &err), 0);
    es_txn_rollback(txn);
    assert_int_equal(account_state(loaded)->balance, 100);
    assert_int_equal(account_state(ctx)->balance, 100);
    assert_string_equal(account_state(loaded)->email, ACCOUNT_DEFAULT_EMAIL);
    assert_true(es_uuid_equal(&account_state(loaded)->account_id,
                              &b.account_id));
    assert_int_equal(account_version(loaded), 1);
    account_context_free(loaded);
    account_context_free(ctx);
}

static void test_pg_store_not_saved_without_events(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 10);
    account_context *ctx = saved_account(&b);
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    const char *q = "SELECT (SELECT count(*) FROM events WHERE aggregate_id "
                    "= $1) * 1000000 + (SELECT count(*) FROM snapshots WHERE "
                    "aggregate_id = $1)";
    PGresult *t0 = sql("SELECT max(created_at)::text FROM events WHERE "
                       "aggregate_id = $1", 1, v);
    char before[64];
    snprintf(before, sizeof before, "%s", PQgetvalue(t0, 0, 0));
    PQclear(t0);
    long long rows = sql_int(q, 1, v);
    es_error err = {0};
    assert_int_equal(save_commit(raw(ctx), &err), 0);
    assert_int_equal(sql_int(q, 1, v), rows);
    PGresult *t1 = sql("SELECT max(created_at)::text FROM events WHERE "
                       "aggregate_id = $1", 1, v);
    assert_string_equal(PQgetvalue(t1, 0, 0), before);
    PQclear(t1);
    account_context_free(ctx);
}

static void test_pg_store_rollback_discards_changes(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 50);
    account_context *ctx = NULL;
    es_error err = {0};
    assert_int_equal(account_builder_build(&b, &ctx, &err), 0);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    assert_int_equal(account_save(txn, ctx, &err), 0);
    es_txn_rollback(txn);
    account_context *loaded = NULL;
    assert_int_equal(load_account(&b.account_id, &loaded), ES_ENOTFOUND);
    assert_int_equal(fixture_side_effect_count(g_store, &b.account_id), 0);
    account_context_free(ctx);
}

static void test_pg_store_isolates_until_commit(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 50);
    account_context *ctx = NULL;
    es_error err = {0};
    assert_int_equal(account_builder_build(&b, &ctx, &err), 0);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    assert_int_equal(account_save(txn, ctx, &err), 0);
    account_context *other = NULL;
    assert_int_equal(load_account(&b.account_id, &other), ES_ENOTFOUND);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    assert_int_equal(balance_of(&b.account_id), 50);
    account_context_free(ctx);
}

static void test_pg_store_invalid_data_handled(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 30);
    account_context *ctx = saved_account(&b);
    account_event open;
    assert_int_equal(account_open(&open, &b.account_id, "x@example.com", 5),
                     0);
    es_error err = {0};
    assert_int_equal(account_record(ctx, &open, &err), ES_EAPPLY);
    account_event_free(&open);
    assert_int_equal(account_version(ctx), 1);
    assert_int_equal(account_state(ctx)->balance, 30);
    assert_int_equal(es_context_uncommitted_count(raw(ctx)), 0);
    assert_int_equal(save_commit(raw(ctx), &err), 0);
    assert_int_equal(balance_of(&b.account_id), 30);
    account_context_free(ctx);
}

static void test_pg_store_multiple_operations_in_one_txn(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    b.starting_balance = 100;
    account_context *ctx = saved_account(&b);
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    account_event add = account_add(50), rem = account_remove(25);
    assert_int_equal(account_record(ctx, &add, &err), 0);
    assert_int_equal(account_save(txn, ctx, &err), 0);
    assert_int_equal(account_record(ctx, &rem, &err), 0);
    assert_int_equal(account_save(txn, ctx, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    assert_int_equal(balance_of(&b.account_id), 125);
    fixture_stream s;
    assert_int_equal(fixture_stream_read_store(g_store, &b.account_id, &s,
                                               &err),
                     0);
    assert_int_equal(s.count, 3);
    assert_true(fixture_stream_gap_free(&s));
    fixture_stream_free(&s);
    account_context_free(ctx);
}

static void test_pg_store_multiple_aggregates_in_one_txn(void **state)
{
    (void)state;
    account_builder b1, b2;
    account_builder_init(&b1);
    account_builder_init(&b2);
    account_context *c1 = saved_account(&b1), *c2 = saved_account(&b2);
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    account_event a1 = account_add(11), a2 = account_add(22);
    assert_int_equal(account_record(c1, &a1, &err), 0);
    assert_int_equal(account_record(c2, &a2, &err), 0);
    assert_int_equal(account_save(txn, c1, &err), 0);
    assert_int_equal(account_save(txn, c2, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    assert_int_equal(balance_of(&b1.account_id), 11);
    assert_int_equal(balance_of(&b2.account_id), 22);
    account_context_free(c1);
    account_context_free(c2);
}

static void test_pg_store_error_handling_and_recovery(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    b.starting_balance = 200;
    account_context *ctx = saved_account(&b);
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    account_event add = account_add(10);
    assert_int_equal(account_record(ctx, &add, &err), 0);
    assert_int_equal(account_save(txn, ctx, &err), 0);
    es_txn_rollback(txn);
    account_context_free(ctx);
    assert_int_equal(balance_of(&b.account_id), 200);

    ctx = NULL;
    assert_int_equal(load_account(&b.account_id, &ctx), 0);
    account_event add75 = account_add(75);
    assert_int_equal(account_record(ctx, &add75, &err), 0);
    assert_int_equal(save_commit(raw(ctx), &err), 0);
    assert_int_equal(balance_of(&b.account_id), 275);
    account_context_free(ctx);
}

static void test_pg_store_load_without_txn(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_builder_with_remove(&b, 20);
    account_context *ctx = saved_account(&b);
    account_context *plain = NULL, *in_txn = NULL;
    assert_int_equal(load_account(&b.account_id, &plain), 0);
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    assert_int_equal(account_load(txn, &b.account_id, &in_txn, &err), 0);
    es_txn_rollback(txn);
    assert_int_equal(account_state(plain)->balance, 80);
    assert_int_equal(account_state(in_txn)->balance, 80);
    assert_int_equal(account_version(plain), account_version(in_txn));
    account_context_free(plain);
    account_context_free(in_txn);
    account_context_free(ctx);
}

/* ==== snapshots.rs ==== */

static void test_pg_store_snapshot_saved_automatically(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_context *ctx = saved_account(&b);
    assert_int_equal(snapshot_balance(&b.account_id,
                                      ACCOUNT_SNAPSHOT_VERSION),
                     100);
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    assert_int_equal(sql_int("SELECT version FROM snapshots WHERE "
                             "aggregate_id = $1", 1, v),
                     1);
    account_context_free(ctx);
}

static void test_pg_store_rebuilt_if_snapshot_missing(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_builder_with_remove(&b, 30);
    account_context *ctx = saved_account(&b);
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    sql_ok("DELETE FROM snapshots WHERE aggregate_id = $1", 1, v);
    assert_int_equal(balance_of(&b.account_id), 70);
    assert_int_equal(snapshot_count(&b.account_id), 0); /* load never writes */
    account_context_free(ctx);
}

static void test_pg_store_snapshot_saved_with_new_event(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_context *ctx = saved_account(&b);
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    sql_ok("DELETE FROM snapshots WHERE aggregate_id = $1", 1, v);
    account_event add = account_add(5);
    es_error err = {0};
    assert_int_equal(account_record(ctx, &add, &err), 0);
    assert_int_equal(save_commit(raw(ctx), &err), 0);
    assert_int_equal(snapshot_balance(&b.account_id,
                                      ACCOUNT_SNAPSHOT_VERSION),
                     105);
    account_context_free(ctx);
}

static void test_pg_store_rebuilt_if_snapshot_version_differs(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_builder_with_remove(&b, 10);
    account_context *ctx = saved_account(&b);
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    sql_ok("DELETE FROM snapshots WHERE aggregate_id = $1", 1, v);
    insert_snapshot(&b.account_id, 0, 2, 0); /* old version, balance 0 */
    assert_int_equal(balance_of(&b.account_id), 90);
    account_context_free(ctx);
}

static void test_pg_store_snapshot_versions_coexist(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_builder_with_remove(&b, 10);
    account_context *ctx = saved_account(&b);
    insert_snapshot(&b.account_id, 1, 2, 500);
    assert_int_equal(snapshot_count(&b.account_id), 2);
    assert_int_equal(snapshot_balance(&b.account_id, 1), 500);
    assert_int_equal(snapshot_balance(&b.account_id, 2), 90);
    assert_int_equal(balance_of(&b.account_id), 90);
    account_context_free(ctx);
}

static void test_pg_store_same_snapshot_version_updated(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_context *ctx = saved_account(&b);
    account_event add = account_add(50);
    es_error err = {0};
    assert_int_equal(account_record(ctx, &add, &err), 0);
    assert_int_equal(save_commit(raw(ctx), &err), 0);
    assert_int_equal(snapshot_count(&b.account_id), 1);
    assert_int_equal(snapshot_balance(&b.account_id, 2), 150);
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    assert_int_equal(sql_int("SELECT snapshot_version FROM snapshots WHERE "
                             "aggregate_id = $1", 1, v),
                     2);
    account_context_free(ctx);
}

static void test_pg_store_old_snapshots_ignored(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_builder_with_remove(&b, 10);
    account_context *ctx = saved_account(&b);
    insert_snapshot(&b.account_id, 0, 2, 999);
    insert_snapshot(&b.account_id, 1, 2, 888);
    assert_int_equal(snapshot_count(&b.account_id), 3);
    assert_int_equal(balance_of(&b.account_id), 90);
    account_context_free(ctx);
}

static void test_pg_store_snapshot_never_moves_backwards(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_builder_with_add(&b, 1);
    account_context *ctx = saved_account(&b); /* snapshot at version 2 */
    account st = {b.account_id, (char *)ACCOUNT_DEFAULT_EMAIL, 7};
    es_buf buf = {0};
    es_error err = {0};
    assert_int_equal(account_type.state_encode(&st, &buf, &err), 0);
    es_snapshot old = {b.account_id, 1, 2, buf.data, buf.len};
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    assert_int_equal(es_txn_store_snapshot(txn, &old, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    assert_int_equal(snapshot_balance(&b.account_id, 2), 101);
    es_snapshot newer = {b.account_id, 2, 2, buf.data, buf.len};
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    assert_int_equal(es_txn_store_snapshot(txn, &newer, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    assert_int_equal(snapshot_balance(&b.account_id, 2), 7); /* same: taken */
    es_buf_free(&buf);
    account_context_free(ctx);
}

static void test_pg_store_garbage_snapshot_replayed(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 100);
    account_context *ctx = saved_account(&b);
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    sql_ok("UPDATE snapshots SET payload = '\\x00ff17'::bytea WHERE "
           "aggregate_id = $1", 1, v);
    assert_int_equal(balance_of(&b.account_id), 100);
    account_context_free(ctx);
}

/* ==== validation.rs ==== */

static void test_pg_store_idempotency_error_on_other_content(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_context *ctx = saved_account(&b);
    account_event add = account_add(10);
    es_error err = {0};
    assert_int_equal(account_record(ctx, &add, &err), 0);
    assert_int_equal(save_commit(raw(ctx), &err), 0);

    account_event other = add;
    other.amount = 20;
    assert_int_equal(account_record(ctx, &other, &err), 0);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    assert_int_equal(account_save(txn, ctx, &err), ES_EIDEMPOTENCY);
    assert_true(es_uuid_equal(&err.event_id, &add.event_id));
    const es_event *saved = NULL, *attempted = NULL;
    assert_int_equal(es_context_idempotency_clash(raw(ctx), &saved,
                                                  &attempted),
                     0);
    account_event s, t;
    assert_int_equal(account_event_decode(saved, &s, &err), 0);
    assert_int_equal(account_event_decode(attempted, &t, &err), 0);
    assert_int_equal(s.amount, 10);
    assert_int_equal(t.amount, 20);
    account_event_free(&s);
    account_event_free(&t);
    es_txn_rollback(txn);
    assert_int_equal(balance_of(&b.account_id), 10);
    account_context_free(ctx);
}

static void test_pg_store_no_idempotency_error_on_same_content(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_context *ctx = saved_account(&b);
    account_event add = account_add(10);
    es_error err = {0};
    assert_int_equal(account_record(ctx, &add, &err), 0);
    assert_int_equal(save_commit(raw(ctx), &err), 0);
    assert_int_equal(account_record(ctx, &add, &err), 0);
    assert_int_equal(save_commit(raw(ctx), &err), 0);
    assert_int_equal(balance_of(&b.account_id), 10);
    assert_int_equal(account_version(ctx), 1);
    fixture_stream s;
    assert_int_equal(fixture_stream_read_store(g_store, &b.account_id, &s,
                                               &err),
                     0);
    assert_int_equal(s.count, 2);
    fixture_stream_free(&s);
    assert_int_equal(fixture_side_effect_count(g_store, &b.account_id), 2);
    account_context_free(ctx);
}

static void test_pg_store_conflict_if_updated_by_another(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_context *ctx = saved_account(&b);
    account_context *stale = NULL;
    es_error err = {0};
    assert_int_equal(account_clone(ctx, &stale, &err), 0);
    account_event a = account_add(10), c = account_add(20);
    assert_int_equal(account_record(ctx, &a, &err), 0);
    assert_int_equal(save_commit(raw(ctx), &err), 0);
    assert_int_equal(account_record(stale, &c, &err), 0);
    assert_int_equal(save_commit(raw(stale), &err), ES_ECONFLICT);
    assert_true(es_uuid_equal(&err.aggregate_id, &b.account_id));
    assert_int_equal(err.version, 1);
    assert_int_equal(balance_of(&b.account_id), 10);
    account_context_free(stale);
    account_context_free(ctx);
}

/* ==== side_effect.rs ==== */

static es_uuid event_id_at(const es_uuid *agg, uint64_t version)
{
    fixture_stream s;
    es_error err = {0};
    assert_int_equal(fixture_stream_read_store(g_store, agg, &s, &err), 0);
    assert_true(version < s.count);
    es_uuid id = s.events[version].id;
    fixture_stream_free(&s);
    return id;
}

static es_side_effect_list *side_effects_of(const es_uuid *agg)
{
    es_txn *txn = NULL;
    es_error err = {0};
    es_side_effect_list *list = NULL;
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    assert_int_equal(es_txn_list_side_effects(txn, agg, &list, &err), 0);
    es_txn_rollback(txn);
    return list;
}

static void test_pg_store_side_effect_stored(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_context *ctx = saved_account(&b);
    es_uuid open_id = event_id_at(&b.account_id, 0);
    es_side_effect_list *list = side_effects_of(&b.account_id);
    assert_int_equal(list->count, 1);
    es_uuid want = fixture_derive_id(&open_id, ACCOUNT_TAG_EMAIL);
    assert_true(es_uuid_equal(&list->items[0].id, &want));
    assert_true(es_uuid_equal(&list->items[0].event_id, &open_id));
    account_side_effect se;
    es_error err = {0};
    assert_int_equal(account_side_effect_decode(&list->items[0], &se, &err),
                     0);
    assert_int_equal(se.kind, ACCOUNT_SEND_EMAIL);
    assert_string_equal(se.address, ACCOUNT_DEFAULT_EMAIL);
    idtext a = txt(&b.account_id);
    assert_non_null(strstr(se.content, a.s));
    assert_non_null(strstr(se.content, "starting balance 0"));
    account_side_effect_free(&se);
    idtext sid = txt(&want);
    const char *v[1] = {sid.s};
    assert_int_equal(sql_int("SELECT attempts FROM outbox WHERE id = $1 AND "
                             "status = 'pending'", 1, v),
                     0);
    es_side_effect_list_free(list);
    account_context_free(ctx);
}

static void test_pg_store_multiple_side_effects_stored(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 50);
    account_context *ctx = saved_account(&b);
    es_uuid add_id = event_id_at(&b.account_id, 1);
    es_side_effect_list *list = side_effects_of(&b.account_id);
    assert_int_equal(list->count, 2);
    es_uuid want = fixture_derive_id(&add_id, ACCOUNT_TAG_PUBLISH);
    assert_true(es_uuid_equal(&list->items[1].id, &want));
    account_side_effect se;
    es_error err = {0};
    assert_int_equal(account_side_effect_decode(&list->items[1], &se, &err),
                     0);
    assert_int_equal(se.kind, ACCOUNT_PUBLISH_MESSAGE);
    assert_string_equal(se.message, "50");
    account_side_effect_free(&se);
    es_side_effect_list_free(list);
    account_context_free(ctx);
}

static void test_pg_store_side_effects_regenerated(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    b.starting_balance = 100;
    account_builder_with_add(&b, 50);
    account_builder_with_remove(&b, 10);
    account_context *ctx = saved_account(&b);
    es_uuid ids[3];
    for (uint64_t v = 0; v < 3; v++) ids[v] = event_id_at(&b.account_id, v);
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    es_side_effect_list *list = NULL;
    account_side_effect se;

    assert_int_equal(es_context_regenerate_side_effects(
                         txn, &account_type, &b.account_id, &ids[0], &list,
                         &err),
                     0);
    assert_non_null(list);
    assert_int_equal(list->count, 1);
    assert_int_equal(account_side_effect_decode(&list->items[0], &se, &err),
                     0);
    idtext a = txt(&b.account_id);
    assert_non_null(strstr(se.content, a.s));
    assert_non_null(strstr(se.content, "100"));
    account_side_effect_free(&se);
    es_side_effect_list_free(list);

    assert_int_equal(es_context_regenerate_side_effects(
                         txn, &account_type, &b.account_id, &ids[1], &list,
                         &err),
                     0);
    assert_non_null(list);
    assert_int_equal(list->count, 1);
    assert_int_equal(account_side_effect_decode(&list->items[0], &se, &err),
                     0);
    assert_string_equal(se.message, "50");
    account_side_effect_free(&se);
    es_side_effect_list_free(list);

    assert_int_equal(es_context_regenerate_side_effects(
                         txn, &account_type, &b.account_id, &ids[2], &list,
                         &err),
                     0);
    assert_null(list);
    es_uuid unknown = fixture_new_id();
    assert_int_equal(es_context_regenerate_side_effects(
                         txn, &account_type, &b.account_id, &unknown, &list,
                         &err),
                     0);
    assert_null(list);
    assert_int_equal(es_context_regenerate_side_effects(
                         txn, &account_type, &unknown, &ids[0], &list, &err),
                     0);
    assert_null(list);
    es_txn_rollback(txn);
    account_context_free(ctx);
}

static void test_pg_store_side_effect_never_reset(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_context *ctx = saved_account(&b);
    account_event add = account_add(10);
    es_error err = {0};
    assert_int_equal(account_record(ctx, &add, &err), 0);
    assert_int_equal(save_commit(raw(ctx), &err), 0);
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    sql_ok("UPDATE outbox SET status = 'done', attempts = 3 WHERE "
           "aggregate_id = $1", 1, v);
    assert_int_equal(account_record(ctx, &add, &err), 0); /* same again */
    assert_int_equal(save_commit(raw(ctx), &err), 0);
    assert_int_equal(sql_int("SELECT count(*) FROM outbox WHERE aggregate_id "
                             "= $1 AND status = 'done' AND attempts = 3",
                             1, v),
                     2);
    assert_int_equal(sql_int("SELECT count(*) FROM outbox WHERE aggregate_id "
                             "= $1", 1, v),
                     2);
    account_context_free(ctx);
}

/* ==== multi_aggregate.rs ==== */

static void record_order(order_context **out, es_uuid *id, bool confirm)
{
    *id = fixture_new_id();
    es_uuid customer = fixture_new_id();
    order_event created = order_created(id, &customer, 500);
    es_error err = {0};
    assert_int_equal(order_record_new(id, &created, out, &err), 0);
    if (confirm) {
        order_event c = order_event_of(ORDER_CONFIRMED_EVENT);
        assert_int_equal(order_record(*out, &c, &err), 0);
    }
}

static void multi_aggregate(bool commit, bool mixed)
{
    account_builder b;
    account_builder_init(&b);
    b.starting_balance = 1000;
    if (mixed) account_builder_with_add(&b, 500);
    account_context *acc = NULL;
    es_error err = {0};
    assert_int_equal(account_builder_build(&b, &acc, &err), 0);
    order_context *ord = NULL;
    es_uuid order_id;
    record_order(&ord, &order_id, mixed);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    assert_int_equal(account_save(txn, acc, &err), 0);
    assert_int_equal(order_save(txn, ord, &err), 0);
    if (!commit) {
        es_txn_rollback(txn);
        account_context *a = NULL;
        order_context *o = NULL;
        assert_int_equal(load_account(&b.account_id, &a), ES_ENOTFOUND);
        assert_int_equal(order_store_load(g_store, &order_id, &o, &err),
                         ES_ENOTFOUND);
        assert_int_equal(fixture_side_effect_count(g_store, &order_id), 0);
    } else {
        assert_int_equal(es_txn_commit(txn, &err), 0);
        assert_int_equal(balance_of(&b.account_id), mixed ? 1500 : 1000);
        order_context *o = NULL;
        assert_int_equal(order_store_load(g_store, &order_id, &o, &err), 0);
        assert_int_equal(order_state(o)->total_amount, 500);
        assert_int_equal(order_state(o)->status,
                         mixed ? ORDER_CONFIRMED : ORDER_PENDING);
        order_context_free(o);
        assert_int_equal(fixture_side_effect_count(g_store, &order_id),
                         mixed ? 2 : 1);
        assert_int_equal(fixture_side_effect_count(g_store, &b.account_id),
                         mixed ? 2 : 1);
    }
    account_context_free(acc);
    order_context_free(ord);
}

static void test_pg_store_multi_aggregate_commit(void **state)
{
    (void)state;
    multi_aggregate(true, false);
}

static void test_pg_store_multi_aggregate_rollback(void **state)
{
    (void)state;
    multi_aggregate(false, false);
}

static void test_pg_store_multi_aggregate_mixed_side_effects(void **state)
{
    (void)state;
    multi_aggregate(true, true);
}

/* ==== beyond the reference ==== */

#define WRITERS 4
#define INCREMENTS 10

typedef struct writer {
    pthread_t thread;
    es_uuid id;
    int done, conflicts, failures;
    int last_error;
} writer;

static void *writer_main(void *arg)
{
    writer *w = arg;
    while (w->done < INCREMENTS && w->failures == 0) {
        account_context *ctx = NULL;
        es_error err = {0};
        es_txn *txn = NULL;
        int rc = es_store_begin(g_store, &txn, &err);
        if (rc == 0) rc = account_load(txn, &w->id, &ctx, &err);
        account_event add = account_add(1);
        if (rc == 0) rc = account_record(ctx, &add, &err);
        if (rc == 0) rc = account_save(txn, ctx, &err);
        if (rc == 0) {
            rc = es_txn_commit(txn, &err);
        } else if (txn != NULL) {
            es_txn_rollback(txn);
        }
        account_context_free(ctx);
        if (rc == 0)
            w->done++;
        else if (rc == ES_ECONFLICT)
            w->conflicts++;
        else {
            w->failures++;
            w->last_error = rc;
        }
    }
    return NULL;
}

static void test_pg_store_concurrent_writers(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_context *ctx = saved_account(&b);
    writer w[WRITERS];
    memset(w, 0, sizeof w);
    for (int i = 0; i < WRITERS; i++) {
        w[i].id = b.account_id;
        assert_int_equal(pthread_create(&w[i].thread, NULL, writer_main, &w[i]),
                         0);
    }
    int conflicts = 0;
    for (int i = 0; i < WRITERS; i++) pthread_join(w[i].thread, NULL);
    for (int i = 0; i < WRITERS; i++) {
        assert_int_equal(w[i].failures, 0);
        assert_int_equal(w[i].done, INCREMENTS);
        conflicts += w[i].conflicts;
    }
    printf("# concurrent writers: %d commits, %d conflicts retried\n",
           WRITERS * INCREMENTS, conflicts);
    assert_int_equal(balance_of(&b.account_id), WRITERS * INCREMENTS);
    fixture_stream s;
    es_error err = {0};
    assert_int_equal(fixture_stream_read_store(g_store, &b.account_id, &s,
                                               &err),
                     0);
    assert_int_equal(s.count, 1 + WRITERS * INCREMENTS);
    assert_true(fixture_stream_gap_free(&s));
    fixture_stream_free(&s);
    account_context_free(ctx);
}

static void test_pg_store_failed_save_leaves_txn_usable(void **state)
{
    (void)state;
    account_builder ba, bb;
    account_builder_init(&ba);
    account_builder_init(&bb);
    account_context *a = saved_account(&ba), *stale = NULL;
    es_error err = {0};
    assert_int_equal(account_clone(a, &stale, &err), 0);
    account_event a1 = account_add(10);
    assert_int_equal(account_record(a, &a1, &err), 0);
    assert_int_equal(save_commit(raw(a), &err), 0);

    account_context *bctx = NULL;
    assert_int_equal(account_builder_build(&bb, &bctx, &err), 0);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    assert_int_equal(account_save(txn, bctx, &err), 0);
    account_event s1 = account_add(99);
    assert_int_equal(account_record(stale, &s1, &err), 0);
    assert_int_equal(account_save(txn, stale, &err), ES_ECONFLICT);
    assert_int_equal(es_context_uncommitted_count(raw(stale)), 1);
    /* A foreign type on an existing id fails inside the database. */
    order_context *ord = NULL;
    es_uuid customer = fixture_new_id();
    order_event created = order_created(&ba.account_id, &customer, 1);
    assert_int_equal(order_record_new(&ba.account_id, &created, &ord, &err),
                     0);
    assert_int_equal(order_save(txn, ord, &err), ES_EWRONGTYPE);
    assert_non_null(strstr(err.message, "account"));
    /* The transaction goes on as if the failed saves never happened. */
    account_event b1 = account_add(5);
    assert_int_equal(account_record(bctx, &b1, &err), 0);
    assert_int_equal(account_save(txn, bctx, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    assert_int_equal(balance_of(&ba.account_id), 10);
    assert_int_equal(balance_of(&bb.account_id), 5);
    fixture_stream s;
    assert_int_equal(fixture_stream_read_store(g_store, &ba.account_id, &s,
                                               &err),
                     0);
    assert_int_equal(s.count, 2);
    fixture_stream_free(&s);
    order_context_free(ord);
    account_context_free(a);
    account_context_free(stale);
    account_context_free(bctx);
}

static void test_pg_store_invalid_utf8_type_name(void **state)
{
    (void)state;
    es_aggregate_type bad = account_type;
    bad.name = "acc\xff\xfeunt";
    account_builder b;
    account_builder_init(&b);
    account_event open;
    assert_int_equal(account_open(&open, &b.account_id, "a@b.c", 0), 0);
    es_context *ctx = NULL;
    es_error err = {0};
    assert_int_equal(es_context_record_new(&bad, &b.account_id, &open, &ctx,
                                           &err),
                     0);
    account_event_free(&open);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    assert_int_equal(es_context_save(txn, ctx, &err), ES_EINVAL);
    assert_string_equal(err.sqlstate, "22021");
    /* still usable */
    account_context *good = NULL;
    account_builder b2;
    account_builder_init(&b2);
    assert_int_equal(account_builder_build(&b2, &good, &err), 0);
    assert_int_equal(account_save(txn, good, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    assert_int_equal(balance_of(&b2.account_id), 0);
    account_context_free(good);
    es_context_free(ctx);
}

static void test_pg_store_payload_bytes_round_trip(void **state)
{
    (void)state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 0x0100); /* zero bytes in the payload */
    account_context *ctx = NULL;
    es_error err = {0};
    assert_int_equal(account_builder_build(&b, &ctx, &err), 0);
    es_event sent[2];
    uint8_t *copies[2];
    for (size_t i = 0; i < 2; i++) {
        sent[i] = *es_context_uncommitted(raw(ctx), i);
        copies[i] = malloc(sent[i].len);
        memcpy(copies[i], sent[i].data, sent[i].len);
        sent[i].data = copies[i];
    }
    assert_non_null(memchr(sent[1].data, 0, sent[1].len));
    assert_int_equal(save_commit(raw(ctx), &err), 0);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    for (size_t i = 0; i < 2; i++) {
        es_event *got = NULL;
        assert_int_equal(es_txn_get_event(txn, &b.account_id, &sent[i].id,
                                          &got, &err),
                         0);
        assert_int_equal(got->version, i);
        assert_int_equal(got->kind, sent[i].kind);
        assert_int_equal(got->len, sent[i].len);
        assert_memory_equal(got->data, sent[i].data, sent[i].len);
        es_free(got);
        free(copies[i]);
    }
    es_event *none = NULL;
    es_uuid other = fixture_new_id();
    assert_int_equal(es_txn_get_event(txn, &other, &sent[0].id, &none, &err),
                     ES_ENOTFOUND);
    es_txn_rollback(txn);
    account_context_free(ctx);
}

/* ---- migrations ---- */

static void schema_config(es_pg_config **out, const char *schema)
{
    es_error err = {0};
    assert_int_equal(es_pg_config_new(out, &err), 0);
    assert_int_equal(es_pg_config_set_schema(*out, schema, &err), 0);
}

typedef struct migrator {
    pthread_t thread;
    const es_pg_config *cfg;
    int rc, version;
} migrator;

static void *migrator_main(void *arg)
{
    migrator *m = arg;
    es_error err = {0};
    m->rc = es_pg_migrate(m->cfg, &m->version, &err);
    return NULL;
}

static void test_pg_store_migrate_twice_and_concurrently(void **state)
{
    (void)state;
    char schema[40];
    fixture_pg_random_name(schema, sizeof schema, "es_mig_");
    es_pg_config *cfg = NULL;
    schema_config(&cfg, schema);
    migrator m[2] = {{0}, {0}};
    for (int i = 0; i < 2; i++) {
        m[i].cfg = cfg;
        assert_int_equal(pthread_create(&m[i].thread, NULL, migrator_main,
                                        &m[i]),
                         0);
    }
    for (int i = 0; i < 2; i++) pthread_join(m[i].thread, NULL);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(m[i].rc, 0);
        assert_int_equal(m[i].version, es_pg_schema_version());
    }
    int version = 0;
    es_error err = {0};
    assert_int_equal(es_pg_migrate(cfg, &version, &err), 0);
    assert_int_equal(version, es_pg_schema_version());
    char q[160];
    snprintf(q, sizeof q, "SELECT count(*) FROM \"%s\".es_migrations",
             schema);
    assert_int_equal(sql_int(q, 0, NULL), es_pg_schema_version());
    es_pg_config_free(cfg);
    fixture_pg_drop_schema(schema);
}

static void test_pg_store_changed_migration_refused(void **state)
{
    (void)state;
    char schema[40];
    fixture_pg_random_name(schema, sizeof schema, "es_sum_");
    es_pg_config *cfg = NULL;
    schema_config(&cfg, schema);
    es_error err = {0};
    assert_int_equal(es_pg_migrate(cfg, NULL, &err), 0);
    char q[200];
    snprintf(q, sizeof q, "UPDATE \"%s\".es_migrations SET checksum = "
             "'fnv1a64:0000000000000000' WHERE version = 1", schema);
    sql_ok(q, 0, NULL);
    assert_int_equal(es_pg_migrate(cfg, NULL, &err), ES_EDB);
    assert_non_null(strstr(err.message, "migration 1"));
    assert_non_null(strstr(err.message, "differs"));

    char schema2[40];
    fixture_pg_random_name(schema2, sizeof schema2, "es_new_");
    es_pg_config *cfg2 = NULL;
    schema_config(&cfg2, schema2);
    assert_int_equal(es_pg_migrate(cfg2, NULL, &err), 0);
    snprintf(q, sizeof q, "INSERT INTO \"%s\".es_migrations (version, name, "
             "checksum) VALUES (9999, 'future', 'x')", schema2);
    sql_ok(q, 0, NULL);
    assert_int_equal(es_pg_migrate(cfg2, NULL, &err), ES_EDB);
    assert_non_null(strstr(err.message, "newer"));
    es_pg_config_free(cfg);
    es_pg_config_free(cfg2);
    fixture_pg_drop_schema(schema);
    fixture_pg_drop_schema(schema2);
}

static void test_pg_store_odd_names_quoted(void **state)
{
    (void)state;
    char schema[40];
    fixture_pg_random_name(schema, sizeof schema, "Odd_Schema_");
    es_pg_config *cfg = NULL;
    schema_config(&cfg, schema);
    es_error err = {0};
    assert_int_equal(es_pg_config_set_table(cfg, ES_PG_TABLE_EVENTS, "select",
                                            &err),
                     0);
    assert_int_equal(es_pg_config_set_table(cfg, ES_PG_TABLE_SNAPSHOTS,
                                            "Order", &err),
                     0);
    assert_int_equal(es_pg_config_set_table(cfg, ES_PG_TABLE_OUTBOX, "user",
                                            &err),
                     0);
    assert_int_equal(es_pg_config_set_table(cfg, ES_PG_TABLE_MIGRATIONS,
                                            "_Migrations_2", &err),
                     0);
    assert_int_equal(es_pg_migrate(cfg, NULL, &err), 0);
    es_store *store = NULL;
    assert_int_equal(es_pg_store_open(cfg, &store, &err), 0);
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 42);
    assert_int_equal(account_builder_save(&b, store, NULL, &err), 0);
    account_context *ctx = NULL;
    assert_int_equal(account_store_load(store, &b.account_id, &ctx, &err), 0);
    assert_int_equal(account_state(ctx)->balance, 42);
    account_context_free(ctx);
    assert_int_equal(fixture_side_effect_count(store, &b.account_id), 2);
    assert_int_equal(es_store_close(store), 0);
    char q[400];
    snprintf(q, sizeof q, "SELECT (SELECT count(*) FROM \"%s\".\"select\") "
             "+ (SELECT count(*) FROM \"%s\".\"Order\") * 10 + (SELECT "
             "count(*) FROM \"%s\".\"user\") * 100", schema, schema, schema);
    assert_int_equal(sql_int(q, 0, NULL), 2 + 10 + 200);
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    assert_int_equal(sql_int("SELECT count(*) FROM events WHERE aggregate_id "
                             "= $1", 1, v),
                     0); /* nothing in the default tables */
    es_pg_config_free(cfg);
    fixture_pg_drop_schema(schema);
}

static void test_pg_store_invalid_names_rejected(void **state)
{
    (void)state;
    es_pg_config *cfg = NULL;
    es_error err = {0};
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    static const char *const bad[] = {
        "", "1abc", "ev\"il", "a;DROP TABLE events", "sp ace", "dash-ed",
        "dot.ted", "quo'te", "t\xc3\xa4" "ble",
        "a123456789012345678901234567890123456789012345678901234567890123"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(es_pg_config_set_schema(cfg, bad[i], &err),
                         ES_EINVAL);
        assert_int_equal(es_pg_config_set_table(cfg, ES_PG_TABLE_EVENTS,
                                                bad[i], &err),
                         ES_EINVAL);
    }
    assert_int_equal(es_pg_config_set_schema(cfg, NULL, &err), ES_EINVAL);
    assert_int_equal(es_pg_config_set_table(cfg, (es_pg_table)7, "x", &err),
                     ES_EINVAL);
    assert_int_equal(es_pg_config_set_table(cfg, ES_PG_TABLE_OUTBOX, "events",
                                            &err),
                     ES_EINVAL); /* two tables, one name */
    assert_int_equal(es_pg_config_set_schema(
                         cfg,
                         "a12345678901234567890123456789012345678901234567890"
                         "123456789012",
                         &err),
                     0); /* 63 characters */
    assert_int_equal(es_pg_config_set_pool_size(cfg, 0, &err), ES_EINVAL);
    assert_int_equal(es_pg_config_set_chunk_size(cfg, 0, &err), ES_EINVAL);
    es_store *store = NULL;
    assert_int_equal(es_pg_store_open(NULL, &store, &err), ES_EINVAL);
    es_pg_config_free(cfg);
    es_pg_config_free(NULL);
}

static void test_pg_store_bad_conninfo_hides_password(void **state)
{
    (void)state;
    es_pg_config *cfg = NULL;
    es_error err = {0};
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    assert_int_equal(es_pg_config_set_conninfo(cfg, "password hunter2secret",
                                               &err),
                     ES_EINVAL);
    assert_null(strstr(err.message, "hunter2secret"));
    static const char *const wrong[] = {
        "host=/nonexistent/es port=1 user=u password=hunter2secret "
        "dbname=d connect_timeout=2",
        "postgresql://u:hunter2secret@localhost:1/d?connect_timeout=2"};
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(es_pg_config_set_conninfo(cfg, wrong[i], &err), 0);
        es_store *store = NULL;
        assert_int_equal(es_pg_store_open(cfg, &store, &err), ES_EDB);
        assert_null(store);
        assert_null(strstr(err.message, "hunter2secret"));
        assert_non_null(strstr(err.message, "could not connect"));
        assert_string_equal(err.sqlstate, "08001");
        assert_int_equal(es_pg_migrate(cfg, NULL, &err), ES_EDB);
        assert_null(strstr(err.message, "hunter2secret"));
    }
    es_pg_config_free(cfg);
}

static void test_pg_store_connection_lost_at_commit(void **state)
{
    (void)state;
    es_pg_config *cfg = NULL;
    es_error err = {0};
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    assert_int_equal(es_pg_config_set_pool_size(cfg, 1, &err), 0);
    es_store *store = NULL;
    assert_int_equal(es_pg_store_open(cfg, &store, &err), 0);
    account_builder b;
    account_builder_init(&b);
    account_context *ctx = NULL;
    assert_int_equal(account_builder_build(&b, &ctx, &err), 0);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    assert_int_equal(account_save(txn, ctx, &err), 0);
    /* The only transaction with a transaction id is ours. */
    assert_int_equal(sql_int("SELECT count(pg_terminate_backend(pid)) FROM "
                             "pg_stat_activity WHERE pid <> "
                             "pg_backend_pid() AND backend_xid IS NOT NULL "
                             "AND state = 'idle in transaction'",
                             0, NULL),
                     1);
    int rc = es_txn_commit(txn, &err);
    assert_true(rc == ES_EUNKNOWN);
    assert_string_equal(err.sqlstate, "08006");
    /* The pool of one dropped the dead connection and makes a new one. */
    account_context *loaded = NULL;
    assert_int_equal(account_store_load(store, &b.account_id, &loaded, &err),
                     ES_ENOTFOUND);
    assert_int_equal(account_builder_save(&b, store, NULL, &err), 0);
    assert_int_equal(account_store_load(store, &b.account_id, &loaded, &err),
                     0);
    account_context_free(loaded);
    account_context_free(ctx);
    assert_int_equal(es_store_close(store), 0);
    es_pg_config_free(cfg);
}

static void test_pg_store_connection_lost_mid_txn(void **state)
{
    (void)state;
    es_pg_config *cfg = NULL;
    es_error err = {0};
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    assert_int_equal(es_pg_config_set_pool_size(cfg, 1, &err), 0);
    es_store *store = NULL;
    assert_int_equal(es_pg_store_open(cfg, &store, &err), 0);
    account_builder b;
    account_builder_init(&b);
    assert_int_equal(account_builder_save(&b, store, NULL, &err), 0);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    account_context *ctx = NULL;
    assert_int_equal(account_load(txn, &b.account_id, &ctx, &err), 0);
    assert_int_equal(sql_int("SELECT count(pg_terminate_backend(pid)) FROM "
                             "pg_stat_activity WHERE pid <> "
                             "pg_backend_pid() AND state = 'idle in "
                             "transaction'",
                             0, NULL),
                     1);
    account_event add = account_add(3);
    assert_int_equal(account_record(ctx, &add, &err), 0);
    assert_int_equal(account_save(txn, ctx, &err), ES_EDB);
    assert_string_equal(err.sqlstate, "08006");
    /* Known lost before COMMIT: a known failure, not ES_EUNKNOWN.  The dead
     * connection is dropped, not pooled. */
    assert_int_equal(es_txn_commit(txn, &err), ES_EDB);
    assert_non_null(strstr(err.message, "nothing was committed"));
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    assert_int_equal(account_save(txn, ctx, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    account_context_free(ctx);
    assert_int_equal(account_store_load(store, &b.account_id, &ctx, &err), 0);
    assert_int_equal(account_state(ctx)->balance, 3);
    account_context_free(ctx);
    assert_int_equal(es_store_close(store), 0);
    es_pg_config_free(cfg);
}

/* A save blocked by another transaction's row past statement_timeout:
 * ES_ETIMEDOUT, and the transaction goes on. */
static void test_pg_store_statement_timeout(void **state)
{
    (void)state;
    es_pg_config *cfg = NULL;
    es_error err = {0};
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    assert_int_equal(es_pg_config_set_statement_timeout(cfg, -1, &err),
                     ES_EINVAL);
    assert_int_equal(es_pg_config_set_statement_timeout(cfg, 300, &err), 0);
    es_store *store = NULL;
    assert_int_equal(es_pg_store_open(cfg, &store, &err), 0);
    account_builder b;
    account_builder_init(&b);
    account_context *ctx = NULL;
    assert_int_equal(account_builder_build(&b, &ctx, &err), 0);
    /* Another transaction writes version 0 and keeps it uncommitted. */
    idtext a = txt(&b.account_id);
    const char *v[1] = {a.s};
    sql_ok("BEGIN", 0, NULL);
    sql_ok("INSERT INTO events (aggregate_type, aggregate_id, version, "
           "event_id, kind, payload) VALUES ('account', $1, 0, "
           "gen_random_uuid(), 1, '')",
           1, v);
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    assert_int_equal(account_save(txn, ctx, &err), ES_ETIMEDOUT);
    assert_string_equal(err.sqlstate, "57014");
    sql_ok("ROLLBACK", 0, NULL);
    assert_int_equal(account_save(txn, ctx, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    account_context_free(ctx);
    assert_int_equal(account_store_load(store, &b.account_id, &ctx, &err), 0);
    account_context_free(ctx);
    assert_int_equal(es_store_close(store), 0);
    es_pg_config_free(cfg);
}

static void test_pg_store_oversized_payload_rejected(void **state)
{
    (void)state;
    static const uint8_t small[8] = {0};
    /* Checked before a byte is read: the length alone is refused. */
    es_snapshot snap = {fixture_new_id(), 1, 1, small, (size_t)1 << 30};
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    assert_int_equal(es_txn_store_snapshot(txn, &snap, &err), ES_EINVAL);
    assert_non_null(strstr(err.message, "1 GiB"));
    es_txn_rollback(txn);
}

/* A role that owns only its schema migrates; a role that may only read
 * and write the tables runs the store. */
static void test_pg_store_least_privilege(void **state)
{
    (void)state;
    const char *url = getenv("DATABASE_URL");
    if (strncmp(url, "postgres", 8) == 0) {
        printf("# least privilege: skipped, DATABASE_URL is a URI\n");
        skip();
    }
    char schema[40], owner[40], app[40], q[400], conninfo[1024];
    fixture_pg_random_name(schema, sizeof schema, "es_lp_");
    fixture_pg_random_name(owner, sizeof owner, "es_owner_");
    fixture_pg_random_name(app, sizeof app, "es_app_");
    snprintf(q, sizeof q, "CREATE ROLE %s LOGIN; CREATE ROLE %s LOGIN; "
             "CREATE SCHEMA %s AUTHORIZATION %s", owner, app, schema, owner);
    PQclear(PQexec(g_sql, q));
    es_pg_config *cfg = NULL;
    es_error err = {0};
    schema_config(&cfg, schema);
    snprintf(conninfo, sizeof conninfo, "%s user=%s", url, owner);
    assert_int_equal(es_pg_config_set_conninfo(cfg, conninfo, &err), 0);
    assert_int_equal(es_pg_migrate(cfg, NULL, &err), 0);
    snprintf(q, sizeof q, "GRANT USAGE ON SCHEMA %s TO %s; GRANT SELECT, "
             "INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %s TO %s",
             schema, app, schema, app);
    PGresult *r = PQexec(g_sql, q);
    /* the grant runs as the superuser here; the owner could do it too */
    assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
    snprintf(conninfo, sizeof conninfo, "%s user=%s", url, app);
    assert_int_equal(es_pg_config_set_conninfo(cfg, conninfo, &err), 0);
    es_store *store = NULL;
    assert_int_equal(es_pg_store_open(cfg, &store, &err), 0);
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 9);
    int rc = account_builder_save(&b, store, NULL, &err);
    if (rc != 0) fail_msg("%s: %s", es_status_name(rc), err.message);
    account_context *ctx = NULL;
    assert_int_equal(account_store_load(store, &b.account_id, &ctx, &err), 0);
    assert_int_equal(account_state(ctx)->balance, 9);
    account_context_free(ctx);
    assert_int_equal(fixture_side_effect_count(store, &b.account_id), 2);
    /* The application role can check that the schema is up to date, but
     * not change it. */
    int version = 0;
    assert_int_equal(es_pg_migrate(cfg, &version, &err), 0);
    assert_int_equal(version, es_pg_schema_version());
    snprintf(q, sizeof q, "DELETE FROM \"%s\".es_migrations WHERE version = "
             "%d", schema, es_pg_schema_version());
    sql_ok(q, 0, NULL);
    assert_int_equal(es_pg_migrate(cfg, NULL, &err), ES_EDB);
    assert_string_equal(err.sqlstate, "42501");
    assert_int_equal(es_store_close(store), 0);
    es_pg_config_free(cfg);
    fixture_pg_drop_schema(schema);
    snprintf(q, sizeof q, "DROP ROLE %s; DROP ROLE %s", owner, app);
    r = PQexec(g_sql, q);
    assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
}

static void test_pg_store_close_with_open_txn_refused(void **state)
{
    (void)state;
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    assert_int_equal(es_store_close(g_store), ES_EMISUSE);
    es_txn_rollback(txn);
}

/* ---- setup ---- */

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_store_saved_and_loaded),
        cmocka_unit_test(test_pg_store_not_saved_without_events),
        cmocka_unit_test(test_pg_store_rollback_discards_changes),
        cmocka_unit_test(test_pg_store_isolates_until_commit),
        cmocka_unit_test(test_pg_store_invalid_data_handled),
        cmocka_unit_test(test_pg_store_multiple_operations_in_one_txn),
        cmocka_unit_test(test_pg_store_multiple_aggregates_in_one_txn),
        cmocka_unit_test(test_pg_store_error_handling_and_recovery),
        cmocka_unit_test(test_pg_store_load_without_txn),
        cmocka_unit_test(test_pg_store_snapshot_saved_automatically),
        cmocka_unit_test(test_pg_store_rebuilt_if_snapshot_missing),
        cmocka_unit_test(test_pg_store_snapshot_saved_with_new_event),
        cmocka_unit_test(test_pg_store_rebuilt_if_snapshot_version_differs),
        cmocka_unit_test(test_pg_store_snapshot_versions_coexist),
        cmocka_unit_test(test_pg_store_same_snapshot_version_updated),
        cmocka_unit_test(test_pg_store_old_snapshots_ignored),
        cmocka_unit_test(test_pg_store_snapshot_never_moves_backwards),
        cmocka_unit_test(test_pg_store_garbage_snapshot_replayed),
        cmocka_unit_test(test_pg_store_idempotency_error_on_other_content),
        cmocka_unit_test(test_pg_store_no_idempotency_error_on_same_content),
        cmocka_unit_test(test_pg_store_conflict_if_updated_by_another),
        cmocka_unit_test(test_pg_store_side_effect_stored),
        cmocka_unit_test(test_pg_store_multiple_side_effects_stored),
        cmocka_unit_test(test_pg_store_side_effects_regenerated),
        cmocka_unit_test(test_pg_store_side_effect_never_reset),
        cmocka_unit_test(test_pg_store_multi_aggregate_commit),
        cmocka_unit_test(test_pg_store_multi_aggregate_rollback),
        cmocka_unit_test(test_pg_store_multi_aggregate_mixed_side_effects),
        cmocka_unit_test(test_pg_store_concurrent_writers),
        cmocka_unit_test(test_pg_store_failed_save_leaves_txn_usable),
        cmocka_unit_test(test_pg_store_invalid_utf8_type_name),
        cmocka_unit_test(test_pg_store_payload_bytes_round_trip),
        cmocka_unit_test(test_pg_store_migrate_twice_and_concurrently),
        cmocka_unit_test(test_pg_store_changed_migration_refused),
        cmocka_unit_test(test_pg_store_odd_names_quoted),
        cmocka_unit_test(test_pg_store_invalid_names_rejected),
        cmocka_unit_test(test_pg_store_bad_conninfo_hides_password),
        cmocka_unit_test(test_pg_store_connection_lost_at_commit),
        cmocka_unit_test(test_pg_store_connection_lost_mid_txn),
        cmocka_unit_test(test_pg_store_statement_timeout),
        cmocka_unit_test(test_pg_store_oversized_payload_rejected),
        cmocka_unit_test(test_pg_store_least_privilege),
        cmocka_unit_test(test_pg_store_close_with_open_txn_refused),
    };
    static const fixture_pg_group group = {.store = &g_store, .sql = &g_sql};
    return FIXTURE_PG_RUN("test_pg_store", tests, &group);
}
