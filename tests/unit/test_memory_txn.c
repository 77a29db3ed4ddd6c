/*
 * The memory store's transactions: isolation, rollback, atomic commit,
 * conflicts between transactions, and many threads at once.
 *
 * Worker threads never assert: they record what happened, the test joins
 * them and asserts afterwards.
 */
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fixtures/account.h"
#include "fixtures/counter.h"
#include "fixtures/helpers.h"
#include "fixtures/memory.h"

static es_context *craw(counter_context *c) { return counter_context_raw(c); }

/* A saved counter with result n (n Adds of 1). */
static es_uuid saved_counter(es_store *store, int n)
{
    counter_context *c = NULL;
    es_uuid id;
    CHECK(counter_start(&c, &id, NULL));
    for (int i = 0; i < n; i++) {
        counter_event e = counter_add(1);
        CHECK(counter_record(c, &e, NULL));
    }
    CHECK(fixture_save_commit(store, craw(c), NULL));
    counter_context_free(c);
    return id;
}

static size_t stream_len(es_txn *txn, const es_uuid *id)
{
    fixture_stream s;
    CHECK(fixture_stream_read(txn, id, &s, NULL));
    size_t n = s.count;
    fixture_stream_free(&s);
    return n;
}

static size_t side_effects_in(es_txn *txn, const es_uuid *id)
{
    es_side_effect_list *list = NULL;
    CHECK(es_txn_list_side_effects(txn, id, &list, NULL));
    size_t n = list->count;
    es_side_effect_list_free(list);
    return n;
}

static void test_memory_txn_uncommitted_writes_are_invisible(void **state)
{
    es_store *store = *state;
    es_uuid id = saved_counter(store, 1);
    es_txn *writer = fixture_begin(store), *reader = fixture_begin(store);

    counter_context *c = NULL;
    CHECK(counter_load(writer, &id, &c, NULL));
    counter_event add = counter_add(10);
    CHECK(counter_record(c, &add, NULL));
    CHECK(counter_save(writer, c, NULL));
    es_uuid fresh_id;
    counter_context *fresh = NULL;
    CHECK(counter_start(&fresh, &fresh_id, NULL));
    CHECK(counter_save(writer, fresh, NULL));

    /* the writer sees its writes */
    assert_int_equal(stream_len(writer, &id), 3);
    assert_int_equal(side_effects_in(writer, &id), 4);
    es_snapshot *snap = NULL;
    CHECK(es_txn_get_snapshot(writer, &id, 1, &snap, NULL));
    assert_int_equal(snap->version, 2);
    es_free(snap);

    /* the reader, another transaction, and a fresh one do not */
    es_txn *later = fixture_begin(store);
    es_txn *txns[] = {reader, later};
    for (size_t i = 0; i < 2; i++) {
        es_txn *t = txns[i];
        assert_int_equal(stream_len(t, &id), 2);
        assert_int_equal(side_effects_in(t, &id), 3);
        assert_int_equal(side_effects_in(t, &fresh_id), 0);
        CHECK(es_txn_get_snapshot(t, &id, 1, &snap, NULL));
        assert_int_equal(snap->version, 1);
        es_free(snap);
        es_event *ev = NULL;
        assert_int_equal(es_txn_get_event(t, &id, &add.event_id, &ev, NULL),
                         ES_ENOTFOUND);
        counter_context *l = NULL;
        CHECK(counter_load(t, &id, &l, NULL));
        assert_int_equal(counter_state(l)->result, 1);
        counter_context_free(l);
        assert_int_equal(counter_load(t, &fresh_id, &l, NULL), ES_ENOTFOUND);
    }
    assert_int_equal(es_memory_store_event_count(store), 2);

    CHECK(es_txn_commit(writer, NULL));
    /* READ COMMITTED: open transactions see the commit now */
    assert_int_equal(stream_len(reader, &id), 3);
    counter_context *l = NULL;
    CHECK(counter_load(later, &fresh_id, &l, NULL));
    counter_context_free(l);
    es_txn_rollback(reader);
    es_txn_rollback(later);
    counter_context_free(c);
    counter_context_free(fresh);
}

