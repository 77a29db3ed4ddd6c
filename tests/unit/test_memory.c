/*
 * The in-memory store through the repository interface: the reference's
 * memory.rs cases, and the snapshots.rs, validation.rs, side_effect.rs,
 * multi_aggregate.rs and postgres.rs cases that apply without PostgreSQL.
 * The snapshot helpers of the SQL tests are played by es_txn_get_snapshot,
 * es_txn_store_snapshot and es_txn_delete_snapshots.
 */
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fixtures/account.h"
#include "fixtures/counter.h"
#include "fixtures/helpers.h"
#include "fixtures/memory.h"

static void commit(es_txn *txn)
{
    es_error err = {0};
    int rc = es_txn_commit(txn, &err);
    if (rc != 0) fail_msg("commit: %s: %s", es_status_name(rc), err.message);
}

static void save_ok(es_store *store, es_context *ctx)
{
    es_error err = {0};
    int rc = fixture_save_commit(store, ctx, &err);
    if (rc != 0) fail_msg("save: %s: %s", es_status_name(rc), err.message);
}

static void crecord(counter_context *c, counter_event e)
{
    es_error err = {0};
    int rc = counter_record(c, &e, &err);
    if (rc != 0) fail_msg("record: %s: %s", es_status_name(rc), err.message);
}

static void arecord(account_context *a, account_event e)
{
    es_error err = {0};
    int rc = account_record(a, &e, &err);
    account_event_free(&e);
    if (rc != 0) fail_msg("record: %s: %s", es_status_name(rc), err.message);
}

static counter_context *cload(es_store *store, const es_uuid *id)
{
    counter_context *c = NULL;
    es_error err = {0};
    int rc = counter_store_load(store, id, &c, &err);
    if (rc != 0) fail_msg("load: %s: %s", es_status_name(rc), err.message);
    return c;
}

static account_context *aload(es_store *store, const es_uuid *id)
{
    account_context *a = NULL;
    es_error err = {0};
    int rc = account_store_load(store, id, &a, &err);
    if (rc != 0) fail_msg("load: %s: %s", es_status_name(rc), err.message);
    return a;
}

static es_context *craw(counter_context *c) { return counter_context_raw(c); }
static es_context *araw(account_context *a) { return account_context_raw(a); }

/* An account saved with the given adds (the AccountBuilder). */
static account_context *saved_account(es_store *store, int64_t add1,
                                      int64_t add2)
{
    account_builder b;
    account_builder_init(&b);
    if (add1) account_builder_with_add(&b, add1);
    if (add2) account_builder_with_add(&b, add2);
    account_context *a = NULL;
    CHECK(account_builder_save(&b, store, &a, NULL));
    return a;
}

/* The stored account snapshot of a snapshot version, decoded. */
static int get_account_snapshot(es_store *store, const es_uuid *id,
                                uint64_t sv, account *out, uint64_t *version)
{
    es_txn *txn = fixture_begin(store);
    es_snapshot *snap = NULL;
    int rc = es_txn_get_snapshot(txn, id, sv, &snap, NULL);
    es_txn_rollback(txn);
    if (rc != 0) return rc;
    memset(out, 0, sizeof *out);
    rc = account_type.state_decode(snap->data, snap->len, out, NULL);
    if (version) *version = snap->version;
    es_free(snap);
    return rc;
}

/* Store an account snapshot with any snapshot version and content. */
static void put_account_snapshot(es_store *store, const es_uuid *id,
                                 uint64_t sv, uint64_t version,
                                 int64_t balance)
{
    account s = {*id, (char *)"snap@example.com", balance};
    es_buf buf = {0};
    CHECK(account_type.state_encode(&s, &buf, NULL));
    es_snapshot snap = {*id, version, sv, buf.data, buf.len};
    es_txn *txn = fixture_begin(store);
    CHECK(es_txn_store_snapshot(txn, &snap, NULL));
    commit(txn);
    es_buf_free(&buf);
}

static void delete_snapshots(es_store *store, const es_uuid *id)
{
    es_txn *txn = fixture_begin(store);
    CHECK(es_txn_delete_snapshots(txn, id, NULL));
    commit(txn);
}

/* ==== memory.rs ==== */

static void test_memory_repository_load_and_save(void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    crecord(c, counter_add(10));
    crecord(c, counter_subtract(3));
    save_ok(store, craw(c));
    counter_context_free(c);
    c = cload(store, &id);
    assert_int_equal(counter_state(c)->result, 7);
    assert_int_equal(counter_state(c)->operations_count, 2);
    assert_int_equal(counter_version(c), 2);
    counter_context_free(c);
}

static void test_memory_repository_aggregate_not_found(void **state)
{
    es_store *store = *state;
    es_uuid id = fixture_new_id();
    counter_context *c = NULL;
    es_error err = {0};
    assert_int_equal(counter_store_load(store, &id, &c, &err), ES_ENOTFOUND);
    assert_null(c);
    assert_true(es_uuid_equal(&err.aggregate_id, &id));
    es_txn *txn = fixture_begin(store);
    assert_int_equal(counter_load(txn, &id, &c, &err), ES_ENOTFOUND);
    es_event *ev = NULL;
    assert_int_equal(es_txn_get_event(txn, &id, &id, &ev, &err),
                     ES_ENOTFOUND);
    es_snapshot *snap = NULL;
    assert_int_equal(es_txn_get_snapshot(txn, &id, 1, &snap, &err),
                     ES_ENOTFOUND);
    fixture_stream s;
    assert_int_equal(fixture_stream_read(txn, &id, &s, &err), 0);
    assert_int_equal(s.count, 0);
    fixture_stream_free(&s);
    es_txn_rollback(txn);
}

static void test_memory_repository_transaction_operations(void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    crecord(c, counter_add(20));
    es_txn *txn = fixture_begin(store);
    CHECK(counter_save(txn, c, NULL));
    counter_context *inside = NULL;
    CHECK(counter_load(txn, &id, &inside, NULL)); /* sees its own writes */
    assert_int_equal(counter_state(inside)->result, 20);
    counter_context_free(inside);
    commit(txn);
    counter_context_free(c);
    c = cload(store, &id);
    assert_int_equal(counter_state(c)->result, 20);
    counter_context_free(c);
}

static void test_memory_repository_idempotency(void **state)
{
    es_store *store = *state;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id);
    counter_context *c = NULL;
    CHECK(counter_record_new(&id, &reset, &c, NULL));
    save_ok(store, craw(c));
    counter_context_free(c);
    /* the identical Reset stored again */
    CHECK(counter_record_new(&id, &reset, &c, NULL));
    save_ok(store, craw(c));
    assert_int_equal(counter_version(c), 0);
    counter_context_free(c);
    assert_int_equal(es_memory_store_event_count(store), 1);
    assert_int_equal(fixture_side_effect_count(store, &id), 2);
}

/* Event ids are unique per aggregate (so that the PostgreSQL tables can
 * be distributed by aggregate id): the same id under another aggregate is
 * another event; under the same aggregate with other content, a clash. */
static void test_memory_repository_idempotency_error(void **state)
{
    es_store *store = *state;
    es_uuid id = fixture_new_id(), other = fixture_new_id();
    counter_event reset = counter_reset(&id);
    counter_context *c = NULL;
    CHECK(counter_record_new(&id, &reset, &c, NULL));
    save_ok(store, craw(c));
    counter_context_free(c);
    /* the same event id for another counter: stored there */
    counter_event clash = reset;
    clash.counter_id = other;
    CHECK(counter_record_new(&other, &clash, &c, NULL));
    save_ok(store, craw(c));
    counter_context_free(c);
    assert_int_equal(es_memory_store_event_count(store), 2);
    /* the same event id for the first counter with other content */
    CHECK(counter_record_new(&id, &clash, &c, NULL));
    es_error err = {0};
    assert_int_equal(fixture_save_commit(store, craw(c), &err),
                     ES_EIDEMPOTENCY);
    const es_event *saved = NULL, *attempted = NULL;
    assert_int_equal(es_context_idempotency_clash(craw(c), &saved,
                                                  &attempted), 0);
    assert_true(es_uuid_equal(&saved->id, &attempted->id));
    counter_context_free(c);
    assert_int_equal(es_memory_store_event_count(store), 2);
}

