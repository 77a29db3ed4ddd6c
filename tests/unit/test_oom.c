/*
 * Out of memory: the library's allocator hook fails one allocation, the
 * n-th, for n = 0, 1, 2, ... until a whole workflow runs without reaching
 * it.  Every call must then give ES_ENOMEM (never crash, never leak), leave
 * the context as it was, and succeed when retried.  The allocator is
 * global, so these tests have a binary of their own.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fixtures/account.h"
#include "fixtures/counter.h"
#include "fixtures/helpers.h"

static atomic_long countdown = -1; /* < 0: never fail */
static atomic_bool fired;
static atomic_long calls; /* hook calls since the last arm() */

static bool should_fail(void)
{
    atomic_fetch_add(&calls, 1);
    long n = atomic_load(&countdown);
    while (n >= 0) {
        if (atomic_compare_exchange_weak(&countdown, &n, n - 1)) {
            if (n == 0) {
                atomic_store(&fired, true);
                return true;
            }
            return false;
        }
    }
    return false;
}

static void *failing_malloc(size_t n)
{
    return should_fail() ? NULL : malloc(n);
}

static void *failing_realloc(void *p, size_t n)
{
    return should_fail() ? NULL : realloc(p, n);
}

static void arm(long n)
{
    atomic_store(&calls, 0);
    atomic_store(&fired, false);
    atomic_store(&countdown, n);
}

static void disarm(void) { atomic_store(&countdown, -1); }

/* Run call; on ES_ENOMEM from the injected failure run it once more, and
 * then it must succeed. */
#define RETRY(call)                                                          \
    do {                                                                      \
        if (cur != NULL && cur->c != NULL) remember(cur);                     \
        int rc_ = (call);                                                     \
        if (rc_ == ES_ENOMEM && atomic_load(&fired)) {                        \
            step = #call;                                                     \
            step_n = n;                                                       \
            after_failure();                                                  \
            rc_ = (call);                                                     \
        }                                                                     \
        if (rc_ != 0)                                                         \
            fail_msg("n=%ld: %s: %s", n, #call, es_status_name(rc_));         \
    } while (0)

typedef struct wf wf;
static void remember(wf *w);

struct wf {
    es_store *store;
    counter_context *c;
    uint64_t version;
    size_t uncommitted, effects;
};

static wf *cur; /* what after_failure checks */
static const char *step; /* the call that failed, for messages */
static long step_n;

/* After an injected failure, the context is as it was before the call. */
static void after_failure(void)
{
    if (cur == NULL || cur->c == NULL) return;
    es_context *ctx = counter_context_raw(cur->c);
    if (counter_version(cur->c) != cur->version ||
        es_context_uncommitted_count(ctx) != cur->uncommitted ||
        es_context_side_effect_count(ctx) != cur->effects)
        print_message("n=%ld %s changed the context\n", step_n, step);
    assert_int_equal(counter_version(cur->c), cur->version);
    assert_int_equal(es_context_uncommitted_count(ctx), cur->uncommitted);
    assert_int_equal(es_context_side_effect_count(ctx), cur->effects);
}

static void remember(struct wf *w)
{
    es_context *ctx = counter_context_raw(w->c);
    w->version = counter_version(w->c);
    w->uncommitted = es_context_uncommitted_count(ctx);
    w->effects = es_context_side_effect_count(ctx);
}

/* The stored snapshot's version (-1: none). */
static void assert_snapshot(es_store *store, const es_uuid *id,
                            uint64_t version)
{
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, NULL), 0);
    es_snapshot *snap = NULL;
    int rc = es_txn_get_snapshot(txn, id, 1, &snap, NULL);
    es_txn_rollback(txn);
    if (version == (uint64_t)-1) {
        assert_int_equal(rc, ES_ENOTFOUND);
        return;
    }
    assert_int_equal(rc, 0);
    assert_int_equal(snap->version, version);
    es_free(snap);
}