static void test_memory_txn_rollback_undoes_everything(void **state)
{
    es_store *store = *state;
    es_uuid id = saved_counter(store, 2);
    size_t events = es_memory_store_event_count(store);
    es_txn *txn = fixture_begin(store);
    counter_context *c = NULL;
    CHECK(counter_load(txn, &id, &c, NULL));
    counter_event add = counter_add(5);
    CHECK(counter_record(c, &add, NULL));
    CHECK(counter_save(txn, c, NULL));
    CHECK(es_txn_delete_snapshots(txn, &id, NULL));
    counter_context *other = NULL;
    es_uuid other_id;
    CHECK(counter_start(&other, &other_id, NULL));
    CHECK(counter_save(txn, other, NULL));
    es_txn_rollback(txn);

    assert_int_equal(es_memory_store_event_count(store), events);
    assert_int_equal(fixture_side_effect_count(store, &id), 4);
    assert_int_equal(fixture_side_effect_count(store, &other_id), 0);
    es_txn *r = fixture_begin(store);
    es_snapshot *snap = NULL;
    CHECK(es_txn_get_snapshot(r, &id, 1, &snap, NULL)); /* not deleted */
    assert_int_equal(snap->version, 2);
    es_free(snap);
    es_event *ev = NULL;
    assert_int_equal(es_txn_get_event(r, &id, &add.event_id, &ev, NULL),
                     ES_ENOTFOUND);
    es_txn_rollback(r);
    counter_context *l = NULL;
    CHECK(counter_store_load(store, &id, &l, NULL));
    assert_int_equal(counter_state(l)->result, 2);
    counter_context_free(l);

    /* the rolled-back event can be recorded again, as new, after a
     * reload (c's save had succeeded, so c itself has nothing left) */
    assert_int_equal(es_context_uncommitted_count(craw(c)), 0);
    CHECK(counter_store_load(store, &id, &l, NULL));
    CHECK(counter_record(l, &add, NULL));
    CHECK(fixture_save_commit(store, craw(l), NULL));
    counter_context_free(l);
    CHECK(counter_store_load(store, &id, &l, NULL));
    assert_int_equal(counter_state(l)->result, 7);
    assert_int_equal(counter_version(l), 3);
    counter_context_free(l);
    counter_context_free(c);
    counter_context_free(other);
}

static void test_memory_txn_commit_is_atomic(void **state)
{
    es_store *store = *state;
    es_uuid ids[4];
    counter_context *cs[4];
    es_txn *txn = fixture_begin(store);
    for (int i = 0; i < 4; i++) {
        CHECK(counter_start(&cs[i], &ids[i], NULL));
        counter_event e = counter_add(i + 1);
        CHECK(counter_record(cs[i], &e, NULL));
        CHECK(counter_save(txn, cs[i], NULL));
    }
    assert_int_equal(es_memory_store_event_count(store), 0);
    CHECK(es_txn_commit(txn, NULL));
    assert_int_equal(es_memory_store_event_count(store), 8);
    for (int i = 0; i < 4; i++) {
        counter_context *l = NULL;
        CHECK(counter_store_load(store, &ids[i], &l, NULL));
        assert_int_equal(counter_state(l)->result, i + 1);
        counter_context_free(l);
        counter_context_free(cs[i]);
    }
    assert_int_equal(fixture_side_effect_count(store, NULL), 12);
}

