/*
 * The read side (eventastic/subscription.h) on both stores: the global
 * order seen by concurrent readers while writers commit, roll back and
 * hold transactions open; readers resumed from a checkpoint; projections
 * in both modes, failing, stopped and resumed, rebuilt.
 *
 * The reference model is a set: the ids of the events whose transaction
 * committed (the writers note them after es_txn_commit returned 0).  A
 * reader must see exactly that set, each once, in one order that every
 * reader shares.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "eventastic.h"
#include "fixtures/counter.h"
#include "fixtures/ids.h"
#include "fixtures/pg.h"

typedef fixture_store fixture;
#define setup_memory fixture_store_setup_memory
#define setup_pg fixture_store_setup_pg
#define teardown fixture_store_teardown

/* ---- the reference: committed event ids ---- */

typedef struct idset {
    pthread_mutex_t lock;
    es_uuid *ids;
    size_t n, cap;
} idset;

static void idset_add(idset *s, const es_uuid *id)
{
    pthread_mutex_lock(&s->lock);
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 256;
        s->ids = realloc(s->ids, s->cap * sizeof *s->ids);
        assert_non_null(s->ids);
    }
    s->ids[s->n++] = *id;
    pthread_mutex_unlock(&s->lock);
}

static int cmp_uuid(const void *a, const void *b)
{
    return memcmp(a, b, sizeof(es_uuid));
}

/* Save one counter context; commit (noting its events) or roll back. */
static int save_counter(es_store *store, counter_context *ctx, bool commit,
                        int hold_ms, idset *committed)
{
    es_txn *txn = NULL;
    es_error err = {0};
    es_context *raw = counter_context_raw(ctx);
    size_t n = es_context_uncommitted_count(raw);
    es_uuid ids[16];
    assert_true(n <= 16);
    for (size_t i = 0; i < n; i++) ids[i] = es_context_uncommitted(raw, i)->id;
    int rc = es_store_begin(store, &txn, &err);
    if (rc != 0) return rc;
    rc = counter_save(txn, ctx, &err);
    if (rc != 0 || !commit) {
        es_txn_rollback(txn);
        return rc;
    }
    if (hold_ms > 0) usleep((useconds_t)hold_ms * 1000);
    rc = es_txn_commit(txn, &err);
    if (rc == 0)
        for (size_t i = 0; i < n; i++) idset_add(committed, &ids[i]);
    return rc;
}

/* ---- a reader: everything it saw, in order ---- */

typedef struct seen {
    es_uuid *ids;
    es_position *pos;
    size_t n, cap;
    bool order_ok; /* positions strictly increasing */
} seen;

static int note_event(void *ud, const es_recorded_event *ev)
{
    seen *s = ud;
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 256;
        s->ids = realloc(s->ids, s->cap * sizeof *s->ids);
        s->pos = realloc(s->pos, s->cap * sizeof *s->pos);
        if (s->ids == NULL || s->pos == NULL) return ES_ENOMEM;
    }
    if (s->n > 0 && es_position_compare(&s->pos[s->n - 1], &ev->position) >= 0)
        s->order_ok = false;
    s->ids[s->n] = ev->event.id;
    s->pos[s->n] = ev->position;
    s->n++;
    return 0;
}

static void seen_free(seen *s)
{
    free(s->ids);
    free(s->pos);
}

/* Read everything readable after *at in chunks of max.  Returns 0 or
 * the failed read's status (message printed): readers run on threads of
 * their own, where cmocka's asserts cannot be used. */
static int read_rest(es_store *store, es_position *at, size_t max,
                     seen *out)
{
    for (;;) {
        size_t count = 0;
        es_error err = {0};
        int rc = es_store_read_all(store, at, max, note_event, out, &count,
                                   at, &err);
        if (rc != 0) {
            fprintf(stderr, "read_all: %s\n", err.message);
            return rc;
        }
        if (count < max) return 0;
    }
}

/* ---- writers ---- */

typedef struct writer {
    es_store *store;
    idset *committed;
    int rounds;
    unsigned seed;
    int failures;
} writer;

