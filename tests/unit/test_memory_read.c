/*
 * The memory store's read side (eventastic/subscription.h): the global
 * order of events (es_store_read_all, es_store_head) and the checkpoints.
 *
 * Events are written through the public API (the counter fixture, saved
 * in es_store_begin transactions) and through the host's batch writer
 * (the backend's write_batch, as the host calls it): the two commit paths
 * of the memory store.  Checkpoint writes, the lag and the event
 * listeners have no public entry point of their own (projections use
 * them), so those tests call the backend's read table (store/read_ops.h).
 */
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fixtures/counter.h"
#include "fixtures/helpers.h"
#include "store/read_ops.h"
#include "store/batch_ops.h"
#include "store/store_impl.h"

#define CHECK(call)                                                          \
    do {                                                                      \
        int rc_ = (call);                                                     \
        if (rc_ != 0)                                                         \
            fail_msg("%s: %s", #call, es_status_name(rc_));                   \
    } while (0)

static int setup(void **state)
{
    es_store *store = NULL;
    if (es_memory_store_open(&store, NULL) != 0) return -1;
    *state = store;
    return 0;
}

static int teardown(void **state)
{
    return es_store_close(*state) == 0 ? 0 : -1;
}

/* ---- what was written, what was read ---- */

typedef struct seen {
    es_position pos;
    es_uuid agg;
    es_uuid id;
    uint64_t version;
    int32_t kind;
    uint8_t *data;
    size_t len;
    int64_t created_ms;
    char type[64];
} seen;

typedef struct seen_list {
    seen *items;
    size_t n, cap;
    size_t stop_at; /* the read callback answers 42 at this count + 1 */
} seen_list;

static int seen_push(seen_list *l, const seen *s)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        seen *items = realloc(l->items, cap * sizeof *items);
        if (items == NULL) return ES_ENOMEM;
        l->items = items;
        l->cap = cap;
    }
    seen *d = &l->items[l->n];
    *d = *s;
    d->data = malloc(s->len ? s->len : 1);
    if (d->data == NULL) return ES_ENOMEM;
    if (s->len) memcpy(d->data, s->data, s->len);
    l->n++;
    return 0;
}

static void seen_free(seen_list *l)
{
    for (size_t i = 0; i < l->n; i++) free(l->items[i].data);
    free(l->items);
    memset(l, 0, sizeof *l);
}

static int on_event(void *ud, const es_recorded_event *ev)
{
    seen_list *l = ud;
    if (l->stop_at != 0 && l->n == l->stop_at) return 42;
    seen s = {ev->position, ev->aggregate_id, ev->event.id,
              ev->event.version, ev->event.kind, (uint8_t *)ev->event.data,
              ev->event.len, ev->created_ms, ""};
    snprintf(s.type, sizeof s.type, "%s", ev->type_name);
    if (ev->forgotten) return -1000;
    return seen_push(l, &s);
}

/* Save c in a transaction of its own; its events (in the order saved)
 * are appended to want. */
static void save_into(es_store *store, counter_context *c, seen_list *want)
{
    es_context *ctx = counter_context_raw(c);
    size_t n = es_context_uncommitted_count(ctx);
    for (size_t i = 0; i < n; i++) {
        const es_event *e = es_context_uncommitted(ctx, i);
        seen s = {{0, 0}, *es_context_aggregate_id(ctx), e->id, e->version,
                  e->kind, (uint8_t *)e->data, e->len, 0, "counter"};
        if (want != NULL) CHECK(seen_push(want, &s));
    }
    es_error err = {0};
    int rc = fixture_save_commit(store, ctx, &err);
    if (rc != 0) fail_msg("save: %s: %s", es_status_name(rc), err.message);
}

static void add(counter_context *c, int32_t v)
{
    counter_event e = counter_add(v);
    CHECK(counter_record(c, &e, NULL));
}

/* One item of the host's batch writer: n events of a "raw" aggregate
 * from version first, with a command record. */
typedef struct raw_item {
    es__commit_item it;
    es_event ev[4];
    uint8_t payload[4][8];
} raw_item;