static void test_memory_snapshot_version_checking(void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    crecord(c, counter_add(100));
    save_ok(store, craw(c));
    counter_context_free(c);
    es_txn *txn = fixture_begin(store);
    es_snapshot *snap = NULL;
    CHECK(es_txn_get_snapshot(txn, &id, 1, &snap, NULL));
    assert_int_equal(snap->snapshot_version, 1);
    assert_int_equal(snap->version, 1);
    assert_true(es_uuid_equal(&snap->aggregate_id, &id));
    counter s;
    memset(&s, 0, sizeof s);
    CHECK(counter_type.state_decode(snap->data, snap->len, &s, NULL));
    assert_int_equal(s.result, 100);
    es_free(snap);
    snap = NULL;
    assert_int_equal(es_txn_get_snapshot(txn, &id, 2, &snap, NULL),
                     ES_ENOTFOUND);
    es_txn_rollback(txn);
}

typedef struct stream_probe {
    size_t n;
    uint64_t last;
    int stop_after;
} stream_probe;

static int probe_event(void *ud, const es_event *ev)
{
    stream_probe *p = ud;
    p->n++;
    p->last = ev->version;
    if (p->stop_after > 0 && (int)p->n == p->stop_after) return 12345;
    return 0;
}

static void test_memory_in_memory_repository_basic_operations(void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    counter_event add = counter_add(1);
    crecord(c, add);
    crecord(c, counter_add(2));
    crecord(c, counter_add(3));
    save_ok(store, craw(c));
    counter_context_free(c);
    assert_int_equal(es_memory_store_event_count(store), 4);

    es_txn *txn = fixture_begin(store);
    stream_probe p = {0, 0, 0};
    CHECK(es_txn_stream(txn, &id, 2, probe_event, &p, NULL));
    assert_int_equal(p.n, 2);
    assert_int_equal(p.last, 3);
    /* fn's value stops the stream and comes back as is */
    stream_probe q = {0, 0, 2};
    assert_int_equal(es_txn_stream(txn, &id, 0, probe_event, &q, NULL),
                     12345);
    assert_int_equal(q.n, 2);
    stream_probe r = {0, 0, 0};
    CHECK(es_txn_stream(txn, &id, 100, probe_event, &r, NULL));
    assert_int_equal(r.n, 0);
    es_event *ev = NULL;
    CHECK(es_txn_get_event(txn, &id, &add.event_id, &ev, NULL));
    assert_int_equal(ev->version, 1);
    assert_int_equal(ev->kind, COUNTER_ADD);
    es_free(ev);
    es_txn_rollback(txn);
}

static void test_memory_context_save_empty_events(void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    save_ok(store, craw(c));
    save_ok(store, craw(c)); /* nothing left to write */
    counter_context_free(c);
    c = cload(store, &id);
    size_t before = es_memory_store_event_count(store);
    save_ok(store, craw(c));
    assert_int_equal(es_memory_store_event_count(store), before);
    assert_int_equal(counter_version(c), 0);
    counter_context_free(c);
}

static void test_memory_context_save_idempotency_error(void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    counter_event add = counter_add(5);
    crecord(c, add);
    save_ok(store, craw(c));
    counter_event other = add;
    other.value = 6;
    crecord(c, other);
    es_error err = {0};
    assert_int_equal(fixture_save_commit(store, craw(c), &err),
                     ES_EIDEMPOTENCY);
    assert_int_equal(err.code, ES_EIDEMPOTENCY);
    assert_true(es_uuid_equal(&err.event_id, &add.event_id));
    assert_int_equal(es_context_idempotency_clash(craw(c), NULL, NULL), 0);
    counter_context_free(c);
}

static void test_memory_context_save_optimistic_concurrency(void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    save_ok(store, craw(c));
    counter_context *a = cload(store, &id), *b = cload(store, &id);
    crecord(a, counter_add(1));
    crecord(b, counter_add(2));
    save_ok(store, craw(a));
    es_error err = {0};
    assert_int_equal(fixture_save_commit(store, craw(b), &err),
                     ES_ECONFLICT);
    assert_int_equal(err.version, 1);
    assert_true(es_uuid_equal(&err.aggregate_id, &id));
    counter_context_free(a);
    counter_context_free(b);
    counter_context_free(c);
}

static void test_memory_context_load_with_snapshot(void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    crecord(c, counter_add(10));
    save_ok(store, craw(c));
    /* replace the snapshot (same version) with another state: a load that
     * uses it shows that state */
    counter fake = {id, 1000, 77};
    es_buf buf = {0};
    CHECK(counter_type.state_encode(&fake, &buf, NULL));
    es_snapshot snap = {id, 1, 1, buf.data, buf.len};
    es_txn *txn = fixture_begin(store);
    CHECK(es_txn_store_snapshot(txn, &snap, NULL));
    commit(txn);
    es_buf_free(&buf);
    counter_context *l = cload(store, &id);
    assert_int_equal(counter_state(l)->result, 1000);
    assert_int_equal(counter_version(l), 1);
    counter_context_free(l);
    /* events after the snapshot are applied on top of it */
    crecord(c, counter_add(5));
    /* c's save writes a new snapshot; keep the old one by saving the
     * events through a type that writes its snapshot elsewhere */
    es_aggregate_type other_sv = counter_type;
    other_sv.snapshot_version = 9;
    txn = fixture_begin(store);
    counter_event e5;
    CHECK(counter_event_decode(es_context_uncommitted(craw(c), 0), &e5,
                               NULL));
    es_context *via = NULL;
    CHECK(es_context_load(txn, &other_sv, &id, &via, NULL));
    CHECK(es_context_record(via, &e5, NULL));
    CHECK(es_context_save(txn, via, NULL));
    commit(txn);
    es_context_free(via);
    l = cload(store, &id);
    assert_int_equal(counter_state(l)->result, 1005);
    assert_int_equal(counter_version(l), 2);
    counter_context_free(l);
    counter_context_free(c);
}

static void test_memory_regenerate_side_effects_specific_event(void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    counter_event add = counter_add(100);
    crecord(c, add);
    crecord(c, counter_multiply(2));
    save_ok(store, craw(c));
    const es_side_effect *original = NULL;
    es_side_effect_list *stored = NULL;
    es_txn *txn = fixture_begin(store);
    CHECK(es_txn_list_side_effects(txn, &id, &stored, NULL));
    for (size_t i = 0; i < stored->count; i++)
        if (es_uuid_equal(&stored->items[i].event_id, &add.event_id))
            original = &stored->items[i];
    assert_non_null(original);

    es_side_effect_list *list = NULL;
    CHECK(es_context_regenerate_side_effects(txn, &counter_type, &id,
                                             &add.event_id, &list, NULL));
    assert_non_null(list);
    assert_int_equal(list->count, 1);
    counter_side_effect se;
    CHECK(counter_side_effect_decode(&list->items[0], &se, NULL));
    assert_int_equal(se.kind, COUNTER_LOG_OPERATION);
    assert_string_equal(se.text, "Add 100");
    /* the same id as the stored one: a handler can act once */
    assert_true(es_uuid_equal(&list->items[0].id, &original->id));
    assert_int_equal(list->items[0].len, original->len);
    assert_memory_equal(list->items[0].data, original->data, original->len);
    es_side_effect_list_free(list);
    es_side_effect_list_free(stored);
    es_txn_rollback(txn);
    assert_int_equal(es_memory_store_event_count(store), 3); /* no writes */
    counter_context_free(c);
}

