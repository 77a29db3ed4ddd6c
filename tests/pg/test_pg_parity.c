/*
 * The memory store and the PostgreSQL store give the same results for the
 * same scripted sequence: one test body, run on both, every observation
 * (status codes, versions, balances, counts) recorded and compared.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "eventastic.h"
#include "fixtures/account.h"
#include "fixtures/helpers.h"
#include "fixtures/ids.h"
#include "fixtures/pg.h"

#define MAX_OBS 64

/* What the script saw, in order; observations beyond MAX_OBS are counted
 * in dropped and fail the test (raise MAX_OBS when the script grows). */
typedef struct observations {
    long long v[MAX_OBS];
    const char *what[MAX_OBS];
    size_t n, dropped;
} observations;

static void see(observations *o, const char *what, long long v)
{
    if (o->n < MAX_OBS) {
        o->what[o->n] = what;
        o->v[o->n++] = v;
    } else {
        o->dropped++;
    }
}

static int64_t balance(es_store *store, const es_uuid *id, int *rc)
{
    account_context *ctx = NULL;
    es_error err = {0};
    *rc = account_store_load(store, id, &ctx, &err);
    int64_t b = *rc == 0 ? account_state(ctx)->balance : -1;
    account_context_free(ctx);
    return b;
}

static int count_event(void *ud, const es_event *ev)
{
    (void)ev;
    (*(long long *)ud)++;
    return 0;
}

/* The script: everything it sees goes to o; it never asserts. */
static void script(es_store *store, observations *o)
{
    es_error err = {0};
    int rc;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 10);
    account_context *a = NULL;
    see(o, "save A", account_builder_save(&b, store, &a, &err));
    see(o, "A balance", balance(store, &b.account_id, &rc));
    see(o, "A version", (long long)account_version(a));

    /* the same event again, then the same id with other content */
    account_event add = account_add(5);
    see(o, "record add", account_record(a, &add, &err));
    see(o, "save add", fixture_save_commit(store, account_context_raw(a),
                                           &err));
    see(o, "record add again", account_record(a, &add, &err));
    see(o, "save add again", fixture_save_commit(store,
                                                 account_context_raw(a),
                                                 &err));
    see(o, "version after dup", (long long)account_version(a));
    account_event other = add;
    other.amount = 6;
    see(o, "record clash", account_record(a, &other, &err));
    see(o, "save clash", fixture_save_commit(store, account_context_raw(a),
                                             &err));
    account_context_free(a);
    a = NULL;
    see(o, "reload A", account_store_load(store, &b.account_id, &a, &err));
    see(o, "A balance 2", balance(store, &b.account_id, &rc));

    /* a stale clone */
    account_context *stale = NULL;
    see(o, "clone", account_clone(a, &stale, &err));
    account_event x = account_add(1), y = account_add(2);
    see(o, "record x", account_record(a, &x, &err));
    see(o, "save x", fixture_save_commit(store, account_context_raw(a), &err));
    see(o, "record y", account_record(stale, &y, &err));
    see(o, "save stale", fixture_save_commit(store,
                                             account_context_raw(stale),
                                             &err));
    see(o, "stale err version", (long long)err.version);
    account_context_free(stale);

    /* another type on the same id */
    es_uuid customer = fixture_new_id();
    order_event created = order_created(&b.account_id, &customer, 1);
    order_context *ord = NULL;
    see(o, "order new", order_record_new(&b.account_id, &created, &ord, &err));
    see(o, "save order on account id",
        fixture_save_commit(store, order_context_raw(ord), &err));
    order_context_free(ord);

    /* rollback, isolation, multi-aggregate */
    account_builder b2;
    account_builder_init(&b2);
    account_context *c2 = NULL;
    see(o, "build B", account_builder_build(&b2, &c2, &err));
    es_txn *txn = NULL;
    see(o, "begin", es_store_begin(store, &txn, &err));
    see(o, "save B", account_save(txn, c2, &err));
    see(o, "B invisible", balance(store, &b2.account_id, &rc) == -1 ? rc : 0);
    es_uuid oid = fixture_new_id();
    order_event oc = order_created(&oid, &customer, 500);
    see(o, "order record", order_record_new(&oid, &oc, &ord, &err));
    see(o, "order save", order_save(txn, ord, &err));
    es_txn_rollback(txn);
    see(o, "B after rollback", balance(store, &b2.account_id, &rc) == -1 ? rc
                                                                          : 0);
    /* A saved context has no uncommitted events left, even when the
     * transaction then rolled back: the same contexts write nothing. */
    see(o, "begin 2", es_store_begin(store, &txn, &err));
    see(o, "save B again", account_save(txn, c2, &err));
    see(o, "commit nothing", es_txn_commit(txn, &err));
    see(o, "B still absent", balance(store, &b2.account_id, &rc) == -1 ? rc
                                                                        : 0);
    /* Rebuilt from their events, they go in. */
    account_context_free(c2);
    c2 = NULL;
    see(o, "rebuild B", account_builder_build(&b2, &c2, &err));
    order_context_free(ord);
    ord = NULL;
    see(o, "order record 2", order_record_new(&oid, &oc, &ord, &err));
    see(o, "begin 2b", es_store_begin(store, &txn, &err));
    see(o, "save B 2", account_save(txn, c2, &err));
    see(o, "order save 2", order_save(txn, ord, &err));
    see(o, "commit", es_txn_commit(txn, &err));
    see(o, "B balance", balance(store, &b2.account_id, &rc));
    order_context *ord2 = NULL;
    see(o, "order load", order_store_load(store, &oid, &ord2, &err));
    see(o, "order status", ord2 ? (long long)order_state(ord2)->status : -1);
    order_context_free(ord2);
    order_context_free(ord);
    account_context_free(c2);

    /* reads */
    see(o, "side effects A",
        (long long)fixture_side_effect_count(store, &b.account_id));
    see(o, "side effects order", (long long)fixture_side_effect_count(store,
                                                                      &oid));
    long long n = 0;
    see(o, "begin 3", es_store_begin(store, &txn, &err));
    see(o, "stream A", es_txn_stream(txn, &b.account_id, 0, count_event, &n,
                                     &err));
    see(o, "events A", n);
    n = 0;
    see(o, "stream from 2", es_txn_stream(txn, &b.account_id, 2, count_event,
                                          &n, &err));
    see(o, "events A from 2", n);
    es_event *ev = NULL;
    es_uuid unknown = fixture_new_id();
    see(o, "get unknown", es_txn_get_event(txn, &b.account_id, &unknown, &ev,
                                           &err));
    see(o, "get x", es_txn_get_event(txn, &b.account_id, &x.event_id, &ev,
                                     &err));
    see(o, "x version", ev ? (long long)ev->version : -1);
    es_free(ev);
    es_snapshot *snap = NULL;
    see(o, "snapshot", es_txn_get_snapshot(txn, &b.account_id,
                                           ACCOUNT_SNAPSHOT_VERSION, &snap,
                                           &err));
    see(o, "snapshot version", snap ? (long long)snap->version : -1);
    es_free(snap);
    see(o, "no snapshot", es_txn_get_snapshot(txn, &b.account_id, 77, &snap,
                                              &err));
    es_side_effect_list *list = NULL;
    see(o, "regenerate", es_context_regenerate_side_effects(
                             txn, &account_type, &b.account_id, &x.event_id,
                             &list, &err));
    see(o, "regenerated", list ? (long long)list->count : 0);
    es_side_effect_list_free(list);
    see(o, "delete snapshots", es_txn_delete_snapshots(txn, &b.account_id,
                                                       &err));
    see(o, "snapshot deleted", es_txn_get_snapshot(txn, &b.account_id,
                                                   ACCOUNT_SNAPSHOT_VERSION,
                                                   &snap, &err));
    see(o, "commit 3", es_txn_commit(txn, &err));
    see(o, "A balance replayed", balance(store, &b.account_id, &rc));
    account_context_free(a);
}