static void *writer_main(void *arg)
{
    writer *w = arg;
    for (int i = 0; i < w->rounds; i++) {
        counter_context *ctx = NULL;
        es_uuid id;
        if (counter_start(&ctx, &id, NULL) != 0) {
            w->failures++;
            continue;
        }
        int extra = (int)(rand_r(&w->seed) % 3);
        for (int k = 0; k < extra; k++) {
            counter_event add = counter_add(k + 1);
            counter_record(ctx, &add, NULL);
        }
        unsigned r = rand_r(&w->seed) % 10;
        bool commit = r != 0;            /* one in ten rolls back */
        int hold = r == 1 ? 20 : 0;      /* one in ten holds its commit */
        if (save_counter(w->store, ctx, commit, hold, w->committed) != 0)
            w->failures++;
        counter_context_free(ctx);
    }
    return NULL;
}

typedef struct follower {
    es_store *store;
    atomic_bool *done;
    es_position at;
    seen s;
    size_t max;
    int rc; /* the first failed read's status */
} follower;

static void *follower_main(void *arg)
{
    follower *f = arg;
    while (!atomic_load(f->done) && f->rc == 0) {
        f->rc = read_rest(f->store, &f->at, f->max, &f->s);
        usleep(1000);
    }
    if (f->rc == 0) f->rc = read_rest(f->store, &f->at, f->max, &f->s);
    return NULL;
}

/* Many writers, some rolling back, some holding their commit for a
 * while; two readers follow while they write, a third reads everything
 * at the end in chunks of 3.  Each sees every committed event once, in
 * the same order. */
static void test_read_concurrent_writers_every_event_once(void **state)
{
    fixture *f = *state;
    idset committed = {.lock = PTHREAD_MUTEX_INITIALIZER};
    enum { WRITERS = 4 };
    writer w[WRITERS];
    pthread_t wt[WRITERS], ft[2];
    atomic_bool done = false;
    follower fl[2];
    memset(fl, 0, sizeof fl);
    for (int i = 0; i < 2; i++) {
        fl[i].store = f->store;
        fl[i].done = &done;
        fl[i].s.order_ok = true;
        fl[i].max = i == 0 ? 50 : 7;
        assert_int_equal(pthread_create(&ft[i], NULL, follower_main, &fl[i]),
                         0);
    }
    for (int i = 0; i < WRITERS; i++) {
        w[i] = (writer){f->store, &committed, f->pg ? 150 : 2000,
                        (unsigned)(i * 7919 + 1), 0};
        assert_int_equal(pthread_create(&wt[i], NULL, writer_main, &w[i]), 0);
    }
    for (int i = 0; i < WRITERS; i++) {
        pthread_join(wt[i], NULL);
        assert_int_equal(w[i].failures, 0);
    }
    atomic_store(&done, true);
    for (int i = 0; i < 2; i++) {
        pthread_join(ft[i], NULL);
        assert_int_equal(fl[i].rc, 0);
    }
    seen late = {.order_ok = true};
    es_position at = {0, 0};
    assert_int_equal(read_rest(f->store, &at, 3, &late), 0);

    assert_true(committed.n > 0);
    qsort(committed.ids, committed.n, sizeof(es_uuid), cmp_uuid);
    seen *all[3] = {&fl[0].s, &fl[1].s, &late};
    for (int r = 0; r < 3; r++) {
        seen *s = all[r];
        assert_true(s->order_ok);
        assert_int_equal(s->n, committed.n);
        /* same order as the late reader */
        assert_memory_equal(s->ids, late.ids, s->n * sizeof(es_uuid));
        assert_memory_equal(s->pos, late.pos, s->n * sizeof(es_position));
        es_uuid *sorted = malloc(s->n * sizeof *sorted);
        assert_non_null(sorted);
        memcpy(sorted, s->ids, s->n * sizeof *sorted);
        qsort(sorted, s->n, sizeof *sorted, cmp_uuid);
        assert_memory_equal(sorted, committed.ids, s->n * sizeof(es_uuid));
        free(sorted);
    }
    es_position head;
    assert_int_equal(es_store_head(f->store, &head, NULL), 0);
    assert_int_equal(es_position_compare(&head, &late.pos[late.n - 1]), 0);
    for (int i = 0; i < 2; i++) seen_free(&fl[i].s);
    seen_free(&late);
    free(committed.ids);
}