static void raw_fill(raw_item *r, const es_uuid *agg, uint64_t first,
                     size_t n)
{
    memset(r, 0, sizeof *r);
    for (size_t i = 0; i < n; i++) {
        snprintf((char *)r->payload[i], sizeof r->payload[i], "r%zu",
                 (size_t)(first + i));
        r->ev[i] = (es_event){fixture_new_id(), first + i, 7, r->payload[i],
                              strlen((char *)r->payload[i])};
    }
    r->it.type_name = "raw";
    r->it.aggregate_id = *agg;
    r->it.group = r;
    r->it.events = r->ev;
    r->it.n_events = n;
    r->it.record = (es__command_record){
        .command_id = fixture_new_id(),
        .aggregate_id = *agg,
        .kind = 1,
        .payload = (const uint8_t *)"c",
        .len = 1,
        .first_version = first,
        .event_count = n,
        .version = first + n - 1,
    };
    r->it.status = ES__COMMIT_PENDING;
}

/* Write items through the batch writer; their events go to want. */
static int raw_write(es_store *store, raw_item **items, size_t n,
                     seen_list *want)
{
    es__commit_item *its[8];
    for (size_t i = 0; i < n; i++) its[i] = &items[i]->it;
    void *slot = NULL;
    es__store_write_batch(store, &slot, its, n);
    for (size_t i = 0; i < n; i++) {
        if (its[i]->status != 0) return its[i]->status;
        for (size_t k = 0; want != NULL && k < its[i]->n_events; k++) {
            const es_event *e = &its[i]->events[k];
            seen s = {{0, 0}, its[i]->aggregate_id, e->id, e->version,
                      e->kind, (uint8_t *)e->data, e->len, 0, "raw"};
            int rc = seen_push(want, &s);
            if (rc != 0) return rc;
        }
    }
    return 0;
}

static void read_everything(es_store *store, seen_list *got)
{
    size_t count = 0;
    es_position last;
    CHECK(es_store_read_all(store, NULL, 100000, on_event, got, &count,
                            &last, NULL));
    assert_int_equal(count, got->n);
}

/* got holds want's events, in want's order, positions strictly growing. */
static void assert_same(const seen_list *want, const seen_list *got)
{
    assert_int_equal(got->n, want->n);
    for (size_t i = 0; i < want->n; i++) {
        const seen *w = &want->items[i], *g = &got->items[i];
        assert_true(es_uuid_equal(&g->agg, &w->agg));
        assert_true(es_uuid_equal(&g->id, &w->id));
        assert_int_equal(g->version, w->version);
        assert_int_equal(g->kind, w->kind);
        assert_string_equal(g->type, w->type);
        assert_int_equal(g->len, w->len);
        assert_memory_equal(g->data, w->data, w->len);
        if (i > 0) assert_true(es_position_compare(&got->items[i - 1].pos,
                                                   &g->pos) < 0);
    }
}

/* A few transactions of several aggregates, and a batch: the events in
 * commit order; events of one commit share its commit number. */
static void write_mix(es_store *store, seen_list *want, size_t *commits)
{
    counter_context *a = NULL, *b = NULL, *c = NULL;
    es_uuid ida, idb, idc;
    CHECK(counter_start(&a, &ida, NULL));
    add(a, 1);
    add(a, 2);
    save_into(store, a, want); /* commit 1: a0 a1 a2 */
    CHECK(counter_start(&b, &idb, NULL));
    add(b, 5);
    save_into(store, b, want); /* commit 2: b0 b1 */
    add(a, 3);
    save_into(store, a, want); /* commit 3: a3 */

    /* commit 4: b and c in one transaction */
    CHECK(counter_start(&c, &idc, NULL));
    add(b, 6);
    es_txn *txn = NULL;
    CHECK(es_store_begin(store, &txn, NULL));
    es_context *cb = counter_context_raw(b), *cc = counter_context_raw(c);
    for (int k = 0; k < 2; k++) {
        es_context *ctx = k == 0 ? cb : cc;
        for (size_t i = 0; i < es_context_uncommitted_count(ctx); i++) {
            const es_event *e = es_context_uncommitted(ctx, i);
            seen s = {{0, 0}, *es_context_aggregate_id(ctx), e->id,
                      e->version, e->kind, (uint8_t *)e->data, e->len, 0,
                      "counter"};
            CHECK(seen_push(want, &s));
        }
        CHECK(es_context_save(txn, ctx, NULL));
    }
    CHECK(es_txn_commit(txn, NULL));

    /* commits 5 and 6: two items of one batch */
    raw_item r1, r2;
    es_uuid d = fixture_new_id(), e = fixture_new_id();
    raw_fill(&r1, &d, 0, 3);
    raw_fill(&r2, &e, 0, 1);
    raw_item *items[] = {&r1, &r2};
    CHECK(raw_write(store, items, 2, want));

    add(c, 9);
    save_into(store, c, want); /* commit 7: c2 */
    counter_context_free(a);
    counter_context_free(b);
    counter_context_free(c);
    *commits = 7;
}