static void test_pg_parity_memory_and_postgres_agree(void **state)
{
    (void)state;
    es_error err = {0};
    es_store *mem = NULL, *pg = NULL;
    assert_int_equal(es_memory_store_open(&mem, &err), 0);
    assert_int_equal(fixture_pg_open(NULL, &pg), 0);
    observations om = {{0}, {0}, 0, 0}, op = {{0}, {0}, 0, 0};
    script(mem, &om);
    script(pg, &op);
    assert_int_equal(es_store_close(mem), 0);
    assert_int_equal(es_store_close(pg), 0);
    if (om.dropped > 0 || op.dropped > 0)
        fail_msg("%zu and %zu observations beyond the %d kept: raise "
                 "MAX_OBS",
                 om.dropped, op.dropped, MAX_OBS);
    assert_int_equal(om.n, op.n);
    int differ = 0;
    for (size_t i = 0; i < om.n; i++) {
        if (om.v[i] == op.v[i]) continue;
        printf("# differ at %s: memory %lld, postgres %lld\n", om.what[i],
               om.v[i], op.v[i]);
        differ++;
    }
    assert_int_equal(differ, 0);
    printf("# %zu observations agree\n", om.n);
    for (size_t i = 0; getenv("PARITY_SHOW") && i < om.n; i++)
        printf("#   %-26s %lld\n", om.what[i], om.v[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_parity_memory_and_postgres_agree),
    };
    return FIXTURE_PG_RUN_GROUP("test_pg_parity", tests, NULL, NULL);
}