/* Two transactions take the same version: the second commit fails whole. */
static void test_memory_txn_same_version_second_commit_conflicts(void **state)
{
    es_store *store = *state;
    es_uuid id = saved_counter(store, 1);
    es_txn *t1 = fixture_begin(store), *t2 = fixture_begin(store);
    counter_context *a = NULL, *b = NULL;
    CHECK(counter_load(t1, &id, &a, NULL));
    CHECK(counter_load(t2, &id, &b, NULL));
    counter_event ea = counter_add(10), eb = counter_add(100);
    CHECK(counter_record(a, &ea, NULL));
    CHECK(counter_record(b, &eb, NULL));
    CHECK(counter_save(t1, a, NULL));
    CHECK(counter_save(t2, b, NULL));
    /* t2 also writes another aggregate: that must not stay either */
    counter_context *extra = NULL;
    es_uuid extra_id;
    CHECK(counter_start(&extra, &extra_id, NULL));
    CHECK(counter_save(t2, extra, NULL));

    CHECK(es_txn_commit(t1, NULL));
    es_error err = {0};
    assert_int_equal(es_txn_commit(t2, &err), ES_ECONFLICT);
    assert_true(es_uuid_equal(&err.aggregate_id, &id));
    assert_int_equal(err.version, 2);

    assert_int_equal(es_memory_store_event_count(store), 3);
    counter_context *l = NULL;
    CHECK(counter_store_load(store, &id, &l, NULL));
    assert_int_equal(counter_state(l)->result, 11);
    assert_int_equal(counter_version(l), 2);
    counter_context_free(l);
    assert_int_equal(counter_store_load(store, &extra_id, &l, NULL),
                     ES_ENOTFOUND);
    assert_int_equal(fixture_side_effect_count(store, &id), 4);
    assert_int_equal(fixture_side_effect_count(store, &extra_id), 0);
    es_txn *r = fixture_begin(store);
    es_snapshot *snap = NULL;
    CHECK(es_txn_get_snapshot(r, &id, 1, &snap, NULL));
    assert_int_equal(snap->version, 2);
    counter s;
    memset(&s, 0, sizeof s);
    CHECK(counter_type.state_decode(snap->data, snap->len, &s, NULL));
    assert_int_equal(s.result, 11);
    es_free(snap);
    es_txn_rollback(r);

    /* b keeps its events (save succeeded); reloading and retrying works */
    counter_context *retry = NULL;
    CHECK(counter_store_load(store, &id, &retry, NULL));
    CHECK(counter_record(retry, &eb, NULL));
    CHECK(fixture_save_commit(store, craw(retry), NULL));
    assert_int_equal(counter_state(retry)->result, 111);
    counter_context_free(retry);
    counter_context_free(a);
    counter_context_free(b);
    counter_context_free(extra);
}

/* The same event id written by two transactions to two aggregates: ids
 * are unique per aggregate, so both commit. */
static void test_memory_txn_same_event_id_two_aggregates_both_commit(
    void **state)
{
    es_store *store = *state;
    es_uuid x = saved_counter(store, 0), y = saved_counter(store, 0);
    es_txn *t1 = fixture_begin(store), *t2 = fixture_begin(store);
    counter_context *a = NULL, *b = NULL;
    CHECK(counter_load(t1, &x, &a, NULL));
    CHECK(counter_load(t2, &y, &b, NULL));
    counter_event e = counter_add(3);
    CHECK(counter_record(a, &e, NULL));
    CHECK(counter_record(b, &e, NULL));
    CHECK(counter_save(t1, a, NULL));
    CHECK(counter_save(t2, b, NULL));
    CHECK(es_txn_commit(t1, NULL));
    CHECK(es_txn_commit(t2, NULL));
    assert_int_equal(es_memory_store_event_count(store), 4);
    counter_context *l = NULL;
    CHECK(counter_store_load(store, &y, &l, NULL));
    assert_int_equal(counter_version(l), 1);
    counter_context_free(l);
    counter_context_free(a);
    counter_context_free(b);
}