/* A transaction that stays open holds back what committed after it
 * began (never skipped): the reader gets its events once it commits. */
static void test_read_open_transaction_is_waited_for_not_skipped(void **state)
{
    fixture *f = *state;
    idset committed = {.lock = PTHREAD_MUTEX_INITIALIZER};
    counter_context *slow = NULL, *fast = NULL;
    assert_int_equal(counter_start(&slow, NULL, NULL), 0);
    assert_int_equal(counter_start(&fast, NULL, NULL), 0);
    es_uuid slow_ev = es_context_uncommitted(counter_context_raw(slow), 0)->id;
    es_txn *open = NULL;
    assert_int_equal(es_store_begin(f->store, &open, NULL), 0);
    assert_int_equal(counter_save(open, slow, NULL), 0);
    assert_int_equal(save_counter(f->store, fast, true, 0, &committed), 0);
    seen s = {.order_ok = true};
    es_position at = {0, 0};
    int rc = read_rest(f->store, &at, 10, &s);
    size_t before = s.n;
    /* commit before asserting: a failed assert must not leave the
     * transaction open (the teardown's DROP SCHEMA would wait for it) */
    assert_int_equal(es_txn_commit(open, NULL), 0);
    assert_int_equal(rc, 0);
    /* memory: the open transaction has written nothing yet; PostgreSQL:
     * the fast commit waits behind it */
    assert_int_equal(before, f->pg ? 0 : 1);
    assert_int_equal(read_rest(f->store, &at, 10, &s), 0);
    assert_int_equal(s.n, 2);
    bool found = false;
    for (size_t i = 0; i < s.n; i++)
        found = found || es_uuid_equal(&s.ids[i], &slow_ev);
    assert_true(found);
    assert_true(s.order_ok);
    counter_context_free(slow);
    counter_context_free(fast);
    seen_free(&s);
    free(committed.ids);
}

/* ---- projections ---- */

typedef struct model {
    atomic_int applied;   /* handler calls that succeeded */
    atomic_int fail_at;   /* fail the call with this number (0: never) */
    atomic_int fail_times; /* ... this many times */
    atomic_int calls;
    bool pg;
    char schema[40];
    /* memory read model: event ids applied, in order */
    seen events;
} model;

static int model_apply(void *ud, es_txn *txn, const es_recorded_event *ev,
                       es_error *err)
{
    model *m = ud;
    int call = atomic_fetch_add(&m->calls, 1) + 1;
    if (m->pg && txn != NULL) {
        char sql[200];
        snprintf(sql, sizeof sql, "INSERT INTO \"%s\".rm (event_id) VALUES "
                 "($1::uuid)", m->schema);
        char idtxt[37];
        es_uuid_format(&ev->event.id, idtxt);
        const char *vals[1] = {idtxt};
        PGresult *r = PQexecParams(es_pg_txn_conn(txn), sql, 1, NULL, vals,
                                   NULL, NULL, 0);
        bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        PQclear(r);
        if (!ok) return ES_EDB;
    } else {
        note_event(&m->events, ev);
    }
    if (call == atomic_load(&m->fail_at) &&
        atomic_fetch_sub(&m->fail_times, 1) > 0) {
        atomic_store(&m->fail_at, call + 1); /* the retry fails later */
        snprintf(err->message, sizeof err->message, "injected failure");
        err->code = ES_EIO;
        return ES_EIO;
    }
    atomic_fetch_add(&m->applied, 1);
    return 0;
}

static int model_reset(void *ud, es_txn *txn, es_error *err)
{
    (void)err;
    model *m = ud;
    if (m->pg && txn != NULL) {
        char sql[120];
        snprintf(sql, sizeof sql, "DELETE FROM \"%s\".rm", m->schema);
        PGresult *r = PQexec(es_pg_txn_conn(txn), sql);
        bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        PQclear(r);
        return ok ? 0 : ES_EDB;
    }
    m->events.n = 0;
    return 0;
}