/* The workflow; returns true when it ran to the end with every check. */
static bool counter_workflow(long n)
{
    wf w;
    memset(&w, 0, sizeof w);
    cur = &w;
    arm(n);
    RETRY(es_memory_store_open(&w.store, NULL));
    es_uuid id = fixture_new_id();
    counter_event reset = counter_reset(&id);
    RETRY(counter_record_new(&id, &reset, &w.c, NULL));
    counter_event ops[] = {counter_add(10), counter_subtract(3),
                           counter_multiply(2)};
    for (size_t i = 0; i < 3; i++) {
        remember(&w);
        RETRY(counter_record(w.c, &ops[i], NULL));
    }
    es_txn *txn = NULL;
    RETRY(es_store_begin(w.store, &txn, NULL));
    remember(&w);
    RETRY(counter_save(txn, w.c, NULL));
    bool complete = true;
    int crc = es_txn_commit(txn, NULL);
    if (crc != 0) {
        /* a commit that ran out of memory stored nothing */
        assert_int_equal(crc, ES_ENOMEM);
        assert_int_equal(es_memory_store_event_count(w.store), 0);
        assert_int_equal(fixture_side_effect_count(w.store, NULL), 0);
        counter_context *l = NULL;
        assert_int_equal(counter_store_load(w.store, &id, &l, NULL),
                         ES_ENOTFOUND);
        assert_snapshot(w.store, &id, (uint64_t)-1);
        complete = false;
        goto out;
    }
    counter_context_free(w.c);
    w.c = NULL;

    RETRY(counter_store_load(w.store, &id, &w.c, NULL));
    assert_int_equal(counter_state(w.c)->result, 14);
    assert_int_equal(counter_version(w.c), 3);

    /* a stored duplicate and a new event: save rebuilds */
    remember(&w);
    RETRY(counter_record(w.c, &ops[0], NULL));
    counter_event one = counter_add(1);
    remember(&w);
    RETRY(counter_record(w.c, &one, NULL));
    RETRY(es_store_begin(w.store, &txn, NULL));
    remember(&w);
    RETRY(counter_save(txn, w.c, NULL));
    crc = es_txn_commit(txn, NULL);
    if (crc != 0) {
        assert_int_equal(crc, ES_ENOMEM);
        assert_int_equal(es_memory_store_event_count(w.store), 4);
        assert_int_equal(fixture_side_effect_count(w.store, NULL), 4);
        counter_context *l = NULL;
        assert_int_equal(counter_store_load(w.store, &id, &l, NULL), 0);
        assert_int_equal(counter_version(l), 3);
        assert_int_equal(counter_state(l)->result, 14);
        counter_context_free(l);
        assert_snapshot(w.store, &id, 3);
        complete = false;
        goto out;
    }
    assert_int_equal(counter_version(w.c), 4);
    assert_int_equal(counter_state(w.c)->result, 15);

    RETRY(es_store_begin(w.store, &txn, NULL));
    es_side_effect_list *list = NULL;
    RETRY(es_context_regenerate_side_effects(txn, &counter_type, &id,
                                             &ops[0].event_id, &list, NULL));
    assert_non_null(list);
    assert_int_equal(list->count, 1);
    es_side_effect_list_free(list);
    list = NULL;
    RETRY(es_txn_list_side_effects(txn, &id, &list, NULL));
    assert_int_equal(list->count, 5);
    es_side_effect_list_free(list);
    es_event *ev = NULL;
    RETRY(es_txn_get_event(txn, &id, &one.event_id, &ev, NULL));
    es_free(ev);
    es_snapshot *snap = NULL;
    RETRY(es_txn_get_snapshot(txn, &id, 1, &snap, NULL));
    es_free(snap);
    es_txn_rollback(txn);

    /* a stale clone: ES_ECONFLICT, or ES_ENOMEM on the way */
    counter_context *stale = NULL;
    RETRY(counter_clone(w.c, &stale, NULL));
    counter_event late = counter_add(5);
    RETRY(counter_record(stale, &late, NULL));
    counter_event newer = counter_add(6);
    remember(&w);
    RETRY(counter_record(w.c, &newer, NULL));
    es_txn *t1 = NULL;
    RETRY(es_store_begin(w.store, &t1, NULL));
    RETRY(counter_save(t1, w.c, NULL));
    int rc = es_txn_commit(t1, NULL);
    if (rc == 0) {
        RETRY(es_store_begin(w.store, &txn, NULL));
        rc = counter_save(txn, stale, NULL);
        if (rc == ES_ENOMEM) rc = counter_save(txn, stale, NULL);
        es_txn_rollback(txn);
        if (rc != ES_ECONFLICT)
            fail_msg("n=%ld: stale save: %s", n, es_status_name(rc));
    } else {
        complete = false;
    }
    counter_context_free(stale);

out:
    disarm();
    cur = NULL;
    counter_context_free(w.c);
    assert_int_equal(es_store_close(w.store), 0);
    return complete && !atomic_load(&fired);
}