static void test_memory_regenerate_side_effects_event_not_found(void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    counter_event mul = counter_multiply(3);
    crecord(c, mul);
    save_ok(store, craw(c));
    counter_context_free(c);
    es_txn *txn = fixture_begin(store);
    es_side_effect_list *list = NULL;
    es_uuid unknown = fixture_new_id();
    CHECK(es_context_regenerate_side_effects(txn, &counter_type, &id,
                                             &unknown, &list, NULL));
    assert_null(list);
    /* unknown aggregate */
    CHECK(es_context_regenerate_side_effects(txn, &counter_type, &unknown,
                                             &mul.event_id, &list, NULL));
    assert_null(list);
    /* an event without side effects */
    CHECK(es_context_regenerate_side_effects(txn, &counter_type, &id,
                                             &mul.event_id, &list, NULL));
    assert_null(list);
    es_txn_rollback(txn);
}

static void test_memory_complete_counter_workflow(void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    crecord(c, counter_add(100));
    crecord(c, counter_subtract(25));
    crecord(c, counter_multiply(2));
    crecord(c, counter_add(50));
    assert_int_equal(es_context_side_effect_count(craw(c)), 5);
    save_ok(store, craw(c));
    counter_context_free(c);
    c = cload(store, &id);
    assert_int_equal(counter_state(c)->result, 200);
    assert_int_equal(counter_state(c)->operations_count, 4);
    assert_int_equal(counter_version(c), 4);
    counter_context_free(c);
    assert_int_equal(fixture_side_effect_count(store, &id), 5);
}

static void test_memory_error_handling_and_recovery(void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    crecord(c, counter_add(10));
    counter_event bad = counter_multiply(0);
    assert_int_equal(counter_record(c, &bad, NULL), ES_EAPPLY);
    crecord(c, counter_multiply(3));
    save_ok(store, craw(c));
    counter_context_free(c);
    c = cload(store, &id);
    assert_int_equal(counter_state(c)->result, 30);
    assert_int_equal(counter_version(c), 2);
    counter_context_free(c);
}

static void test_memory_in_memory_repository_default(void **state)
{
    (void)state;
    es_store *store = NULL;
    CHECK(es_memory_store_open(&store, NULL));
    assert_int_equal(es_memory_store_event_count(store), 0);
    assert_int_equal(fixture_side_effect_count(store, NULL), 0);
    assert_int_equal(es_store_close(store), 0);
    assert_int_equal(es_store_close(NULL), 0);
    assert_int_equal(es_memory_store_event_count(NULL), 0);
    assert_int_equal(es_memory_store_open(NULL, NULL), ES_EINVAL);
}

/* ==== snapshots.rs (Account) ==== */

static void test_memory_snapshots_are_saved_automatically(void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 0);
    account s;
    uint64_t version = 0;
    CHECK(get_account_snapshot(store, es_context_aggregate_id(araw(a)), 2, &s,
                               &version));
    assert_int_equal(s.balance, account_state(a)->balance);
    assert_string_equal(s.email, account_state(a)->email);
    assert_true(es_uuid_equal(&s.account_id, &account_state(a)->account_id));
    assert_int_equal(version, account_version(a));
    free(s.email);
    account_context_free(a);
}

static void test_memory_aggregate_is_rebuilt_if_snapshots_are_missing(
    void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 20);
    es_uuid id = *es_context_aggregate_id(araw(a));
    delete_snapshots(store, &id);
    account_context *l = aload(store, &id);
    assert_int_equal(account_state(l)->balance, 120);
    assert_int_equal(account_version(l), 2);
    account_context_free(l);
    account s;
    /* the load did not recreate it */
    assert_int_equal(get_account_snapshot(store, &id, 2, &s, NULL),
                     ES_ENOTFOUND);
    account_context_free(a);
}

static void test_memory_snapshots_are_successfully_saved_when_new_event_is_applied(
    void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 0);
    es_uuid id = *es_context_aggregate_id(araw(a));
    delete_snapshots(store, &id);
    arecord(a, account_add(50));
    save_ok(store, araw(a));
    account s;
    uint64_t version;
    CHECK(get_account_snapshot(store, &id, 2, &s, &version));
    assert_int_equal(s.balance, 150);
    assert_int_equal(version, 2);
    free(s.email);
    account_context_free(a);
}

static void test_memory_snapshots_are_rebuilt_if_snapshot_version_is_different(
    void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 0);
    es_uuid id = *es_context_aggregate_id(araw(a));
    /* the only snapshot now has snapshot version 0 and balance 0 */
    delete_snapshots(store, &id);
    put_account_snapshot(store, &id, 0, 1, 0);
    account_context *l = aload(store, &id);
    assert_int_equal(account_state(l)->balance, 100);
    account_context_free(l);
    account_context_free(a);
}

static void test_memory_corrupt_snapshot_is_ignored(void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 5);
    es_uuid id = *es_context_aggregate_id(araw(a));
    static const uint8_t junk[][6] = {{0}, {0xff, 0xff, 0xff, 0xff, 0, 1}};
    for (size_t i = 0; i < 2; i++) {
        es_snapshot snap = {id, 2, ACCOUNT_SNAPSHOT_VERSION, junk[i],
                            i == 0 ? 0 : sizeof junk[i]};
        es_txn *txn = fixture_begin(store);
        CHECK(es_txn_store_snapshot(txn, &snap, NULL));
        commit(txn);
        account_context *l = aload(store, &id);
        assert_int_equal(account_state(l)->balance, 105);
        assert_string_equal(account_state(l)->email, ACCOUNT_DEFAULT_EMAIL);
        assert_int_equal(account_version(l), 2);
        account_context_free(l);
    }
    /* a counter snapshot that is too short */
    counter_context *c = NULL;
    es_uuid cid;
    CHECK(counter_start(&c, &cid, NULL));
    crecord(c, counter_add(3));
    save_ok(store, craw(c));
    counter_context_free(c);
    es_snapshot snap = {cid, 1, 1, junk[1], 3};
    es_txn *txn = fixture_begin(store);
    CHECK(es_txn_store_snapshot(txn, &snap, NULL));
    commit(txn);
    c = cload(store, &cid);
    assert_int_equal(counter_state(c)->result, 3);
    counter_context_free(c);
    account_context_free(a);
}

/* A snapshot that claims a version the stream does not have (ahead of
 * it) is not a usable cache: the stream is replayed, and the next event
 * gets the version after the stream's last one, not a gap. */
static void test_memory_snapshot_ahead_of_stream_is_ignored(void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 5);
    es_uuid id = *es_context_aggregate_id(araw(a));
    account_context_free(a);
    put_account_snapshot(store, &id, ACCOUNT_SNAPSHOT_VERSION, 10, 999);
    a = aload(store, &id);
    assert_int_equal(account_state(a)->balance, 105);
    assert_int_equal(account_version(a), 2);
    arecord(a, account_add(1));
    save_ok(store, araw(a));
    assert_int_equal(account_version(a), 3);
    account_context_free(a);
    fixture_stream s;
    CHECK(fixture_stream_read_store(store, &id, &s, NULL));
    assert_int_equal(s.count, 4);
    assert_true(fixture_stream_gap_free(&s));
    fixture_stream_free(&s);
    a = aload(store, &id);
    assert_int_equal(account_state(a)->balance, 106);
    account_context_free(a);
}