static void make_events(fixture *f, int counters, idset *committed)
{
    for (int i = 0; i < counters; i++) {
        counter_context *ctx = NULL;
        assert_int_equal(counter_start(&ctx, NULL, NULL), 0);
        counter_event add = counter_add(i);
        assert_int_equal(counter_record(ctx, &add, NULL), 0);
        assert_int_equal(save_counter(f->store, ctx, true, 0, committed), 0);
        counter_context_free(ctx);
    }
}

/* The read model's event ids, sorted (PostgreSQL: the table). */
static size_t model_ids(fixture *f, model *m, es_uuid **out)
{
    if (!m->pg) {
        *out = malloc((m->events.n + 1) * sizeof **out);
        memcpy(*out, m->events.ids, m->events.n * sizeof **out);
        qsort(*out, m->events.n, sizeof **out, cmp_uuid);
        return m->events.n;
    }
    (void)f;
    PGconn *c = fixture_pg_connect();
    assert_non_null(c);
    char sql[120];
    snprintf(sql, sizeof sql, "SELECT event_id::text FROM \"%s\".rm",
             m->schema);
    PGresult *r = PQexec(c, sql);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    size_t n = (size_t)PQntuples(r);
    *out = malloc((n + 1) * sizeof **out);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(es_uuid_parse(PQgetvalue(r, (int)i, 0), &(*out)[i]),
                         0);
    PQclear(r);
    PQfinish(c);
    qsort(*out, n, sizeof **out, cmp_uuid);
    return n;
}

static void model_init(fixture *f, model *m)
{
    memset(m, 0, sizeof *m);
    m->events.order_ok = true;
    m->pg = f->pg;
    if (!f->pg) return;
    snprintf(m->schema, sizeof m->schema, "%s", f->schema);
    PGconn *c = fixture_pg_connect();
    assert_non_null(c);
    char sql[160];
    snprintf(sql, sizeof sql, "CREATE TABLE \"%s\".rm (event_id uuid "
             "PRIMARY KEY)", m->schema);
    PGresult *r = PQexec(c, sql);
    assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
    PQfinish(c);
}

static es_projection *start(fixture *f, model *m, const char *name,
                            es_projection_mode mode, size_t batch)
{
    es_projection_config *cfg = NULL;
    es_projection *p = NULL;
    es_error err = {0};
    assert_int_equal(es_projection_config_new(&cfg, &err), 0);
    assert_int_equal(es_projection_config_set_name(cfg, name, &err), 0);
    assert_int_equal(es_projection_config_set_handler(cfg, model_apply,
                                                      model_reset, m, &err),
                     0);
    assert_int_equal(es_projection_config_set_mode(cfg, mode, &err), 0);
    assert_int_equal(es_projection_config_set_batch(cfg, batch, &err), 0);
    assert_int_equal(es_projection_config_set_retry(cfg, 1, 5, 4, &err), 0);
    assert_int_equal(es_projection_config_set_poll_ms(cfg, 20, &err), 0);
    assert_int_equal(es_projection_start(f->store, cfg, &p, &err), 0);
    es_projection_config_free(cfg);
    return p;
}

/* Wait until p has applied everything up to the head, and found that it
 * is at the head (a full last batch reads once more first). */
static void wait_head(fixture *f, es_projection *p)
{
    es_position head;
    assert_int_equal(es_store_head(f->store, &head, NULL), 0);
    assert_int_equal(es_projection_wait(p, &head, 10000), 0);
    es_projection_stats st;
    for (int i = 0; i < 1000; i++) {
        assert_int_equal(es_projection_stats_get(p, &st), 0);
        if (st.state == ES_PROJECTION_LIVE) return;
        usleep(2000);
    }
    fail_msg("the projection never reached the head (state %d)", st.state);
}

static void assert_model_is(fixture *f, model *m, idset *committed)
{
    es_uuid *got = NULL;
    size_t n = model_ids(f, m, &got);
    qsort(committed->ids, committed->n, sizeof(es_uuid), cmp_uuid);
    assert_int_equal(n, committed->n);
    assert_memory_equal(got, committed->ids, n * sizeof(es_uuid));
    free(got);
}