/* (a) */
static void test_memory_read_commit_order(void **state)
{
    es_store *store = *state;
    seen_list want = {0}, got = {0};
    size_t commits = 0;
    write_mix(store, &want, &commits);
    read_everything(store, &got);
    assert_same(&want, &got);
    /* one commit number per commit, growing; seq = 1, 2, 3, ... */
    static const size_t per_commit[] = {3, 2, 1, 2, 3, 1, 1};
    assert_int_equal(commits, sizeof per_commit / sizeof *per_commit);
    size_t i = 0;
    for (size_t k = 0; k < commits; k++)
        for (size_t j = 0; j < per_commit[k]; j++, i++) {
            assert_int_equal(got.items[i].pos.seq, i + 1);
            assert_int_equal(got.items[i].pos.commit,
                             got.items[i - j].pos.commit);
            if (j == 0 && i > 0)
                assert_true(got.items[i].pos.commit >
                            got.items[i - 1].pos.commit);
        }
    assert_int_equal(i, got.n);
    seen_free(&want);
    seen_free(&got);
}

/* (b) */
static void test_memory_read_chunks(void **state)
{
    es_store *store = *state;
    seen_list want = {0}, all = {0};
    size_t commits = 0;
    write_mix(store, &want, &commits);
    read_everything(store, &all);
    for (size_t max = 1; max <= 7; max++) {
        seen_list got = {0};
        es_position at = {0, 0};
        for (size_t reads = 0;; reads++) {
            assert_true(reads <= all.n); /* no read hands over nothing new */
            size_t count = 99, before = got.n;
            es_position last;
            CHECK(es_store_read_all(store, &at, max, on_event, &got, &count,
                                    &last, NULL));
            assert_int_equal(count, got.n - before);
            assert_true(count <= max);
            if (count == 0) {
                assert_int_equal(es_position_compare(&last, &at), 0);
                break;
            }
            at = last;
        }
        assert_same(&all, &got);
        assert_same(&want, &got);
        for (size_t i = 0; i < all.n; i++)
            assert_int_equal(es_position_compare(&all.items[i].pos,
                                                 &got.items[i].pos), 0);
        seen_free(&got);
    }
    seen_free(&want);
    seen_free(&all);
}