static void test_memory_multiple_snapshot_versions_can_coexist(void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 0);
    es_uuid id = *es_context_aggregate_id(araw(a));
    arecord(a, account_remove(10));
    save_ok(store, araw(a));
    put_account_snapshot(store, &id, 1, 2, 500);
    account s;
    CHECK(get_account_snapshot(store, &id, 1, &s, NULL));
    assert_int_equal(s.balance, 500);
    free(s.email);
    CHECK(get_account_snapshot(store, &id, 2, &s, NULL));
    assert_int_equal(s.balance, 90);
    free(s.email);
    account_context *l = aload(store, &id);
    assert_int_equal(account_state(l)->balance, 90);
    account_context_free(l);
    account_context_free(a);
}

static void test_memory_same_snapshot_version_updates_existing_snapshot(
    void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 0);
    es_uuid id = *es_context_aggregate_id(araw(a));
    arecord(a, account_add(50));
    save_ok(store, araw(a));
    account s;
    uint64_t version;
    CHECK(get_account_snapshot(store, &id, 2, &s, &version));
    assert_int_equal(s.balance, 150);
    assert_int_equal(version, 2);
    free(s.email);
    /* a late writer never moves it backwards */
    put_account_snapshot(store, &id, 2, 1, -1);
    CHECK(get_account_snapshot(store, &id, 2, &s, &version));
    assert_int_equal(s.balance, 150);
    assert_int_equal(version, 2);
    free(s.email);
    account_context_free(a);
}

static void test_memory_old_snapshots_are_ignored_when_loading(void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 0);
    es_uuid id = *es_context_aggregate_id(araw(a));
    arecord(a, account_remove(10));
    save_ok(store, araw(a));
    put_account_snapshot(store, &id, 0, 2, 999);
    put_account_snapshot(store, &id, 1, 2, 888);
    account_context *l = aload(store, &id);
    assert_int_equal(account_state(l)->balance, 90);
    account_context_free(l);
    account_context_free(a);
}

/* ==== validation.rs ==== */

static void test_memory_idempotency_error_if_event_with_different_content_is_saved(
    void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 0, 0);
    account_event add = account_add(10);
    CHECK(account_record(a, &add, NULL));
    save_ok(store, araw(a));
    account_event other = add;
    other.amount = 20;
    CHECK(account_record(a, &other, NULL));
    es_error err = {0};
    assert_int_equal(fixture_save_commit(store, araw(a), &err),
                     ES_EIDEMPOTENCY);
    const es_event *saved = NULL, *attempted = NULL;
    CHECK(es_context_idempotency_clash(araw(a), &saved, &attempted));
    account_event x, y;
    CHECK(account_event_decode(saved, &x, NULL));
    CHECK(account_event_decode(attempted, &y, NULL));
    assert_true(es_uuid_equal(&x.event_id, &add.event_id));
    assert_true(es_uuid_equal(&y.event_id, &add.event_id));
    assert_int_equal(x.amount, 10);
    assert_int_equal(y.amount, 20);
    account_event_free(&x);
    account_event_free(&y);
    account_context_free(a);
}

static void test_memory_no_idempotency_error_if_event_with_same_content_is_saved(
    void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 0, 0);
    es_uuid id = *es_context_aggregate_id(araw(a));
    account_event add = account_add(10);
    CHECK(account_record(a, &add, NULL));
    save_ok(store, araw(a));
    CHECK(account_record(a, &add, NULL));
    save_ok(store, araw(a));
    assert_int_equal(account_state(a)->balance, 10);
    assert_int_equal(account_version(a), 1);
    account_context_free(a);
    a = aload(store, &id);
    assert_int_equal(account_state(a)->balance, 10);
    account_context_free(a);
    assert_int_equal(fixture_side_effect_count(store, &id), 2);
}

static void test_memory_optimistic_concurrency_error_if_aggregate_was_updated_by_another(
    void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 0, 0);
    es_uuid id = *es_context_aggregate_id(araw(a));
    account_context *copy = NULL;
    CHECK(account_clone(a, &copy, NULL));
    arecord(a, account_add(1));
    save_ok(store, araw(a));
    arecord(copy, account_add(2));
    es_error err = {0};
    assert_int_equal(fixture_save_commit(store, araw(copy), &err),
                     ES_ECONFLICT);
    assert_true(es_uuid_equal(&err.aggregate_id, &id));
    assert_int_equal(err.version, 1);
    account_context_free(copy);
    account_context_free(a);
}

/* ==== side_effect.rs ==== */

static void test_memory_side_effect_is_correctly_stored(void **state)
{
    es_store *store = *state;
    es_uuid id = fixture_new_id();
    account_event open;
    CHECK(account_open(&open, &id, "someone@example.com", 100));
    account_context *a = NULL;
    CHECK(account_record_new(&id, &open, &a, NULL));
    save_ok(store, araw(a));
    es_txn *txn = fixture_begin(store);
    es_side_effect_list *list = NULL;
    CHECK(es_txn_list_side_effects(txn, &id, &list, NULL));
    assert_int_equal(list->count, 1);
    const es_side_effect *row = &list->items[0];
    es_uuid want = fixture_derive_id(&open.event_id, ACCOUNT_TAG_EMAIL);
    assert_true(es_uuid_equal(&row->id, &want));
    assert_true(es_uuid_equal(&row->event_id, &open.event_id));
    assert_true(es_uuid_equal(&row->aggregate_id, &id));
    assert_int_equal(row->kind, ACCOUNT_SEND_EMAIL);
    account_side_effect se;
    CHECK(account_side_effect_decode(row, &se, NULL));
    assert_true(es_uuid_equal(&se.id, &want));
    assert_string_equal(se.address, "someone@example.com");
    char text[ES_UUID_STRLEN + 1];
    assert_non_null(strstr(se.content, es_uuid_format(&id, text)));
    assert_non_null(strstr(se.content, "starting balance 100"));
    account_side_effect_free(&se);
    es_side_effect_list_free(list);
    es_txn_rollback(txn);
    account_event_free(&open);
    account_context_free(a);
}

static void test_memory_multiple_side_effects_are_stored_correctly(
    void **state)
{
    es_store *store = *state;
    es_uuid id = fixture_new_id();
    account_event open;
    CHECK(account_open(&open, &id, ACCOUNT_DEFAULT_EMAIL, 0));
    account_context *a = NULL;
    CHECK(account_record_new(&id, &open, &a, NULL));
    account_event add = account_add(50);
    CHECK(account_record(a, &add, NULL));
    save_ok(store, araw(a));
    es_txn *txn = fixture_begin(store);
    es_side_effect_list *list = NULL;
    CHECK(es_txn_list_side_effects(txn, &id, &list, NULL));
    assert_int_equal(list->count, 2);
    assert_true(fixture_side_effect_ids_distinct(list));
    const es_side_effect *row = &list->items[1];
    assert_true(es_uuid_equal(&row->event_id, &add.event_id));
    account_side_effect se;
    CHECK(account_side_effect_decode(row, &se, NULL));
    assert_int_equal(se.kind, ACCOUNT_PUBLISH_MESSAGE);
    es_uuid want = fixture_derive_id(&add.event_id, ACCOUNT_TAG_PUBLISH);
    assert_true(es_uuid_equal(&se.id, &want));
    assert_string_equal(se.message, "50");
    account_side_effect_free(&se);
    es_side_effect_list_free(list);
    es_txn_rollback(txn);
    account_event_free(&open);
    account_context_free(a);
}