/* Exactly once on PostgreSQL (the read model's rows and the checkpoint in
 * one transaction; a duplicate would break the table's primary key),
 * at least once in memory (the model then dedups nothing: the memory
 * store's projection reads each event once unless a batch fails).  A
 * failure injected after the handler's write rolls the batch back; a
 * stop and a restart resume from the checkpoint. */
static void test_projection_resumes_and_counts_each_event_once(void **state)
{
    fixture *f = *state;
    idset committed = {.lock = PTHREAD_MUTEX_INITIALIZER};
    model m;
    model_init(f, &m);
    make_events(f, 40, &committed);
    atomic_store(&m.fail_at, 17);
    atomic_store(&m.fail_times, 2);
    es_projection *p = start(f, &m, "rm.once", ES_PROJECTION_EXACTLY_ONCE, 8);
    wait_head(f, p);
    es_projection_stats st;
    assert_int_equal(es_projection_stats_get(p, &st), 0);
    assert_int_equal(st.failures, 2);
    assert_int_equal(st.state, ES_PROJECTION_LIVE);
    assert_int_equal(st.last_error.code, ES_EIO);
    es_projection_stop(p);
    if (!f->pg) { /* in memory the failed batch's calls stay: drop dups */
        qsort(m.events.ids, m.events.n, sizeof(es_uuid), cmp_uuid);
        size_t k = 0;
        for (size_t i = 0; i < m.events.n; i++)
            if (k == 0 || !es_uuid_equal(&m.events.ids[k - 1],
                                         &m.events.ids[i]))
                m.events.ids[k++] = m.events.ids[i];
        m.events.n = k;
    }
    assert_model_is(f, &m, &committed);
    /* more events while stopped; a restart resumes at the checkpoint */
    make_events(f, 15, &committed);
    int before = atomic_load(&m.applied);
    p = start(f, &m, "rm.once", ES_PROJECTION_EXACTLY_ONCE, 8);
    wait_head(f, p);
    assert_int_equal(atomic_load(&m.applied) - before, 15 * 2);
    es_checkpoint *cps = NULL;
    size_t ncp = 0;
    assert_int_equal(es_checkpoint_list(f->store, &cps, &ncp, NULL), 0);
    assert_int_equal(ncp, 1);
    assert_string_equal(cps[0].name, "rm.once");
    es_position head;
    assert_int_equal(es_store_head(f->store, &head, NULL), 0);
    assert_int_equal(es_position_compare(&cps[0].position, &head), 0);
    es_free(cps);
    /* live: new events arrive without a restart */
    make_events(f, 5, &committed);
    wait_head(f, p);
    es_projection_stop(p);
    assert_model_is(f, &m, &committed);
    seen_free(&m.events);
    free(committed.ids);
}

/* A handler that keeps failing stops the projection in FAILED at the
 * event before, with the error; nothing after it is skipped; a rebuild
 * starts over from an empty read model. */
static void test_projection_failing_handler_stops_never_skips(void **state)
{
    fixture *f = *state;
    idset committed = {.lock = PTHREAD_MUTEX_INITIALIZER};
    model m;
    model_init(f, &m);
    make_events(f, 10, &committed);
    atomic_store(&m.fail_at, 5);
    atomic_store(&m.fail_times, 1000);
    es_projection *p = start(f, &m, "rm.fail", ES_PROJECTION_EXACTLY_ONCE, 3);
    es_position head;
    assert_int_equal(es_store_head(f->store, &head, NULL), 0);
    assert_int_equal(es_projection_wait(p, &head, 10000), ES_EIO);
    es_projection_stats st;
    assert_int_equal(es_projection_stats_get(p, &st), 0);
    assert_int_equal(st.state, ES_PROJECTION_FAILED);
    assert_int_equal(st.failures, 4); /* max_attempts */
    assert_string_equal(st.last_error.message, "injected failure");
    /* the first batch (3 events) went in; the second never did */
    assert_int_equal(st.applied, 3);
    es_checkpoint *cps = NULL;
    size_t ncp = 0;
    assert_int_equal(es_checkpoint_list(f->store, &cps, &ncp, NULL), 0);
    assert_int_equal(ncp, 1);
    assert_int_equal(es_position_compare(&cps[0].position, &st.position), 0);
    es_free(cps);
    /* rebuild: the handler heals, the model is rebuilt from scratch */
    atomic_store(&m.fail_at, 0);
    if (!f->pg) m.events.n = 0;
    assert_int_equal(es_projection_rebuild(p, NULL), 0);
    wait_head(f, p);
    es_projection_stop(p);
    assert_model_is(f, &m, &committed);
    assert_int_equal(es_checkpoint_reset(f->store, "rm.fail", NULL), 0);
    assert_int_equal(es_checkpoint_reset(f->store, "rm.fail", NULL),
                     ES_ENOTFOUND);
    es_error err = {0};
    assert_int_equal(es_checkpoint_reset(f->store, "bad name", &err),
                     ES_EINVAL);
    seen_free(&m.events);
    free(committed.ids);
}