/* (c) */
static void test_memory_read_rollback_leaves_no_gap(void **state)
{
    es_store *store = *state;
    seen_list want = {0}, got = {0};
    counter_context *a = NULL, *b = NULL;
    es_uuid ida, idb;
    CHECK(counter_start(&a, &ida, NULL));
    save_into(store, a, &want);
    es_position head;
    CHECK(es_store_head(store, &head, NULL));

    /* rolled back */
    CHECK(counter_start(&b, &idb, NULL));
    add(b, 1);
    es_txn *txn = NULL;
    CHECK(es_store_begin(store, &txn, NULL));
    CHECK(counter_save(txn, b, NULL));
    es_txn_rollback(txn);
    counter_context_free(b);

    /* failed at commit: a version another commit took first */
    counter_context *a1 = NULL, *a2 = NULL;
    CHECK(counter_store_load(store, &ida, &a1, NULL));
    CHECK(counter_store_load(store, &ida, &a2, NULL));
    add(a1, 1);
    add(a2, 2);
    es_txn *t1 = NULL, *t2 = NULL;
    CHECK(es_store_begin(store, &t1, NULL));
    CHECK(es_store_begin(store, &t2, NULL));
    CHECK(counter_save(t2, a2, NULL));
    CHECK(counter_save(t1, a1, NULL));
    CHECK(es_txn_commit(t1, NULL));
    assert_int_equal(es_txn_commit(t2, NULL), ES_ECONFLICT);
    counter_context_free(a2);

    /* a batch item that conflicts stores nothing either */
    raw_item r;
    raw_fill(&r, &ida, 1, 1); /* version 1 of a is taken */
    r.it.type_name = "counter";
    raw_item *items[] = {&r};
    assert_int_equal(raw_write(store, items, 1, NULL), ES_ECONFLICT);

    add(a1, 3);
    seen_list tail = {0};
    save_into(store, a1, &tail); /* version 2 */
    counter_context_free(a1);
    counter_context_free(a);

    /* a reader that stopped at the head before the rollback goes on */
    size_t count = 0;
    es_position last;
    CHECK(es_store_read_all(store, &head, 100, on_event, &got, &count,
                            &last, NULL));
    assert_int_equal(count, 2);
    assert_int_equal(got.items[0].version, 1);
    assert_int_equal(got.items[0].kind, COUNTER_ADD); /* t1's */
    assert_true(es_uuid_equal(&got.items[0].agg, &ida));
    assert_true(es_uuid_equal(&got.items[1].id, &tail.items[0].id));
    seen_free(&got);

    /* from the start: the three committed events and nothing else */
    read_everything(store, &got);
    assert_int_equal(got.n, 3);
    assert_true(es_uuid_equal(&got.items[0].id, &want.items[0].id));
    for (size_t i = 0; i < got.n; i++) {
        assert_true(es_uuid_equal(&got.items[i].agg, &ida));
        assert_int_equal(got.items[i].version, i);
        assert_int_equal(got.items[i].pos.seq, i + 1);
    }
    seen_free(&got);
    seen_free(&want);
    seen_free(&tail);
}

/* ---- (d) writers and readers at once ---- */

#define WRITERS 4
#define COMMITS 500

typedef struct writer {
    es_store *store;
    int index;
    es_uuid agg;
    int rc;
} writer;

static void *write_txns(void *ud)
{
    writer *w = ud;
    counter_context *c = NULL;
    w->rc = counter_start(&c, &w->agg, NULL);
    for (int i = 0; w->rc == 0 && i < COMMITS; i++) {
        if (i > 0) {
            counter_event e = counter_add(i);
            w->rc = counter_record(c, &e, NULL);
        }
        if (w->rc == 0)
            w->rc = fixture_save_commit(w->store, counter_context_raw(c),
                                        NULL);
    }
    counter_context_free(c);
    return NULL;
}

static void *write_batches(void *ud)
{
    writer *w = ud;
    w->agg = fixture_new_id();
    for (int i = 0; w->rc == 0 && i < COMMITS; i++) {
        raw_item r;
        raw_fill(&r, &w->agg, (uint64_t)i, 1);
        raw_item *items[] = {&r};
        w->rc = raw_write(w->store, items, 1, NULL);
    }
    return NULL;
}

typedef struct follower {
    es_store *store;
    atomic_bool *done;
    seen_list got;
    int rc;
} follower;

static void *follow(void *ud)
{
    follower *f = ud;
    es_position at = {0, 0};
    for (;;) {
        bool done = atomic_load(f->done); /* before the read: then a read
                                           * of nothing means the end */
        size_t count = 0;
        f->rc = es_store_read_all(f->store, &at, 64, on_event, &f->got,
                                  &count, &at, NULL);
        if (f->rc != 0 || (done && count == 0)) break;
        if (f->got.n > WRITERS * COMMITS) { /* more than was written */
            f->rc = -1;
            break;
        }
        if (count == 0) sched_yield();
    }
    return NULL;
}