static void test_memory_side_effect_regeneration_works_correctly(void **state)
{
    es_store *store = *state;
    es_uuid id = fixture_new_id();
    account_event open;
    CHECK(account_open(&open, &id, ACCOUNT_DEFAULT_EMAIL, 100));
    account_context *a = NULL;
    CHECK(account_record_new(&id, &open, &a, NULL));
    account_event add = account_add(50), rem = account_remove(30);
    CHECK(account_record(a, &add, NULL));
    CHECK(account_record(a, &rem, NULL));
    save_ok(store, araw(a));
    account_context_free(a);

    es_txn *txn = fixture_begin(store);
    es_side_effect_list *list = NULL;
    account_side_effect se;
    char text[ES_UUID_STRLEN + 1];
    CHECK(es_context_regenerate_side_effects(txn, &account_type, &id,
                                             &open.event_id, &list, NULL));
    assert_int_equal(list->count, 1);
    CHECK(account_side_effect_decode(&list->items[0], &se, NULL));
    assert_int_equal(se.kind, ACCOUNT_SEND_EMAIL);
    assert_non_null(strstr(se.content, es_uuid_format(&id, text)));
    assert_non_null(strstr(se.content, "100"));
    account_side_effect_free(&se);
    es_side_effect_list_free(list);

    CHECK(es_context_regenerate_side_effects(txn, &account_type, &id,
                                             &add.event_id, &list, NULL));
    assert_int_equal(list->count, 1);
    CHECK(account_side_effect_decode(&list->items[0], &se, NULL));
    assert_int_equal(se.kind, ACCOUNT_PUBLISH_MESSAGE);
    assert_string_equal(se.message, "50");
    account_side_effect_free(&se);
    es_side_effect_list_free(list);

    CHECK(es_context_regenerate_side_effects(txn, &account_type, &id,
                                             &rem.event_id, &list, NULL));
    assert_null(list);
    es_uuid unknown = fixture_new_id();
    CHECK(es_context_regenerate_side_effects(txn, &account_type, &id,
                                             &unknown, &list, NULL));
    assert_null(list);
    CHECK(es_context_regenerate_side_effects(txn, &account_type, &unknown,
                                             &open.event_id, &list, NULL));
    assert_null(list);
    es_txn_rollback(txn);
    account_event_free(&open);
}

/* ==== multi_aggregate.rs ==== */

static void multi_aggregate(es_store *store, bool do_commit,
                            es_uuid *account_id, es_uuid *order_id)
{
    *account_id = fixture_new_id();
    *order_id = fixture_new_id();
    account_event open;
    CHECK(account_open(&open, account_id, ACCOUNT_DEFAULT_EMAIL, 1000));
    account_context *a = NULL;
    CHECK(account_record_new(account_id, &open, &a, NULL));
    account_event_free(&open);
    order_event created = order_created(order_id, account_id, 500);
    order_context *o = NULL;
    CHECK(order_record_new(order_id, &created, &o, NULL));
    es_txn *txn = fixture_begin(store);
    CHECK(account_save(txn, a, NULL));
    CHECK(order_save(txn, o, NULL));
    if (do_commit)
        commit(txn);
    else
        es_txn_rollback(txn);
    account_context_free(a);
    order_context_free(o);
}

static void test_memory_multi_aggregate_transaction_commit_test(void **state)
{
    es_store *store = *state;
    es_uuid account_id, order_id;
    multi_aggregate(store, true, &account_id, &order_id);
    account_context *a = aload(store, &account_id);
    assert_int_equal(account_state(a)->balance, 1000);
    account_context_free(a);
    order_context *o = NULL;
    CHECK(order_store_load(store, &order_id, &o, NULL));
    assert_int_equal(order_state(o)->total_amount, 500);
    assert_int_equal(order_state(o)->status, ORDER_PENDING);
    assert_true(es_uuid_equal(&order_state(o)->customer_id, &account_id));
    order_context_free(o);
}

static void test_memory_multi_aggregate_transaction_rollback_test(
    void **state)
{
    es_store *store = *state;
    es_uuid account_id, order_id;
    multi_aggregate(store, false, &account_id, &order_id);
    account_context *a = NULL;
    order_context *o = NULL;
    assert_int_equal(account_store_load(store, &account_id, &a, NULL),
                     ES_ENOTFOUND);
    assert_int_equal(order_store_load(store, &order_id, &o, NULL),
                     ES_ENOTFOUND);
    assert_int_equal(es_memory_store_event_count(store), 0);
    assert_int_equal(fixture_side_effect_count(store, NULL), 0);
}

static void test_memory_multi_aggregate_transaction_with_mixed_side_effects(
    void **state)
{
    es_store *store = *state;
    es_uuid account_id = fixture_new_id(), order_id = fixture_new_id();
    account_event open;
    CHECK(account_open(&open, &account_id, ACCOUNT_DEFAULT_EMAIL, 1000));
    account_context *a = NULL;
    CHECK(account_record_new(&account_id, &open, &a, NULL));
    account_event_free(&open);
    arecord(a, account_add(500));
    order_event created = order_created(&order_id, &account_id, 500);
    order_context *o = NULL;
    CHECK(order_record_new(&order_id, &created, &o, NULL));
    order_event confirmed = order_event_of(ORDER_CONFIRMED_EVENT);
    CHECK(order_record(o, &confirmed, NULL));
    es_txn *txn = fixture_begin(store);
    CHECK(account_save(txn, a, NULL));
    CHECK(order_save(txn, o, NULL));
    commit(txn);
    account_context_free(a);
    order_context_free(o);

    a = aload(store, &account_id);
    assert_int_equal(account_state(a)->balance, 1500);
    account_context_free(a);
    CHECK(order_store_load(store, &order_id, &o, NULL));
    assert_int_equal(order_state(o)->status, ORDER_CONFIRMED);
    order_context_free(o);
    assert_int_equal(fixture_side_effect_count(store, &account_id), 2);
    assert_int_equal(fixture_side_effect_count(store, &order_id), 2);
    es_txn *r = fixture_begin(store);
    es_side_effect_list *list = NULL;
    CHECK(es_txn_list_side_effects(r, &order_id, &list, NULL));
    order_side_effect se;
    CHECK(order_side_effect_decode(&list->items[0], &se, NULL));
    assert_int_equal(se.kind, ORDER_SEND_CONFIRMATION_EMAIL);
    assert_true(es_uuid_equal(&se.customer_id, &account_id));
    CHECK(order_side_effect_decode(&list->items[1], &se, NULL));
    assert_int_equal(se.kind, ORDER_NOTIFY_WAREHOUSE);
    assert_true(es_uuid_equal(&se.order_id, &order_id));
    es_side_effect_list_free(list);
    es_txn_rollback(r);
}

static void test_memory_order_status_machine(void **state)
{
    es_store *store = *state;
    es_uuid order_id = fixture_new_id(), customer = fixture_new_id();
    order_event created = order_created(&order_id, &customer, 10);
    order_context *o = NULL;
    CHECK(order_record_new(&order_id, &created, &o, NULL));
    es_error err = {0};
    order_event shipped = order_event_of(ORDER_SHIPPED_EVENT);
    assert_int_equal(order_record(o, &shipped, &err), ES_EAPPLY);
    assert_non_null(strstr(err.message, "InvalidTransition"));
    static const order_event_kind path[] = {
        ORDER_CONFIRMED_EVENT, ORDER_SHIPPED_EVENT, ORDER_DELIVERED_EVENT};
    static const order_status want[] = {ORDER_CONFIRMED, ORDER_SHIPPED,
                                        ORDER_DELIVERED};
    for (size_t i = 0; i < 3; i++) {
        order_event e = order_event_of(path[i]);
        CHECK(order_record(o, &e, NULL));
        assert_int_equal(order_state(o)->status, want[i]);
    }
    order_event cancel = order_event_of(ORDER_CANCELLED_EVENT);
    assert_int_equal(order_record(o, &cancel, &err), ES_EAPPLY);
    assert_non_null(strstr(err.message, "AlreadyFinalized"));
    save_ok(store, order_context_raw(o));
    order_context_free(o);

    /* a pending order can be cancelled, once */
    es_uuid second = fixture_new_id();
    order_event c2 = order_created(&second, &customer, 20);
    CHECK(order_record_new(&second, &c2, &o, NULL));
    CHECK(order_record(o, &cancel, NULL));
    assert_int_equal(order_state(o)->status, ORDER_CANCELLED);
    order_event again = order_event_of(ORDER_CANCELLED_EVENT);
    assert_int_equal(order_record(o, &again, &err), ES_EAPPLY);
    assert_non_null(strstr(err.message, "AlreadyFinalized"));
    order_context_free(o);

    CHECK(order_store_load(store, &order_id, &o, NULL));
    assert_int_equal(order_state(o)->status, ORDER_DELIVERED);
    assert_int_equal(order_version(o), 3);
    order_context_free(o);
}