/* Saving twice in one transaction, then conflicting with oneself. */
static void test_memory_txn_stale_context_in_same_txn_conflicts(void **state)
{
    es_store *store = *state;
    es_uuid id = saved_counter(store, 0);
    es_txn *txn = fixture_begin(store);
    counter_context *a = NULL, *b = NULL;
    CHECK(counter_load(txn, &id, &a, NULL));
    CHECK(counter_load(txn, &id, &b, NULL));
    counter_event ea = counter_add(1), eb = counter_add(2);
    CHECK(counter_record(a, &ea, NULL));
    CHECK(counter_save(txn, a, NULL));
    CHECK(counter_record(b, &eb, NULL));
    es_error err = {0};
    assert_int_equal(counter_save(txn, b, &err), ES_ECONFLICT);
    assert_int_equal(err.version, 1);
    CHECK(es_txn_commit(txn, NULL));
    counter_context *l = NULL;
    CHECK(counter_store_load(store, &id, &l, NULL));
    assert_int_equal(counter_state(l)->result, 1);
    counter_context_free(l);
    counter_context_free(a);
    counter_context_free(b);
}

/* ==== many threads ==== */

#define THREADS 8
#define APPENDS 200
#define MAX_ATTEMPTS 100000

typedef struct worker {
    es_store *store;
    es_uuid shared;
    es_uuid mine;
    es_uuid *event_ids; /* APPENDS: the ids this worker appended */
    int shared_done, mine_done;
    long conflicts;
    int first_error; /* 0, or the first unexpected status */
    pthread_barrier_t *start;
} worker;

/* Load, record e, save, commit; on ES_ECONFLICT start over with the same
 * event (same id), so a retry can never store it twice. */
static int append(es_store *store, const es_uuid *id, const counter_event *e,
                  long *conflicts)
{
    for (int attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
        es_txn *txn = NULL;
        int rc = es_store_begin(store, &txn, NULL);
        if (rc != 0) return rc;
        counter_context *c = NULL;
        rc = counter_load(txn, id, &c, NULL);
        if (rc == 0) rc = counter_record(c, e, NULL);
        if (rc == 0) rc = counter_save(txn, c, NULL);
        if (rc == 0) sched_yield(); /* widen the window for conflicts */
        if (rc == 0)
            rc = es_txn_commit(txn, NULL);
        else
            es_txn_rollback(txn);
        counter_context_free(c);
        if (rc != ES_ECONFLICT) return rc;
        (*conflicts)++;
        sched_yield();
    }
    return ES_ECONFLICT;
}

static void *work(void *arg)
{
    worker *w = arg;
    pthread_barrier_wait(w->start);
    counter_context *c = NULL;
    w->first_error = counter_start(&c, &w->mine, NULL);
    if (w->first_error == 0)
        w->first_error = fixture_save_commit(w->store, craw(c), NULL);
    counter_context_free(c);
    for (int i = 0; i < APPENDS && w->first_error == 0; i++) {
        bool shared = i % 2 == 0;
        counter_event e = counter_add(1);
        w->event_ids[i] = e.event_id;
        int rc = append(w->store, shared ? &w->shared : &w->mine, &e,
                        &w->conflicts);
        if (rc != 0)
            w->first_error = rc;
        else if (shared)
            w->shared_done++;
        else
            w->mine_done++;
    }
    return NULL;
}

typedef struct reader {
    es_store *store;
    es_uuid shared;
    atomic_bool *stop;
    long loads, bad, errors;
} reader;

/* Loads the shared counter again and again: every state it sees must be
 * one that a prefix of the stream gives (result == version, as every
 * event adds 1). */
static void *read_loop(void *arg)
{
    reader *r = arg;
    while (!atomic_load(r->stop)) {
        counter_context *c = NULL;
        int rc = counter_store_load(r->store, &r->shared, &c, NULL);
        if (rc != 0) {
            r->errors++;
            continue;
        }
        r->loads++;
        const counter *s = counter_state(c);
        if ((uint64_t)s->result != counter_version(c) ||
            s->operations_count != counter_version(c))
            r->bad++;
        counter_context_free(c);
    }
    return NULL;
}