static void test_memory_read_concurrent(void **state)
{
    es_store *store = *state;
    atomic_bool done = false;
    writer w[WRITERS];
    pthread_t wt[WRITERS], rt;
    follower f = {store, &done, {0}, 0};
    assert_int_equal(pthread_create(&rt, NULL, follow, &f), 0);
    for (int i = 0; i < WRITERS; i++) {
        w[i] = (writer){store, i, {{0}}, 0};
        assert_int_equal(pthread_create(&wt[i], NULL,
                                        i % 2 ? write_batches : write_txns,
                                        &w[i]),
                         0);
    }
    for (int i = 0; i < WRITERS; i++) pthread_join(wt[i], NULL);
    atomic_store(&done, true);
    pthread_join(rt, NULL);
    for (int i = 0; i < WRITERS; i++) assert_int_equal(w[i].rc, 0);
    assert_int_equal(f.rc, 0);

    /* every event once; each aggregate's versions in order */
    assert_int_equal(f.got.n, WRITERS * COMMITS);
    uint64_t next[WRITERS] = {0};
    for (size_t i = 0; i < f.got.n; i++) {
        const seen *s = &f.got.items[i];
        int k = -1;
        for (int j = 0; j < WRITERS; j++)
            if (es_uuid_equal(&s->agg, &w[j].agg)) k = j;
        assert_true(k >= 0);
        assert_int_equal(s->version, next[k]);
        next[k]++;
        if (i > 0)
            assert_true(es_position_compare(&f.got.items[i - 1].pos,
                                            &s->pos) < 0);
    }
    for (int j = 0; j < WRITERS; j++) assert_int_equal(next[j], COMMITS);

    /* a second reader: the same order */
    seen_list again = {0};
    read_everything(store, &again);
    assert_int_equal(again.n, f.got.n);
    for (size_t i = 0; i < again.n; i++) {
        assert_int_equal(es_position_compare(&again.items[i].pos,
                                             &f.got.items[i].pos), 0);
        assert_true(es_uuid_equal(&again.items[i].id, &f.got.items[i].id));
    }
    seen_free(&again);
    seen_free(&f.got);
}

/* (e) */
static void test_memory_read_fn_stops(void **state)
{
    es_store *store = *state;
    seen_list want = {0}, got = {0};
    size_t commits;
    write_mix(store, &want, &commits);
    got.stop_at = 5;
    size_t count = 0;
    es_position last;
    assert_int_equal(es_store_read_all(store, NULL, 100, on_event, &got,
                                       &count, &last, NULL),
                     42);
    assert_int_equal(count, 5);
    assert_int_equal(got.n, 5);
    assert_int_equal(es_position_compare(&last, &got.items[4].pos), 0);
    /* resuming after *last hands over the one refused first */
    got.stop_at = 0;
    seen_list rest = {0};
    CHECK(es_store_read_all(store, &last, 1, on_event, &rest, &count, &last,
                            NULL));
    assert_int_equal(count, 1);
    assert_true(es_uuid_equal(&rest.items[0].id, &want.items[5].id));
    /* stopping at the first event: nothing accepted, *last is *after */
    es_position from = last;
    got.stop_at = got.n; /* answers 42 at once */
    assert_int_equal(es_store_read_all(store, &from, 3, on_event, &got,
                                       &count, &last, NULL),
                     42);
    assert_int_equal(count, 0);
    assert_int_equal(es_position_compare(&last, &from), 0);
    seen_free(&rest);
    seen_free(&got);
    seen_free(&want);
}

/* ---- (f) checkpoints ---- */

static const es__read_ops *rops(es_store *store)
{
    return store->ops->read;
}

static void put(es_store *store, const char *name, uint64_t c, uint64_t s,
                bool commit)
{
    es_txn *txn = NULL;
    CHECK(es_store_begin(store, &txn, NULL));
    es_position p = {c, s};
    CHECK(rops(store)->checkpoint_put(txn, name, &p, NULL));
    if (commit)
        CHECK(es_txn_commit(txn, NULL));
    else
        es_txn_rollback(txn);
}