/* ==== postgres.rs, on the memory store ==== */

static void test_memory_aggregate_is_successfully_saved_and_loaded(
    void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 25);
    account_context *l = aload(store, es_context_aggregate_id(araw(a)));
    assert_int_equal(account_state(l)->balance, account_state(a)->balance);
    assert_string_equal(account_state(l)->email, account_state(a)->email);
    assert_true(es_uuid_equal(&account_state(l)->account_id,
                              &account_state(a)->account_id));
    assert_int_equal(account_version(l), account_version(a));
    account_context_free(l);
    account_context_free(a);
}

static void test_memory_aggregate_is_not_saved_if_no_events_are_applied(
    void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 0);
    es_uuid id = *es_context_aggregate_id(araw(a));
    size_t events = es_memory_store_event_count(store);
    size_t effects = fixture_side_effect_count(store, NULL);
    /* delete the snapshot: a save that writes anything would put it back */
    delete_snapshots(store, &id);
    save_ok(store, araw(a));
    account_context *l = aload(store, &id);
    save_ok(store, araw(l));
    account_context_free(l);
    assert_int_equal(es_memory_store_event_count(store), events);
    assert_int_equal(fixture_side_effect_count(store, NULL), effects);
    account s;
    assert_int_equal(get_account_snapshot(store, &id, 2, &s, NULL),
                     ES_ENOTFOUND);
    account_context_free(a);
}

static void test_memory_transaction_rollback_discards_changes(void **state)
{
    es_store *store = *state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 10);
    account_context *a = NULL;
    CHECK(account_builder_build(&b, &a, NULL));
    es_txn *txn = fixture_begin(store);
    CHECK(account_save(txn, a, NULL));
    es_txn_rollback(txn);
    account_context *l = NULL;
    assert_int_equal(account_store_load(store, &b.account_id, &l, NULL),
                     ES_ENOTFOUND);
    account_context_free(a);
}

static void test_memory_transaction_isolates_changes_until_commit(
    void **state)
{
    es_store *store = *state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 50);
    account_context *a = NULL;
    CHECK(account_builder_build(&b, &a, NULL));
    es_txn *txn = fixture_begin(store);
    CHECK(account_save(txn, a, NULL));
    account_context *l = NULL;
    assert_int_equal(account_store_load(store, &b.account_id, &l, NULL),
                     ES_ENOTFOUND);
    commit(txn);
    l = aload(store, &b.account_id);
    assert_int_equal(account_state(l)->balance, 50);
    account_context_free(l);
    account_context_free(a);
}

static void test_memory_transaction_handles_invalid_data_gracefully(
    void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 0);
    es_uuid id = *es_context_aggregate_id(araw(a));
    account_event open;
    CHECK(account_open(&open, &id, "again@example.com", 5));
    es_error err = {0};
    assert_int_equal(account_record(a, &open, &err), ES_EAPPLY);
    account_event_free(&open);
    assert_int_equal(account_state(a)->balance, 100);
    assert_int_equal(es_context_uncommitted_count(araw(a)), 0);
    save_ok(store, araw(a));
    account_context *l = aload(store, &id);
    assert_int_equal(account_state(l)->balance, 100);
    assert_string_equal(account_state(l)->email, ACCOUNT_DEFAULT_EMAIL);
    account_context_free(l);
    account_context_free(a);
}

static void test_memory_transaction_handles_multiple_operations_correctly(
    void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 100, 0);
    es_uuid id = *es_context_aggregate_id(araw(a));
    es_txn *txn = fixture_begin(store);
    arecord(a, account_add(50));
    CHECK(account_save(txn, a, NULL));
    arecord(a, account_remove(25));
    CHECK(account_save(txn, a, NULL));
    commit(txn);
    account_context_free(a);
    a = aload(store, &id);
    assert_int_equal(account_state(a)->balance, 125);
    assert_int_equal(account_version(a), 3);
    account_context_free(a);
}

static void test_memory_transaction_handles_multiple_aggregates_correctly(
    void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 10, 0);
    account_context *b = saved_account(store, 20, 0);
    es_txn *txn = fixture_begin(store);
    arecord(a, account_add(1));
    arecord(b, account_add(2));
    CHECK(account_save(txn, a, NULL));
    CHECK(account_save(txn, b, NULL));
    commit(txn);
    account_context *la = aload(store, es_context_aggregate_id(araw(a)));
    account_context *lb = aload(store, es_context_aggregate_id(araw(b)));
    assert_int_equal(account_state(la)->balance, 11);
    assert_int_equal(account_state(lb)->balance, 22);
    account_context_free(la);
    account_context_free(lb);
    account_context_free(a);
    account_context_free(b);
}

static void test_memory_repository_error_handling_and_recovery(void **state)
{
    es_store *store = *state;
    account_context *a = saved_account(store, 0, 0);
    es_uuid id = *es_context_aggregate_id(araw(a));
    account_context_free(a);
    /* a change rolled back */
    a = aload(store, &id);
    arecord(a, account_add(1000));
    es_txn *txn = fixture_begin(store);
    CHECK(account_save(txn, a, NULL));
    es_txn_rollback(txn);
    account_context_free(a);
    /* reload: the original; a new event commits */
    a = aload(store, &id);
    assert_int_equal(account_state(a)->balance, 0);
    arecord(a, account_add(75));
    save_ok(store, araw(a));
    account_context_free(a);
    a = aload(store, &id);
    assert_int_equal(account_state(a)->balance, 75);
    assert_int_equal(account_version(a), 1);
    account_context_free(a);
}

static void test_memory_repository_load_works_without_transaction(
    void **state)
{
    es_store *store = *state;
    account_builder b;
    account_builder_init(&b);
    account_builder_with_remove(account_builder_with_add(&b, 100), 20);
    CHECK(account_builder_save(&b, store, NULL, NULL));
    account_context *x = aload(store, &b.account_id);
    es_txn *txn = fixture_begin(store);
    account_context *y = NULL;
    CHECK(account_load(txn, &b.account_id, &y, NULL));
    es_txn_rollback(txn);
    assert_int_equal(account_state(x)->balance, 80);
    assert_int_equal(account_state(y)->balance, 80);
    assert_int_equal(account_version(x), account_version(y));
    account_context_free(x);
    account_context_free(y);
}

static int check_order(void *ud, const es_event *ev)
{
    uint64_t *next = ud;
    if (ev->version != *next) return ES_EDECODE;
    (*next)++;
    return 0;
}

#define LONG_STREAM 150000 /* as the reference, in one save */