static void test_memory_txn_concurrent_appends_from_threads(void **state)
{
    es_store *store = *state;
    es_uuid shared = saved_counter(store, 0);
    worker w[THREADS];
    pthread_t th[THREADS], rt;
    atomic_bool stop;
    atomic_init(&stop, false);
    reader r = {store, shared, &stop, 0, 0, 0};
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, THREADS);
    for (int i = 0; i < THREADS; i++) {
        memset(&w[i], 0, sizeof w[i]);
        w[i].store = store;
        w[i].shared = shared;
        w[i].start = &start;
        w[i].event_ids = calloc(APPENDS, sizeof(es_uuid));
        assert_non_null(w[i].event_ids);
    }
    assert_int_equal(pthread_create(&rt, NULL, read_loop, &r), 0);
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, work, &w[i]), 0);
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
    atomic_store(&stop, true);
    pthread_join(rt, NULL);
    pthread_barrier_destroy(&start);

    int shared_total = 0;
    long conflicts = 0;
    for (int i = 0; i < THREADS; i++) {
        if (w[i].first_error != 0)
            fail_msg("worker %d: %s", i, es_status_name(w[i].first_error));
        assert_int_equal(w[i].shared_done, APPENDS / 2);
        assert_int_equal(w[i].mine_done, APPENDS / 2);
        shared_total += w[i].shared_done;
        conflicts += w[i].conflicts;
    }
    assert_int_equal(r.bad, 0);
    assert_int_equal(r.errors, 0);
    print_message("conflicts retried: %ld, reader loads: %ld\n", conflicts,
                  r.loads);

    /* counts add up: every event once, versions without gaps */
    assert_int_equal(es_memory_store_event_count(store),
                     1 + shared_total + THREADS * (1 + APPENDS / 2));
    fixture_stream s;
    CHECK(fixture_stream_read_store(store, &shared, &s, NULL));
    assert_int_equal(s.count, 1 + shared_total);
    assert_true(fixture_stream_gap_free(&s));
    fixture_stream_free(&s);
    counter_context *c = NULL;
    CHECK(counter_store_load(store, &shared, &c, NULL));
    assert_int_equal(counter_state(c)->result, shared_total);
    assert_int_equal(counter_version(c), shared_total);
    counter_context_free(c);
    /* the snapshot is of the last version: it never moved backwards */
    es_txn *st = fixture_begin(store);
    es_snapshot *snap = NULL;
    CHECK(es_txn_get_snapshot(st, &shared, 1, &snap, NULL));
    assert_int_equal(snap->version, shared_total);
    es_free(snap);
    es_txn_rollback(st);

    es_txn *txn = fixture_begin(store);
    for (int i = 0; i < THREADS; i++) {
        CHECK(fixture_stream_read(txn, &w[i].mine, &s, NULL));
        assert_int_equal(s.count, 1 + APPENDS / 2);
        assert_true(fixture_stream_gap_free(&s));
        fixture_stream_free(&s);
        for (int k = 0; k < APPENDS; k++) {
            es_event *ev = NULL;
            const es_uuid *agg = k % 2 == 0 ? &shared : &w[i].mine;
            CHECK(es_txn_get_event(txn, agg, &w[i].event_ids[k], &ev, NULL));
            es_free(ev);
        }
    }
    /* no side effect queued twice by a retry */
    es_side_effect_list *list = NULL;
    CHECK(es_txn_list_side_effects(txn, NULL, &list, NULL));
    assert_int_equal(list->count,
                     2 * (1 + THREADS) + THREADS * (size_t)APPENDS);
    assert_true(fixture_side_effect_ids_distinct(list));
    es_side_effect_list_free(list);
    es_txn_rollback(txn);
    for (int i = 0; i < THREADS; i++) free(w[i].event_ids);
}

/* Many threads append the same event (a retried command) to the same
 * aggregate at once: it is stored once, and every thread succeeds. */
typedef struct retrier {
    es_store *store;
    es_uuid id;
    counter_event event;
    pthread_barrier_t *barrier;
    long conflicts;
    int rc;
} retrier;