static bool get(es_store *store, const char *name, es_position *out)
{
    bool found = true;
    CHECK(rops(store)->checkpoint_get(store, name, out, &found, NULL));
    return found;
}

static void test_memory_read_checkpoints(void **state)
{
    es_store *store = *state;
    es_position p;
    int64_t before = es_clock_now_ms();

    put(store, "proj.a", 1, 2, false); /* rolled back */
    assert_false(get(store, "proj.a", &p));
    assert_int_equal(p.commit, 0);
    es_checkpoint *list = NULL;
    size_t n = 9;
    CHECK(es_checkpoint_list(store, &list, &n, NULL));
    assert_int_equal(n, 0);
    assert_null(list);

    put(store, "proj.b", 1, 2, true);
    put(store, "proj.a", 3, 4, true);
    put(store, "Z-x_1", 5, 6, true);
    put(store, "proj.a", 7, 8, true); /* updated */
    assert_true(get(store, "proj.a", &p));
    assert_int_equal(p.commit, 7);
    assert_int_equal(p.seq, 8);
    CHECK(es_checkpoint_list(store, &list, &n, NULL));
    assert_int_equal(n, 3);
    assert_string_equal(list[0].name, "Z-x_1");
    assert_string_equal(list[1].name, "proj.a");
    assert_string_equal(list[2].name, "proj.b");
    assert_int_equal(list[1].position.seq, 8);
    assert_int_equal(list[2].position.commit, 1);
    for (size_t i = 0; i < n; i++) {
        assert_true(list[i].updated_ms >= before);
        assert_true(list[i].updated_ms <= es_clock_now_ms());
    }
    es_free(list);

    /* savepoints: what a rollback to one drops is not committed */
    es_txn *txn = NULL;
    es_position sp = {9, 9};
    CHECK(es_store_begin(store, &txn, NULL));
    CHECK(rops(store)->checkpoint_put(txn, "kept", &sp, NULL));
    CHECK(es__txn_savepoint(txn, NULL));
    CHECK(rops(store)->checkpoint_put(txn, "dropped", &sp, NULL));
    bool found = false;
    CHECK(rops(store)->checkpoint_delete(txn, "proj.b", &found, NULL));
    assert_true(found);
    CHECK(es__txn_rollback_to(txn, NULL));
    CHECK(es_txn_commit(txn, NULL));
    assert_true(get(store, "kept", &p));
    assert_false(get(store, "dropped", &p));
    assert_true(get(store, "proj.b", &p));

    /* a delete sees the transaction's own writes; rolled back: kept */
    CHECK(es_store_begin(store, &txn, NULL));
    CHECK(rops(store)->checkpoint_delete(txn, "proj.b", &found, NULL));
    assert_true(found);
    CHECK(rops(store)->checkpoint_delete(txn, "proj.b", &found, NULL));
    assert_false(found);
    CHECK(rops(store)->checkpoint_put(txn, "proj.b", &sp, NULL));
    CHECK(rops(store)->checkpoint_delete(txn, "proj.b", &found, NULL));
    assert_true(found);
    es_txn_rollback(txn);
    assert_true(get(store, "proj.b", &p));
    assert_int_equal(p.commit, 1);

    /* reset */
    CHECK(es_checkpoint_reset(store, "proj.b", NULL));
    assert_false(get(store, "proj.b", &p));
    es_error err = {0};
    assert_int_equal(es_checkpoint_reset(store, "proj.b", &err),
                     ES_ENOTFOUND);
    assert_int_equal(es_checkpoint_reset(store, "unknown", &err),
                     ES_ENOTFOUND);
    CHECK(es_checkpoint_list(store, &list, &n, NULL));
    assert_int_equal(n, 3); /* Z-x_1, kept, proj.a */
    assert_string_equal(list[1].name, "kept");
    es_free(list);

    /* bad names */
    char long_name[65];
    memset(long_name, 'a', 64);
    long_name[64] = '\0';
    const char *bad[] = {"", long_name, "a b", "\xc3\xa9", NULL};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(es_checkpoint_reset(store, bad[i], &err),
                         ES_EINVAL);
    long_name[63] = '\0'; /* 63 bytes: fine, just not there */
    assert_int_equal(es_checkpoint_reset(store, long_name, &err),
                     ES_ENOTFOUND);
}