static void test_memory_streaming_returns_events_in_version_order(
    void **state)
{
    es_store *store = *state;
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    for (int i = 1; i < LONG_STREAM; i++) crecord(c, counter_add(1));
    save_ok(store, craw(c));
    counter_context_free(c);
    es_txn *txn = fixture_begin(store);
    uint64_t next = 0;
    CHECK(es_txn_stream(txn, &id, 0, check_order, &next, NULL));
    assert_int_equal(next, LONG_STREAM);
    es_txn_rollback(txn);
    delete_snapshots(store, &id); /* replay it all */
    c = cload(store, &id);
    assert_int_equal(counter_version(c), LONG_STREAM - 1);
    assert_int_equal(counter_state(c)->result, LONG_STREAM - 1);
    counter_context_free(c);
}

/* ==== bad input ==== */

/* A kind the codec rejects, stored by a type whose codec accepts it: the
 * load says ES_EDECODE and names the event. */
static int32_t odd_kind(const void *event)
{
    const counter_event *e = event;
    return e->kind == COUNTER_SUBTRACT ? 99 : (int32_t)e->kind;
}

static void test_memory_unknown_event_kind_in_store_is_decode_error(
    void **state)
{
    es_store *store = *state;
    es_aggregate_type writer = counter_type;
    writer.event_kind = odd_kind;
    writer.side_effects = NULL;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id), sub = counter_subtract(1);
    es_context *c = NULL;
    es_error err = {0};
    CHECK(es_context_record_new(&writer, &id, &reset, &c, NULL));
    CHECK(es_context_record(c, &sub, NULL));
    save_ok(store, c);
    es_context_free(c);
    delete_snapshots(store, &id);

    counter_context *l = NULL;
    assert_int_equal(counter_store_load(store, &id, &l, &err), ES_EDECODE);
    assert_null(l);
    assert_true(es_uuid_equal(&err.event_id, &sub.event_id));
    assert_true(es_uuid_equal(&err.aggregate_id, &id));
    es_txn *txn = fixture_begin(store);
    es_side_effect_list *list = NULL;
    assert_int_equal(es_context_regenerate_side_effects(
                         txn, &counter_type, &id, &sub.event_id, &list, &err),
                     ES_EDECODE);
    assert_null(list);
    es_event *ev = NULL;
    CHECK(es_txn_get_event(txn, &id, &sub.event_id, &ev, NULL));
    counter_event out;
    assert_int_equal(counter_event_decode(ev, &out, &err), ES_EDECODE);
    es_free(ev);
    es_txn_rollback(txn);
}

/* A type of another name can neither read nor write an existing
 * aggregate: ES_EWRONGTYPE (test_pg_types covers every read). */
static void test_memory_other_type_on_same_aggregate_is_refused(void **state)
{
    es_store *store = *state;
    es_uuid id;
    counter_context *c = NULL;
    CHECK(counter_start(&c, &id, NULL));
    save_ok(store, craw(c));
    counter_context_free(c);
    es_aggregate_type other = counter_type;
    other.name = "not_a_counter";
    es_txn *txn = fixture_begin(store);
    es_context *o = NULL;
    es_error err = {0};
    assert_int_equal(es_context_load(txn, &other, &id, &o, &err),
                     ES_EWRONGTYPE);
    assert_null(o);
    counter_event reset = counter_reset(&id);
    CHECK(es_context_record_new(&other, &id, &reset, &o, NULL));
    counter_event add = counter_add(1);
    CHECK(es_context_record(o, &add, NULL));
    assert_int_equal(es_context_save(txn, o, &err), ES_EWRONGTYPE);
    assert_non_null(strstr(err.message, "counter"));
    assert_int_equal(es_context_uncommitted_count(o), 2);
    es_txn_rollback(txn);
    es_context_free(o);
    assert_int_equal(es_memory_store_event_count(store), 1);

    /* also when the aggregate exists only in this transaction */
    es_uuid fresh_id;
    CHECK(counter_start(&c, &fresh_id, NULL));
    txn = fixture_begin(store);
    CHECK(counter_save(txn, c, NULL));
    assert_int_equal(es_context_load(txn, &other, &fresh_id, &o, &err),
                     ES_EWRONGTYPE);
    counter_event again = counter_reset(&fresh_id);
    CHECK(es_context_record_new(&other, &fresh_id, &again, &o, NULL));
    assert_int_equal(es_context_save(txn, o, &err), ES_EWRONGTYPE);
    assert_non_null(strstr(err.message, "counter"));
    CHECK(es_txn_commit(txn, NULL));
    es_context_free(o);
    counter_context_free(c);
    fixture_stream s;
    CHECK(fixture_stream_read_store(store, &fresh_id, &s, NULL));
    assert_int_equal(s.count, 1);
    fixture_stream_free(&s);
}

/* Events whose payload is empty (everything is in the kind) and a
 * snapshot of zero bytes go through save, load and get_event. */
typedef struct tick { int64_t n; } tick;
typedef struct tick_event { es_uuid id; } tick_event;

static es_uuid tick_event_id(const void *e)
{
    return ((const tick_event *)e)->id;
}
static int32_t tick_kind(const void *e)
{
    (void)e;
    return 1;
}
static int tick_apply(void *state, const void *event, es_error *err)
{
    (void)event;
    (void)err;
    ((tick *)state)->n++;
    return 0;
}
static int tick_encode_nothing(const void *v, es_buf *out, es_error *err)
{
    (void)v;
    (void)out;
    (void)err;
    return 0;
}
static int tick_decode(int32_t kind, const uint8_t *data, size_t len,
                       void *event, es_error *err)
{
    (void)data;
    (void)event;
    (void)err;
    return kind == 1 && len == 0 ? 0 : ES_EDECODE;
}
static int tick_state_decode(const uint8_t *data, size_t len, void *state,
                             es_error *err)
{
    (void)data;
    (void)state;
    (void)err;
    return len == 0 ? ES_EDECODE : 0; /* an empty snapshot is not usable */
}

static const es_aggregate_type tick_type = {
    .name = "tick",
    .snapshot_version = 1,
    .state_size = sizeof(tick),
    .event_size = sizeof(tick_event),
    .event_id = tick_event_id,
    .event_kind = tick_kind,
    .apply_new = tick_apply,
    .apply = tick_apply,
    .state_encode = tick_encode_nothing,
    .state_decode = tick_state_decode,
    .event_encode = tick_encode_nothing,
    .event_decode = tick_decode,
};

static void test_memory_empty_payloads(void **state)
{
    es_store *store = *state;
    es_uuid id = fixture_new_id();
    tick_event e[3] = {{fixture_new_id()}, {fixture_new_id()},
                       {fixture_new_id()}};
    es_context *c = NULL;
    CHECK(es_context_record_new(&tick_type, &id, &e[0], &c, NULL));
    CHECK(es_context_record(c, &e[1], NULL));
    CHECK(es_context_record(c, &e[1], NULL)); /* equal: a no-op */
    CHECK(es_context_record(c, &e[2], NULL));
    assert_int_equal(es_context_uncommitted(c, 1)->len, 0);
    save_ok(store, c);
    es_context_free(c);
    CHECK(es_store_load(store, &tick_type, &id, &c, NULL));
    assert_int_equal(((const tick *)es_context_state(c))->n, 3);
    assert_int_equal(es_context_version(c), 2);
    CHECK(es_context_record(c, &e[2], NULL)); /* stored, equal */
    save_ok(store, c);
    assert_int_equal(es_context_version(c), 2);
    es_context_free(c);
    es_txn *txn = fixture_begin(store);
    es_event *ev = NULL;
    CHECK(es_txn_get_event(txn, &id, &e[2].id, &ev, NULL));
    assert_int_equal(ev->len, 0);
    assert_int_equal(ev->version, 2);
    es_free(ev);
    es_snapshot *snap = NULL;
    CHECK(es_txn_get_snapshot(txn, &id, 1, &snap, NULL));
    assert_int_equal(snap->len, 0);
    es_free(snap);
    es_txn_rollback(txn);
}