static void *retry_same(void *arg)
{
    retrier *r = arg;
    pthread_barrier_wait(r->barrier);
    r->rc = append(r->store, &r->id, &r->event, &r->conflicts);
    return NULL;
}

static void test_memory_txn_concurrent_same_event_is_stored_once(
    void **state)
{
    es_store *store = *state;
    es_uuid id = saved_counter(store, 3);
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, THREADS);
    retrier rs[THREADS];
    pthread_t th[THREADS];
    for (int round = 0; round < 20; round++) {
        counter_event e = counter_add(7);
        for (int i = 0; i < THREADS; i++) {
            rs[i] = (retrier){store, id, e, &barrier, 0, -1};
            assert_int_equal(
                pthread_create(&th[i], NULL, retry_same, &rs[i]), 0);
        }
        for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
        for (int i = 0; i < THREADS; i++)
            if (rs[i].rc != 0)
                fail_msg("round %d thread %d: %s", round, i,
                         es_status_name(rs[i].rc));
    }
    pthread_barrier_destroy(&barrier);
    counter_context *c = NULL;
    CHECK(counter_store_load(store, &id, &c, NULL));
    assert_int_equal(counter_version(c), 3 + 20);
    assert_int_equal(counter_state(c)->result, 3 + 20 * 7);
    counter_context_free(c);
    fixture_stream s;
    CHECK(fixture_stream_read_store(store, &id, &s, NULL));
    assert_int_equal(s.count, 4 + 20);
    assert_true(fixture_stream_gap_free(&s));
    fixture_stream_free(&s);
    assert_int_equal(fixture_side_effect_count(store, &id), 2 + 3 + 20);
}

/* Many threads create the same aggregate with the same creation event:
 * exactly one creation is stored, every thread ends with success or
 * ES_ECONFLICT, never anything else. */
typedef struct creator {
    es_store *store;
    es_uuid id;
    counter_event reset;
    pthread_barrier_t *barrier;
    int rc;
} creator;

static void *create(void *arg)
{
    creator *c = arg;
    pthread_barrier_wait(c->barrier);
    counter_context *ctx = NULL;
    c->rc = counter_record_new(&c->id, &c->reset, &ctx, NULL);
    if (c->rc == 0) c->rc = fixture_save_commit(c->store, craw(ctx), NULL);
    counter_context_free(ctx);
    return NULL;
}

static void test_memory_txn_concurrent_same_creation(void **state)
{
    es_store *store = *state;
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id);
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, THREADS);
    creator cs[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        cs[i] = (creator){store, id, reset, &barrier, -1};
        assert_int_equal(pthread_create(&th[i], NULL, create, &cs[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
    pthread_barrier_destroy(&barrier);
    int ok = 0;
    for (int i = 0; i < THREADS; i++) {
        if (cs[i].rc == 0)
            ok++;
        else if (cs[i].rc != ES_ECONFLICT)
            fail_msg("thread %d: %s", i, es_status_name(cs[i].rc));
    }
    assert_true(ok >= 1);
    assert_int_equal(es_memory_store_event_count(store), 1);
    assert_int_equal(fixture_side_effect_count(store, &id), 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(name)                                                              \
    cmocka_unit_test_setup_teardown(name, fixture_memory_setup,               \
                                    fixture_memory_teardown)
        T(test_memory_txn_uncommitted_writes_are_invisible),
        T(test_memory_txn_rollback_undoes_everything),
        T(test_memory_txn_commit_is_atomic),
        T(test_memory_txn_same_version_second_commit_conflicts),
        T(test_memory_txn_same_event_id_two_aggregates_both_commit),
        T(test_memory_txn_stale_context_in_same_txn_conflicts),
        T(test_memory_txn_concurrent_appends_from_threads),
        T(test_memory_txn_concurrent_same_event_is_stored_once),
        T(test_memory_txn_concurrent_same_creation),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