/* A projection on another store handle (another process, to the
 * database) hears of commits at once through LISTEN/NOTIFY: its poll is
 * a minute, and the events arrive within seconds. */
static void test_projection_woken_by_another_process(void **state)
{
    fixture *f = *state;
    if (!f->pg) return; /* one process is all a memory store has */
    es_store *other = NULL;
    assert_int_equal(fixture_pg_open(f->schema, &other), 0);
    idset committed = {.lock = PTHREAD_MUTEX_INITIALIZER};
    model m;
    model_init(f, &m);
    es_projection_config *cfg = NULL;
    es_projection *p = NULL;
    assert_int_equal(es_projection_config_new(&cfg, NULL), 0);
    assert_int_equal(es_projection_config_set_name(cfg, "rm.woken", NULL), 0);
    assert_int_equal(es_projection_config_set_handler(cfg, model_apply,
                                                      model_reset, &m, NULL),
                     0);
    assert_int_equal(es_projection_config_set_poll_ms(cfg, 60000, NULL), 0);
    assert_int_equal(es_projection_start(other, cfg, &p, NULL), 0);
    es_projection_config_free(cfg);
    es_projection_stats st;
    for (int i = 0; i < 500; i++) { /* its first read: at the head */
        assert_int_equal(es_projection_stats_get(p, &st), 0);
        if (st.state == ES_PROJECTION_LIVE) break;
        usleep(10000);
    }
    assert_int_equal(st.state, ES_PROJECTION_LIVE);
    usleep(200000); /* its LISTEN is set up */
    make_events(f, 3, &committed); /* through f->store, not other */
    es_position head;
    assert_int_equal(es_store_head(f->store, &head, NULL), 0);
    assert_int_equal(es_projection_wait(p, &head, 5000), 0);
    es_projection_stop(p);
    assert_int_equal(es_store_close(other), 0);
    seen_free(&m.events);
    free(committed.ids);
}

int main(void)
{
#define BOTH(setup)                                                          \
    cmocka_unit_test_setup_teardown(                                         \
        test_read_concurrent_writers_every_event_once, setup, teardown),     \
    cmocka_unit_test_setup_teardown(                                         \
        test_read_open_transaction_is_waited_for_not_skipped, setup,         \
        teardown),                                                           \
    cmocka_unit_test_setup_teardown(                                         \
        test_projection_resumes_and_counts_each_event_once, setup,           \
        teardown),                                                           \
    cmocka_unit_test_setup_teardown(                                         \
        test_projection_failing_handler_stops_never_skips, setup, teardown), \
    cmocka_unit_test_setup_teardown(                                         \
        test_projection_woken_by_another_process, setup, teardown)
    const struct CMUnitTest memory[] = {BOTH(setup_memory)};
    const struct CMUnitTest pg[] = {BOTH(setup_pg)};
    int failed = cmocka_run_group_tests_name("memory store", memory, NULL,
                                             NULL);
    if (getenv("DATABASE_URL") == NULL) {
        printf("test_pg_read: DATABASE_URL is not set (tests/run.py sets "
               "it): the PostgreSQL half did not run\n");
        return failed ? failed : 1;
    }
    return failed + cmocka_run_group_tests_name("postgres store", pg, NULL,
                                                NULL);
}