/* Floors for the number of allocation points of each workflow (212 and
 * 72 when written): a hook that is not called, or called for a small part
 * of the allocations only, cannot pass.  Lower them when the library
 * really allocates less. */
#define COUNTER_POINTS_MIN 150
#define ACCOUNT_POINTS_MIN 50

static void test_oom_counter_workflow(void **state)
{
    (void)state;
    long n = 0, not_fired = 0;
    for (; n < 100000; n++) {
        bool done = counter_workflow(n);
        if (done) break;
        if (!atomic_load(&fired)) not_fired++;
    }
    long clean_calls = atomic_load(&calls);
    print_message("allocation points tried: %ld (%ld hook calls in the "
                  "run without a failure)\n",
                  n, clean_calls);
    assert_true(n < 100000);
    /* every run before the last had its failure injected */
    assert_int_equal(not_fired, 0);
    assert_true(clean_calls >= n);
    assert_true(n >= COUNTER_POINTS_MIN);
}

/* The same with the account type, whose state and events own strings
 * (state_copy, state_free, event_free). */
static bool account_workflow(long n)
{
    es_store *store = NULL;
    cur = NULL;
    arm(n);
    RETRY(es_memory_store_open(&store, NULL));
    account_builder b;
    account_builder_init(&b);
    account_builder_with_remove(account_builder_with_add(&b, 100), 30);
    account_context *a = NULL;
    int rc = account_builder_save(&b, store, &a, NULL);
    if (rc == ES_ENOMEM) rc = account_builder_save(&b, store, &a, NULL);
    /* a commit that failed stored nothing, so the retry went in whole */
    if (rc != 0) fail_msg("n=%ld: builder save: %s", n, es_status_name(rc));
    bool complete = true;
    account_context_free(a);
    a = NULL;
    if (complete) {
        RETRY(account_store_load(store, &b.account_id, &a, NULL));
        assert_int_equal(account_state(a)->balance, 70);
        assert_string_equal(account_state(a)->email, ACCOUNT_DEFAULT_EMAIL);
        account_context_free(a);
    }
    disarm();
    assert_int_equal(es_store_close(store), 0);
    return complete && !atomic_load(&fired);
}

static void test_oom_account_workflow(void **state)
{
    (void)state;
    long n = 0, not_fired = 0;
    for (; n < 100000; n++) {
        if (account_workflow(n)) break;
        if (!atomic_load(&fired)) not_fired++;
    }
    long clean_calls = atomic_load(&calls);
    print_message("allocation points tried: %ld (%ld hook calls in the "
                  "run without a failure)\n",
                  n, clean_calls);
    assert_true(n < 100000);
    assert_int_equal(not_fired, 0);
    assert_true(clean_calls >= n);
    assert_true(n >= ACCOUNT_POINTS_MIN);
}

int main(void)
{
    if (es_set_allocator(failing_malloc, failing_realloc, free) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oom_counter_workflow),
        cmocka_unit_test(test_oom_account_workflow),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