static void test_memory_bad_input_store_functions(void **state)
{
    es_store *store = *state;
    es_error err = {0};
    es_txn *txn = NULL;
    es_uuid id = fixture_new_id(), nil = {{0}};
    assert_int_equal(es_store_begin(NULL, &txn, &err), ES_EINVAL);
    assert_int_equal(es_store_begin(store, NULL, &err), ES_EINVAL);
    assert_int_equal(es_txn_commit(NULL, &err), ES_EINVAL);
    es_txn_rollback(NULL);
    txn = fixture_begin(store);
    stream_probe p = {0, 0, 0};
    assert_int_equal(es_txn_stream(NULL, &id, 0, probe_event, &p, &err),
                     ES_EINVAL);
    assert_int_equal(es_txn_stream(txn, NULL, 0, probe_event, &p, &err),
                     ES_EINVAL);
    assert_int_equal(es_txn_stream(txn, &id, 0, NULL, &p, &err), ES_EINVAL);
    es_event *ev = NULL;
    assert_int_equal(es_txn_get_event(NULL, &id, &id, &ev, &err), ES_EINVAL);
    assert_int_equal(es_txn_get_event(txn, NULL, &id, &ev, &err), ES_EINVAL);
    assert_int_equal(es_txn_get_event(txn, &id, NULL, &ev, &err), ES_EINVAL);
    assert_int_equal(es_txn_get_event(txn, &id, &id, NULL, &err), ES_EINVAL);
    es_snapshot *snap = NULL;
    assert_int_equal(es_txn_get_snapshot(NULL, &id, 1, &snap, &err),
                     ES_EINVAL);
    assert_int_equal(es_txn_get_snapshot(txn, NULL, 1, &snap, &err),
                     ES_EINVAL);
    assert_int_equal(es_txn_get_snapshot(txn, &id, 1, NULL, &err),
                     ES_EINVAL);
    uint8_t byte = 1;
    es_snapshot s = {nil, 0, 1, &byte, 1};
    assert_int_equal(es_txn_store_snapshot(txn, &s, &err), ES_EINVAL);
    s.aggregate_id = id;
    s.data = NULL;
    assert_int_equal(es_txn_store_snapshot(txn, &s, &err), ES_EINVAL);
    assert_int_equal(es_txn_store_snapshot(txn, NULL, &err), ES_EINVAL);
    assert_int_equal(es_txn_store_snapshot(NULL, &s, &err), ES_EINVAL);
    assert_int_equal(es_txn_delete_snapshots(NULL, &id, &err), ES_EINVAL);
    assert_int_equal(es_txn_delete_snapshots(txn, NULL, &err), ES_EINVAL);
    es_side_effect_list *list = NULL;
    assert_int_equal(es_txn_list_side_effects(NULL, NULL, &list, &err),
                     ES_EINVAL);
    assert_int_equal(es_txn_list_side_effects(txn, NULL, NULL, &err),
                     ES_EINVAL);
    es_side_effect_list_free(NULL);
    /* a store with an open transaction is not closed */
    assert_int_equal(es_store_close(store), ES_EMISUSE);
    es_txn_rollback(txn);
    assert_int_equal(es_store_close(NULL), 0);
}

static void test_memory_bad_input_uuid_parse(void **state)
{
    (void)state;
    static const char *bad[] = {
        "", "reset-1", "counter-1",
        "00000000-0000-0000-0000-00000000000",
        "00000000-0000-0000-0000-0000000000000",
        "00000000_0000_0000_0000_000000000000",
        "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz",
        " 0190a1b2-c3d4-7e5f-8a6b-1c2d3e4f5a6b",
        "0190a1b2-c3d4-7e5f-8a6b-1c2d3e4f5a6b ",
    };
    es_uuid id = fixture_new_id(), before = id;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(es_uuid_parse(bad[i], &id), ES_EINVAL);
        assert_true(es_uuid_equal(&id, &before));
    }
    /* a nil id parses, but is refused as an aggregate id */
    es_uuid nil;
    CHECK(es_uuid_parse("00000000-0000-0000-0000-000000000000", &nil));
    assert_true(es_uuid_is_nil(&nil));
    counter_event reset = counter_reset(&nil);
    counter_context *c = NULL;
    assert_int_equal(counter_record_new(&nil, &reset, &c, NULL), ES_EINVAL);
    assert_null(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(name)                                                              \
    cmocka_unit_test_setup_teardown(name, fixture_memory_setup,               \
                                    fixture_memory_teardown)
        T(test_memory_repository_load_and_save),
        T(test_memory_repository_aggregate_not_found),
        T(test_memory_repository_transaction_operations),
        T(test_memory_repository_idempotency),
        T(test_memory_repository_idempotency_error),
        T(test_memory_snapshot_version_checking),
        T(test_memory_in_memory_repository_basic_operations),
        T(test_memory_context_save_empty_events),
        T(test_memory_context_save_idempotency_error),
        T(test_memory_context_save_optimistic_concurrency),
        T(test_memory_context_load_with_snapshot),
        T(test_memory_regenerate_side_effects_specific_event),
        T(test_memory_regenerate_side_effects_event_not_found),
        T(test_memory_complete_counter_workflow),
        T(test_memory_error_handling_and_recovery),
        T(test_memory_in_memory_repository_default),
        T(test_memory_snapshots_are_saved_automatically),
        T(test_memory_aggregate_is_rebuilt_if_snapshots_are_missing),
        T(test_memory_snapshots_are_successfully_saved_when_new_event_is_applied),
        T(test_memory_snapshots_are_rebuilt_if_snapshot_version_is_different),
        T(test_memory_corrupt_snapshot_is_ignored),
        T(test_memory_snapshot_ahead_of_stream_is_ignored),
        T(test_memory_multiple_snapshot_versions_can_coexist),
        T(test_memory_same_snapshot_version_updates_existing_snapshot),
        T(test_memory_old_snapshots_are_ignored_when_loading),
        T(test_memory_idempotency_error_if_event_with_different_content_is_saved),
        T(test_memory_no_idempotency_error_if_event_with_same_content_is_saved),
        T(test_memory_optimistic_concurrency_error_if_aggregate_was_updated_by_another),
        T(test_memory_side_effect_is_correctly_stored),
        T(test_memory_multiple_side_effects_are_stored_correctly),
        T(test_memory_side_effect_regeneration_works_correctly),
        T(test_memory_multi_aggregate_transaction_commit_test),
        T(test_memory_multi_aggregate_transaction_rollback_test),
        T(test_memory_multi_aggregate_transaction_with_mixed_side_effects),
        T(test_memory_order_status_machine),
        T(test_memory_aggregate_is_successfully_saved_and_loaded),
        T(test_memory_aggregate_is_not_saved_if_no_events_are_applied),
        T(test_memory_transaction_rollback_discards_changes),
        T(test_memory_transaction_isolates_changes_until_commit),
        T(test_memory_transaction_handles_invalid_data_gracefully),
        T(test_memory_transaction_handles_multiple_operations_correctly),
        T(test_memory_transaction_handles_multiple_aggregates_correctly),
        T(test_memory_repository_error_handling_and_recovery),
        T(test_memory_repository_load_works_without_transaction),
        T(test_memory_streaming_returns_events_in_version_order),
        T(test_memory_unknown_event_kind_in_store_is_decode_error),
        T(test_memory_other_type_on_same_aggregate_is_refused),
        T(test_memory_empty_payloads),
        T(test_memory_bad_input_store_functions),
        T(test_memory_bad_input_uuid_parse),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