/* (g) */
static void test_memory_read_head_and_lag(void **state)
{
    es_store *store = *state;
    es_position head = {1, 1}, zero = {0, 0};
    uint64_t events = 99;
    int64_t oldest = 99;
    CHECK(es_store_head(store, &head, NULL));
    assert_int_equal(es_position_compare(&head, &zero), 0);
    CHECK(rops(store)->lag(store, &zero, 100, &events, &oldest, NULL));
    assert_int_equal(events, 0);
    assert_int_equal(oldest, 0);

    int64_t before = es_clock_now_ms();
    seen_list want = {0}, got = {0};
    size_t commits;
    write_mix(store, &want, &commits);
    int64_t after = es_clock_now_ms();
    read_everything(store, &got);
    CHECK(es_store_head(store, &head, NULL));
    assert_int_equal(es_position_compare(&head, &got.items[got.n - 1].pos),
                     0);
    for (size_t i = 0; i < got.n; i++) {
        assert_true(got.items[i].created_ms >= before);
        assert_true(got.items[i].created_ms <= after);
    }

    CHECK(rops(store)->lag(store, &zero, 1000, &events, &oldest, NULL));
    assert_int_equal(events, got.n);
    assert_int_equal(oldest, got.items[0].created_ms);
    CHECK(rops(store)->lag(store, &zero, 2, &events, &oldest, NULL));
    assert_int_equal(events, 2);
    CHECK(rops(store)->lag(store, &got.items[0].pos, 1000, &events, &oldest,
                           NULL));
    assert_int_equal(events, got.n - 1);
    assert_int_equal(oldest, got.items[1].created_ms);
    CHECK(rops(store)->lag(store, &got.items[4].pos, 1000, &events, &oldest,
                           NULL));
    assert_int_equal(events, got.n - 5);
    CHECK(rops(store)->lag(store, &head, 1000, &events, &oldest, NULL));
    assert_int_equal(events, 0);
    assert_int_equal(oldest, 0);
    /* a position past the head: nothing after it */
    es_position far = {head.commit + 1, 0};
    CHECK(rops(store)->lag(store, &far, 1000, &events, &oldest, NULL));
    assert_int_equal(events, 0);
    seen_free(&want);
    seen_free(&got);
}

/* (h) commits that store events wake the event listeners; others not */
static void on_commit(void *ud) { atomic_fetch_add((atomic_int *)ud, 1); }

static void test_memory_read_wakes_listeners(void **state)
{
    es_store *store = *state;
    atomic_int woken = 0;
    CHECK(es__store_listen_events(store, on_commit, &woken));
    counter_context *c = NULL;
    CHECK(counter_start(&c, NULL, NULL));
    save_into(store, c, NULL);
    assert_int_equal(atomic_load(&woken), 1);
    put(store, "only.a.checkpoint", 1, 1, true);
    assert_int_equal(atomic_load(&woken), 1);
    raw_item r;
    es_uuid agg = fixture_new_id();
    raw_fill(&r, &agg, 0, 2);
    raw_item *items[] = {&r};
    CHECK(raw_write(store, items, 1, NULL));
    assert_int_equal(atomic_load(&woken), 2);
    es__store_unlisten_events(store, on_commit, &woken);
    add(c, 1);
    save_into(store, c, NULL);
    assert_int_equal(atomic_load(&woken), 2);
    counter_context_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_memory_read_commit_order,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_memory_read_chunks, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(
            test_memory_read_rollback_leaves_no_gap, setup, teardown),
        cmocka_unit_test_setup_teardown(test_memory_read_concurrent, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_memory_read_fn_stops, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_memory_read_checkpoints, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_memory_read_head_and_lag,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_memory_read_wakes_listeners,
                                        setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
