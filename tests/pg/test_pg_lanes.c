/*
 * The host's group commit on PostgreSQL (DATABASE_URL): the batch writer
 * (one statement for the events of many aggregates, one for their command
 * ids, one for their side effects) and the commit lanes.  A conflicting
 * aggregate among many fails alone and is decided again; connections
 * killed from another session during batches and during COMMIT leave
 * every command with exactly one outcome, the true one; command ids
 * survive a restart of the host; encryption at rest still seals; the
 * snapshot writer blocked in the database never holds up a command, and
 * writes only the latest of an aggregate's queued snapshots.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "eventastic.h"
#include "fixtures/counter.h"
#include "store/batch_ops.h"
#include "store/store_impl.h"
#include "fixtures/pg.h"
#include "fixtures/pg_stop.h"

#define APP_NAME "es_lanes_victim"

static es_store *g_store;
static char g_schema[64];


static es_command command(uint8_t value[4], int32_t v)
{
    for (int i = 0; i < 4; i++) value[i] = (uint8_t)((uint32_t)v >> (8 * i));
    es_command c = {{{0}}, 1, value, 4};
    es_uuid_v7(&c.id);
    return c;
}

static es_host *open_host(es_store *store, unsigned lanes)
{
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    if (es_host_config_new(&cfg, NULL) != 0 ||
        es_host_config_set_lanes(cfg, lanes) != 0 ||
        es_host_config_add_type(cfg, &counter_type, counter_decide_add, NULL,
                                NULL) ||
        es_host_open(cfg, store, &host, NULL) != 0)
        host = NULL;
    es_host_config_free(cfg);
    return host;
}

static void check_counter(es_store *store, const es_uuid *key,
                          int32_t result, uint64_t version)
{
    counter_context *ctx = NULL;
    assert_int_equal(counter_store_load(store, key, &ctx, NULL), 0);
    assert_int_equal(counter_state(ctx)->result, result);
    assert_int_equal(counter_version(ctx), version);
    counter_context_free(ctx);
}

/* ---- a conflicting aggregate among many ---- */

#define MANY 48

typedef struct waiter {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int left;
    int status[MANY];
    uint64_t version[MANY];
} waiter;

typedef struct slot {
    waiter *w;
    int i;
} slot;

static void on_done(void *ud, const es_host_result *r)
{
    slot *s = ud;
    pthread_mutex_lock(&s->w->lock);
    s->w->status[s->i] = r->status;
    s->w->version[s->i] = r->version;
    s->w->left--;
    pthread_cond_signal(&s->w->cond);
    pthread_mutex_unlock(&s->w->lock);
}

static void test_pg_lanes_conflict_among_many(void **state)
{
    (void)state;
    es_host *host = open_host(g_store, 1); /* one lane: one batch */
    assert_non_null(host);
    es_uuid keys[MANY];
    uint8_t value[4];
    for (int k = 0; k < MANY; k++) {
        es_uuid_v7(&keys[k]);
        es_command c = command(value, 1);
        assert_int_equal(
            es_host_call(host, &counter_type, &keys[k], &c, NULL, NULL), 0);
    }
    /* another writer appends version 2 of one aggregate */
    counter_context *ctx = NULL;
    es_txn *txn = NULL;
    counter_event add = counter_add(100);
    assert_int_equal(counter_store_load(g_store, &keys[7], &ctx, NULL), 0);
    assert_int_equal(counter_record(ctx, &add, NULL), 0);
    assert_int_equal(es_store_begin(g_store, &txn, NULL), 0);
    assert_int_equal(counter_save(txn, ctx, NULL), 0);
    assert_int_equal(es_txn_commit(txn, NULL), 0);
    counter_context_free(ctx);

    static waiter w;
    memset(&w, 0, sizeof w);
    pthread_mutex_init(&w.lock, NULL);
    pthread_cond_init(&w.cond, NULL);
    w.left = MANY;
    static slot slots[MANY];
    uint8_t values[MANY][4];
    for (int k = 0; k < MANY; k++) {
        slots[k] = (slot){&w, k};
        es_command c = command(values[k], 10);
        assert_int_equal(es_host_send(host, &counter_type, &keys[k], &c,
                                      on_done, &slots[k], NULL),
                         0);
    }
    pthread_mutex_lock(&w.lock);
    while (w.left > 0) pthread_cond_wait(&w.cond, &w.lock);
    pthread_mutex_unlock(&w.lock);
    es_host_metrics m;
    es_host_metrics_get(host, &m);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    for (int k = 0; k < MANY; k++) {
        assert_int_equal(w.status[k], 0);
        assert_int_equal(w.version[k], k == 7 ? 3 : 2);
        check_counter(g_store, &keys[k], k == 7 ? 111 : 11, k == 7 ? 3 : 2);
    }
    assert_true(m.conflicts >= 1);
    /* the innocent ones went in batches, not one transaction each */
    assert_true(m.batches < MANY + MANY / 2);
    pthread_mutex_destroy(&w.lock);
    pthread_cond_destroy(&w.cond);
}

/* ---- connections killed during batches and COMMIT ---- */

#define KEYS 8
#define PRODUCERS 4
#define SENDS 80
/* The producers go on past SENDS until the killer has terminated this
 * many of the host's backends, of which this many were busy (in a
 * statement or inside a transaction), or until KILL_DEADLINE_MS. */
#define KILLS_MIN 40
#define BUSY_KILLS_MIN 10
#define KILL_DEADLINE_MS 60000

typedef struct shared {
    es_host *host;
    es_uuid keys[KEYS];
    atomic_int sent, ok[KEYS], failed;
    atomic_bool done;
    atomic_int kills, busy_kills;
    long long deadline;
    /* set by the killer when it could not do its work; the test fails */
    atomic_bool killer_failed;
    char killer_why[256];
} shared;

typedef struct producer {
    shared *s;
    int id;
} producer;

static bool enough_kills(shared *s)
{
    return atomic_load(&s->killer_failed) || fixture_now_ms() > s->deadline ||
           (atomic_load(&s->kills) >= KILLS_MIN &&
            atomic_load(&s->busy_kills) >= BUSY_KILLS_MIN);
}

static void *produce(void *arg)
{
    producer *p = arg;
    for (int i = 0; i < SENDS || !enough_kills(p->s); i++) {
        int k = (i + p->id) % KEYS;
        uint8_t value[4];
        es_command c = command(value, 1);
        atomic_fetch_add(&p->s->sent, 1);
        int rc = es_host_call(p->s->host, &counter_type, &p->s->keys[k], &c,
                              NULL, NULL);
        if (rc == 0)
            atomic_fetch_add(&p->s->ok[k], 1);
        else
            atomic_fetch_add(&p->s->failed, 1);
    }
    return NULL;
}

/* Terminates the host's connections (by application name) now and then,
 * counting them and those of them that were busy.  When it cannot connect
 * or its query fails it says why in killer_why and sets killer_failed:
 * without kills the test would be a plain load test. */
static void *killer(void *arg)
{
    shared *s = arg;
    PGconn *c = fixture_pg_connect();
    if (c == NULL) {
        snprintf(s->killer_why, sizeof s->killer_why, "cannot connect");
        atomic_store(&s->killer_failed, true);
        return NULL;
    }
    unsigned seed = 7;
    while (!atomic_load(&s->done)) {
        PGresult *r = PQexec(
            c, "SELECT count(*) FILTER (WHERE t), "
               "count(*) FILTER (WHERE t AND state <> 'idle') FROM ("
               "SELECT pg_terminate_backend(pid) AS t, state "
               "FROM pg_stat_activity WHERE "
               "application_name = '" APP_NAME "') AS k");
        if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
            snprintf(s->killer_why, sizeof s->killer_why, "query: %s",
                     PQerrorMessage(c));
            atomic_store(&s->killer_failed, true);
            PQclear(r);
            break;
        }
        atomic_fetch_add(&s->kills, atoi(PQgetvalue(r, 0, 0)));
        atomic_fetch_add(&s->busy_kills, atoi(PQgetvalue(r, 0, 1)));
        PQclear(r);
        seed = seed * 1103515245u + 12345u;
        struct timespec ts = {0, (long)(20 + (seed >> 16) % 80) * 1000000L};
        nanosleep(&ts, NULL);
    }
    PQfinish(c);
    return NULL;
}

static es_store *open_victim_store(void)
{
    char ci[1024];
    fixture_pg_app_conninfo(ci, sizeof ci, APP_NAME);
    es_pg_config *cfg = NULL;
    es_store *store = NULL;
    if (es_pg_config_new(&cfg, NULL) != 0 ||
        es_pg_config_set_conninfo(cfg, ci, NULL) != 0 ||
        es_pg_config_set_schema(cfg, g_schema, NULL) != 0 ||
        es_pg_store_open(cfg, &store, NULL) != 0)
        store = NULL;
    es_pg_config_free(cfg);
    return store;
}

static void test_pg_lanes_killed_connections(void **state)
{
    (void)state;
    static shared s;
    memset(&s, 0, sizeof s);
    s.deadline = fixture_now_ms() + KILL_DEADLINE_MS;
    for (int k = 0; k < KEYS; k++) es_uuid_v7(&s.keys[k]);
    es_store *victim = open_victim_store();
    assert_non_null(victim);
    s.host = open_host(victim, 0);
    assert_non_null(s.host);
    pthread_t th[PRODUCERS], kt;
    producer ps[PRODUCERS];
    assert_int_equal(pthread_create(&kt, NULL, killer, &s), 0);
    for (int i = 0; i < PRODUCERS; i++) {
        ps[i] = (producer){&s, i};
        assert_int_equal(pthread_create(&th[i], NULL, produce, &ps[i]), 0);
    }
    for (int i = 0; i < PRODUCERS; i++) pthread_join(th[i], NULL);
    atomic_store(&s.done, true);
    pthread_join(kt, NULL);
    assert_int_equal(es_host_shutdown(s.host, NULL), 0);
    es_store_close(victim);
    /* Each command answered once (es_host_call returned); what was
     * acknowledged is stored and what failed is not: each stored add is 1,
     * and the first stored command also stored the reset. */
    int ok = 0;
    for (int k = 0; k < KEYS; k++) {
        int n = atomic_load(&s.ok[k]);
        ok += n;
        if (n > 0) check_counter(g_store, &s.keys[k], n, (uint64_t)n);
    }
    int kills = atomic_load(&s.kills), busy = atomic_load(&s.busy_kills);
    int failed = atomic_load(&s.failed);
    printf("killed connections: %d kills (%d busy), %d ok, %d failed\n",
           kills, busy, ok, failed);
    if (atomic_load(&s.killer_failed))
        fail_msg("the killer failed: %s", s.killer_why);
    assert_int_equal(ok + failed, atomic_load(&s.sent));
    assert_true(atomic_load(&s.sent) >= PRODUCERS * SENDS);
    assert_true(ok > 0);
    /* the connections really were killed, and some while at work */
    assert_true(kills >= KILLS_MIN);
    assert_true(busy >= BUSY_KILLS_MIN);
}

/* ---- command ids across a restart ---- */

static void test_pg_lanes_command_ids_survive_restart(void **state)
{
    (void)state;
    es_uuid key;
    es_uuid_v7(&key);
    uint8_t value[4], other[4];
    es_command c = command(value, 5);
    es_host *host = open_host(g_store, 0);
    assert_non_null(host);
    es_host_reply *r = NULL;
    assert_int_equal(es_host_call(host, &counter_type, &key, &c, &r, NULL),
                     0);
    assert_false(r->duplicate);
    uint64_t v = r->version;
    es_host_reply_free(r);
    assert_int_equal(es_host_shutdown(host, NULL), 0);

    host = open_host(g_store, 3);
    assert_non_null(host);
    assert_int_equal(es_host_call(host, &counter_type, &key, &c, &r, NULL),
                     0);
    assert_true(r->duplicate);
    assert_int_equal(r->version, v);
    assert_int_equal(r->n_events, 2);
    es_host_reply_free(r);
    es_command d = command(other, 6);
    d.id = c.id; /* same id, other content */
    assert_int_equal(es_host_call(host, &counter_type, &key, &d, NULL, NULL),
                     ES_EIDEMPOTENCY);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    check_counter(g_store, &key, 5, 1);
}

/* ---- encryption at rest through the batch writer ---- */

static void test_pg_lanes_encrypted(void **state)
{
    (void)state;
    char schema[64];
    fixture_pg_random_name(schema, sizeof schema, "lanes_enc_");
    static const uint8_t kek[ES_PG_KEY_BYTES] = {1, 2, 3, 4, 5};
    es_pg_config *cfg = NULL;
    es_store *store = NULL;
    assert_int_equal(es_pg_config_new(&cfg, NULL), 0);
    assert_int_equal(es_pg_config_set_schema(cfg, schema, NULL), 0);
    assert_int_equal(es_pg_config_add_key(cfg, "k1", kek, NULL), 0);
    assert_int_equal(es_pg_migrate(cfg, NULL, NULL), 0);
    assert_int_equal(es_pg_store_open(cfg, &store, NULL), 0);
    es_pg_config_free(cfg);
    es_host *host = open_host(store, 2);
    assert_non_null(host);
    es_uuid keys[12];
    for (int k = 0; k < 12; k++) {
        es_uuid_v7(&keys[k]);
        for (int i = 0; i < 3; i++) {
            uint8_t value[4];
            es_command c = command(value, k + i);
            assert_int_equal(
                es_host_call(host, &counter_type, &keys[k], &c, NULL, NULL),
                0);
        }
    }
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    for (int k = 0; k < 12; k++) check_counter(store, &keys[k], 3 * k + 3, 3);
    es_store_close(store);
    PGconn *c = fixture_pg_connect();
    assert_non_null(c);
    char q[512];
    snprintf(q, sizeof q,
             "SELECT (SELECT count(*) FROM \"%s\".events WHERE key_id IS "
             "NULL) + (SELECT count(*) FROM \"%s\".outbox WHERE key_id IS "
             "NULL), (SELECT count(*) FROM \"%s\".outbox)",
             schema, schema, schema);
    PGresult *r = PQexec(c, q);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), "0");
    assert_true(atoi(PQgetvalue(r, 0, 1)) > 0);
    PQclear(r);
    PQfinish(c);
    fixture_pg_drop_schema(schema);
}

/* ---- the snapshot writer: its own connection, coalescing ---- */

typedef struct snap_sender {
    es_host *host;
    es_uuid key;
    atomic_int done;
    int failed;
} snap_sender;

#define SNAP_SENDS 50

static void *snap_send(void *arg)
{
    snap_sender *s = arg;
    for (int i = 0; i < SNAP_SENDS; i++) {
        uint8_t value[4];
        es_command c = command(value, 1);
        if (es_host_call(s->host, &counter_type, &s->key, &c, NULL, NULL))
            s->failed++;
        atomic_fetch_add(&s->done, 1);
    }
    return NULL;
}

static long long sql_num(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    long long v = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1
                      ? atoll(PQgetvalue(r, 0, 0))
                      : -1;
    PQclear(r);
    return v;
}

static uint64_t snap_of_key(es_store *store, const es_uuid *key)
{
    es_txn *txn = NULL;
    es_snapshot *snap = NULL;
    uint64_t v = UINT64_MAX;
    if (es_store_begin(store, &txn, NULL) != 0) return v;
    if (es_txn_get_snapshot(txn, key, COUNTER_SNAPSHOT_VERSION, &snap,
                            NULL) == 0)
        v = snap->version;
    es_free(snap);
    es_txn_rollback(txn);
    return v;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* A store on the test's schema whose pool has one connection. */
static es_store *open_pool_of_one(void)
{
    es_pg_config *pcfg = NULL;
    es_store *store = NULL;
    assert_int_equal(es_pg_config_new(&pcfg, NULL), 0);
    assert_int_equal(es_pg_config_set_schema(pcfg, g_schema, NULL), 0);
    assert_int_equal(es_pg_config_set_pool_size(pcfg, 1, NULL), 0);
    assert_int_equal(es_pg_store_open(pcfg, &store, NULL), 0);
    es_pg_config_free(pcfg);
    return store;
}

/* A pool of one connection: were the snapshot writer to take it, the
 * lane could not commit while the writer waits.  The snapshots table is
 * locked against writes from another session; a command makes the writer
 * wait on the lock; then more commands, each asking for a snapshot, are
 * all acknowledged while it waits, and once the lock is released the
 * writer stores only the latest snapshot of the many queued. */
static void test_pg_lanes_snapshot_writer(void **state)
{
    (void)state;
    es_store *store = open_pool_of_one();
    es_host_config *cfg = NULL;
    static snap_sender s;
    memset(&s, 0, sizeof s);
    assert_int_equal(es_host_config_new(&cfg, NULL), 0);
    assert_int_equal(es_host_config_set_lanes(cfg, 1), 0);
    assert_int_equal(es_host_config_set_snapshots(cfg, 1, false), 0);
    assert_int_equal(es_host_config_set_snapshot_slow_load(cfg, 0), 0);
    assert_int_equal(
        es_host_config_add_type(cfg, &counter_type, counter_decide_add, NULL,
                                NULL),
        0);
    assert_int_equal(es_host_open(cfg, store, &s.host, NULL), 0);
    es_host_config_free(cfg);
    es_uuid_v7(&s.key);
    uint8_t value[4];
    es_command first = command(value, 1);
    assert_int_equal(
        es_host_call(s.host, &counter_type, &s.key, &first, NULL, NULL), 0);
    es_host_metrics m0;
    es_host_metrics_get(s.host, &m0);
    for (int i = 0; i < 500 && m0.snapshots < 1; i++) { /* counted */
        sleep_ms(10);
        es_host_metrics_get(s.host, &m0);
    }
    assert_int_equal(m0.snapshots, 1);
    assert_int_equal(snap_of_key(g_store, &s.key), 1);

    PGconn *lock = fixture_pg_connect();
    assert_non_null(lock);
    char q[256];
    snprintf(q, sizeof q,
             "BEGIN; LOCK TABLE \"%s\".snapshots IN SHARE MODE", g_schema);
    PGresult *r = PQexec(lock, q);
    assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
    /* asked outside the locking transaction: pg_stat_activity is read
     * once per transaction */
    PGconn *watch = fixture_pg_connect();
    assert_non_null(watch);
    static const char waiting_sql[] =
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
        "'Lock' AND query ILIKE '%snapshots%'";
    es_command trigger = command(value, 1);
    assert_int_equal(
        es_host_call(s.host, &counter_type, &s.key, &trigger, NULL, NULL), 0);
    long long blocked = 0;
    for (int i = 0; i < 1000 && blocked != 1; i++) {
        sleep_ms(10);
        blocked = sql_num(watch, waiting_sql);
    }
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, snap_send, &s), 0);
    for (int i = 0; i < 2000 && atomic_load(&s.done) < SNAP_SENDS; i++)
        sleep_ms(10);
    int done_while_locked = atomic_load(&s.done);
    /* the writer is still there, waiting on the lock */
    long long waiting = sql_num(watch, waiting_sql);
    PQfinish(watch);
    PQclear(PQexec(lock, "COMMIT"));
    PQfinish(lock);
    pthread_join(th, NULL);
    /* the latest snapshot arrives */
    uint64_t last = SNAP_SENDS + 2;
    for (int i = 0; i < 500 && snap_of_key(g_store, &s.key) != last; i++)
        sleep_ms(10);
    uint64_t stored = snap_of_key(g_store, &s.key);
    es_host_metrics m;
    es_host_metrics_get(s.host, &m);
    assert_int_equal(es_host_shutdown(s.host, NULL), 0);
    es_store_close(store);
    printf("snapshot writer: %d of %d acknowledged while it waited on a "
           "lock (%lld waiting); %llu snapshots written for %d asked\n",
           done_while_locked, SNAP_SENDS, waiting,
           (unsigned long long)(m.snapshots - m0.snapshots), SNAP_SENDS);
    assert_int_equal(blocked, 1);
    assert_int_equal(done_while_locked, SNAP_SENDS);
    assert_int_equal(s.failed, 0);
    assert_int_equal(waiting, 1);
    assert_int_equal(stored, last);
    /* the write that waited on the lock (the trigger's snapshot), then
     * one for the SNAP_SENDS queued meanwhile */
    assert_int_equal(m.snapshots - m0.snapshots, 2);
    check_counter(g_store, &s.key, SNAP_SENDS + 2, last);
}

/* A pool of one connection, held by a transaction of the test (as a
 * burst of loads would hold the pool): a lane commits on a connection
 * of its own, so a command to a resident key still commits. */
static void test_pg_lanes_own_connections(void **state)
{
    (void)state;
    es_store *store = open_pool_of_one();
    es_host *host = open_host(store, 1);
    assert_non_null(host);
    es_uuid key;
    es_uuid_v7(&key);
    uint8_t value[4];
    es_command first = command(value, 1);
    assert_int_equal(es_host_call(host, &counter_type, &key, &first, NULL,
                                  NULL),
                     0); /* loaded: resident from now on */

    es_txn *held = NULL;
    assert_int_equal(es_store_begin(store, &held, NULL), 0);
    static waiter w;
    memset(&w, 0, sizeof w);
    pthread_mutex_init(&w.lock, NULL);
    pthread_cond_init(&w.cond, NULL);
    w.left = 1;
    slot sl = {&w, 0};
    es_command second = command(value, 1);
    assert_int_equal(es_host_send(host, &counter_type, &key, &second,
                                  on_done, &sl, NULL),
                     0);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 20;
    pthread_mutex_lock(&w.lock);
    while (w.left > 0 &&
           pthread_cond_timedwait(&w.cond, &w.lock, &ts) != ETIMEDOUT) {
    }
    int left_while_held = w.left;
    pthread_mutex_unlock(&w.lock);
    es_txn_rollback(held); /* the pool is free again */
    pthread_mutex_lock(&w.lock);
    while (w.left > 0) pthread_cond_wait(&w.cond, &w.lock);
    pthread_mutex_unlock(&w.lock);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    es_store_close(store);
    pthread_mutex_destroy(&w.lock);
    pthread_cond_destroy(&w.cond);
    assert_int_equal(left_while_held, 0); /* committed while the pool was
                                           * held */
    assert_int_equal(w.status[0], 0);
    check_counter(g_store, &key, 2, 2);
}


/* ---- the batch writer's prepared statements ---- */

/* The batch statements prepared on conn (its own session's view). */
static long prepared_batch_statements(PGconn *conn)
{
    PGresult *r = PQexec(conn, "SELECT count(*) FROM pg_prepared_statements "
                               "WHERE name LIKE 'es\\_batch\\_%'");
    long n = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1
                 ? atol(PQgetvalue(r, 0, 0))
                 : -1;
    PQclear(r);
    return n;
}

typedef struct batch_one {
    es__commit_item item;
    es_event ev;
    uint8_t data[4];
} batch_one;

/* A command creating a new aggregate with one event. */
static void batch_one_init(batch_one *b)
{
    memset(b, 0, sizeof *b);
    es_uuid agg, cmd;
    es_uuid_v7(&agg);
    es_uuid_v7(&cmd);
    es_uuid_v7(&b->ev.id);
    b->ev.kind = 1;
    b->ev.data = b->data;
    b->ev.len = sizeof b->data;
    b->item.type_name = "counter";
    b->item.aggregate_id = agg;
    b->item.group = b;
    b->item.events = &b->ev;
    b->item.n_events = 1;
    b->item.status = ES__COMMIT_PENDING;
    es__command_record rec = {cmd,  agg,   1,     b->data, sizeof b->data, 0,
                              1,    0,     false, false,   NULL, false};
    b->item.record = rec;
}

/* A lane connection prepares the batch statements once and writes its
 * batches with them; after the connection is lost, the new one prepares
 * them again (a batch on a connection without them would fail and be
 * left to the slow generic writer: write_batch would commit nothing). */
static void test_pg_lanes_prepared_after_reconnect(void **state)
{
    (void)state;
    es_store *store = g_store;
    void *conn = NULL;
    batch_one b[3];
    long pid[3] = {0, 0, 0};
    PGconn *admin = fixture_pg_connect();
    assert_non_null(admin);
    for (int i = 0; i < 3; i++) {
        batch_one_init(&b[i]);
        es__commit_item *it = &b[i].item;
        assert_int_equal(es__store_write_batch(store, &conn, &it, 1), 1);
        assert_int_equal(b[i].item.status, 0);
        assert_non_null(conn);
        assert_int_equal(prepared_batch_statements(conn), 3);
        pid[i] = PQbackendPID(conn);
        if (i == 1) { /* lose the connection before the third batch */
            char sql[96];
            snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%ld)",
                     pid[i]);
            PQclear(PQexec(admin, sql));
        }
    }
    assert_int_equal(pid[0], pid[1]); /* kept, prepared once */
    assert_int_not_equal(pid[1], pid[2]); /* a new one, prepared again */
    PQfinish(admin);
    es__store_background_close(store, &conn);
}

/* ---- half-open connections: the lane's backend frozen (SIGSTOP) ----
 *
 * A backend stopped with SIGSTOP keeps its socket open and says nothing:
 * to the lane it is a server or a network gone without a word.  The
 * victim stores get a short statement timeout, so the lane gives up on
 * a silent round trip after it and LANE_SILENCE_MARGIN_MS (5 s).  Every
 * backend stopped here is continued by the tests' teardown, whatever
 * happened. */

#define HALF_TIMEOUT_MS 200
#define HALF_SILENCE_MS (HALF_TIMEOUT_MS + 5000)
#define HALF_LOCK 4242 /* the advisory lock case (b)'s COMMIT waits on */

static int thaw_teardown(void **state)
{
    (void)state;
    fixture_pg_continue_all();
    return 0;
}

static es_store *open_half_store(const char *schema, const char *app)
{
    char ci[1024];
    fixture_pg_app_conninfo(ci, sizeof ci, app);
    es_pg_config *cfg = NULL;
    es_store *store = NULL;
    if (es_pg_config_new(&cfg, NULL) != 0 ||
        es_pg_config_set_conninfo(cfg, ci, NULL) != 0 ||
        es_pg_config_set_schema(cfg, schema, NULL) != 0 ||
        es_pg_config_set_pool_size(cfg, 1, NULL) != 0 ||
        es_pg_config_set_statement_timeout(cfg, HALF_TIMEOUT_MS, NULL) != 0 ||
        es_pg_migrate(cfg, NULL, NULL) != 0 ||
        es_pg_store_open(cfg, &store, NULL) != 0)
        store = NULL;
    es_pg_config_free(cfg);
    return store;
}

/* How many rows of the key are in the schema's events and commands, and
 * whether its versions run 1..n without a gap. */
static void stored_rows(PGconn *admin, const char *schema, const es_uuid *key,
                        const es_uuid *cmd, long long *events,
                        long long *max_version, long long *commands)
{
    char k[37], c[37], sql[512];
    es_uuid_format(key, k);
    es_uuid_format(cmd, c);
    snprintf(sql, sizeof sql,
             "SELECT (SELECT count(*) FROM \"%s\".events WHERE aggregate_id "
             "= $1::uuid), (SELECT coalesce(max(version), -1) FROM "
             "\"%s\".events WHERE aggregate_id = $1::uuid), (SELECT count(*) "
             "FROM \"%s\".commands WHERE command_id = $2::uuid)",
             schema, schema, schema);
    const char *values[2] = {k, c};
    PGresult *r = PQexecParams(admin, sql, 2, NULL, values, NULL, NULL, 0);
    bool ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;
    *events = ok ? atoll(PQgetvalue(r, 0, 0)) : -1;
    *max_version = ok ? atoll(PQgetvalue(r, 0, 1)) : -1;
    *commands = ok ? atoll(PQgetvalue(r, 0, 2)) : -1;
    PQclear(r);
}

/* Waits for the one command of w, up to ms (< 0: for ever); whether it
 * completed. */
static bool wait_done(waiter *w, long ms)
{
    long long end = fixture_now_ms() + ms;
    pthread_mutex_lock(&w->lock);
    while (w->left > 0 && (ms < 0 || fixture_now_ms() < end)) {
        pthread_mutex_unlock(&w->lock);
        sleep_ms(5);
        pthread_mutex_lock(&w->lock);
    }
    bool done = w->left == 0;
    pthread_mutex_unlock(&w->lock);
    return done;
}

typedef struct half_case {
    char schema[64], app[80];
    es_store *store;
    es_host *host;
    PGconn *admin;
    es_uuid key;
    es_command cmd;
    uint8_t value[4];
    waiter w;
    slot sl;
} half_case;

/* A store and a one-lane host of their own; the first command on the
 * key (the lane connects, the aggregate is resident from then on). */
static void half_open_case(half_case *hc, const char *prefix,
                           const char *extra_sql)
{
    memset(hc, 0, sizeof *hc);
    fixture_pg_random_name(hc->schema, sizeof hc->schema, prefix);
    snprintf(hc->app, sizeof hc->app, "es_%s", hc->schema);
    hc->admin = fixture_pg_connect();
    assert_non_null(hc->admin);
    hc->store = open_half_store(hc->schema, hc->app);
    assert_non_null(hc->store);
    if (extra_sql) {
        PGresult *r = PQexec(hc->admin, extra_sql);
        assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
        PQclear(r);
    }
    hc->host = open_host(hc->store, 1);
    assert_non_null(hc->host);
    es_uuid_v7(&hc->key);
    uint8_t value[4];
    es_command first = command(value, 1);
    assert_int_equal(
        es_host_call(hc->host, &counter_type, &hc->key, &first, NULL, NULL),
        0);
    pthread_mutex_init(&hc->w.lock, NULL);
    pthread_cond_init(&hc->w.cond, NULL);
    hc->w.left = 1;
    hc->sl = (slot){&hc->w, 0};
    hc->cmd = command(hc->value, 1);
}

static void half_send(half_case *hc)
{
    assert_int_equal(es_host_send(hc->host, &counter_type, &hc->key,
                                  &hc->cmd, on_done, &hc->sl, NULL),
                     0);
}

/* After the backend was continued: the command's truth in the database
 * (stored once if acknowledged, not at all if not; versions without a
 * gap), then everything closed. */
static void half_close(half_case *hc, pid_t old)
{
    assert_true(wait_done(&hc->w, 30000));
    /* the continued backend reads what is left on its socket and ends */
    pid_t still = 0;
    for (int i = 0; i < 500; i++) {
        char cond[64];
        snprintf(cond, sizeof cond, "pid = %d", (int)old);
        still = fixture_pg_backend_of(hc->admin, hc->app, cond, 0);
        if (still == 0) break;
        sleep_ms(10);
    }
    assert_int_equal(es_host_shutdown(hc->host, NULL), 0);
    es_store_close(hc->store);
    long long events, max_version, commands;
    stored_rows(hc->admin, hc->schema, &hc->key, &hc->cmd.id, &events,
                &max_version, &commands);
    PQfinish(hc->admin);
    pthread_mutex_destroy(&hc->w.lock);
    pthread_cond_destroy(&hc->w.cond);
    fixture_pg_drop_schema(hc->schema);
    assert_int_equal(still, 0);
    if (hc->w.status[0] == 0) {
        assert_int_equal(hc->w.version[0], 2);
        assert_int_equal(commands, 1);
        assert_int_equal(events, 3); /* reset, add, add: versions 0..2 */
        assert_int_equal(max_version, 2);
    } else {
        assert_int_equal(commands, 0);
        assert_int_equal(events, 2);
        assert_int_equal(max_version, 1);
    }
}

/* The backend cannot be stopped here: the case ends (its command, if
 * sent, completes once lock is freed), frees what it made and is
 * skipped, saying why. */
static void half_skip(half_case *hc, bool sent, PGconn *lock, const char *why)
{
    printf("half-open: skipped, %s\n", why);
    PQfinish(lock);
    if (sent) wait_done(&hc->w, -1);
    es_host_shutdown(hc->host, NULL);
    es_store_close(hc->store);
    PQfinish(hc->admin);
    pthread_mutex_destroy(&hc->w.lock);
    pthread_cond_destroy(&hc->w.cond);
    fixture_pg_drop_schema(hc->schema);
    skip();
}

/* (a) The lane's backend frozen before the batch: the writes go into a
 * socket nobody reads.  The lane gives up after the silence limit and
 * writes the batch on a new connection; the command is acknowledged, and
 * the continued backend (which never got a COMMIT) stores nothing. */
static void test_pg_lanes_half_open_before_writes(void **state)
{
    (void)state;
    static half_case hc;
    half_open_case(&hc, "half_a_", NULL);
    pid_t pid =
        fixture_pg_backend_of(hc.admin, hc.app, "query = 'COMMIT'", 1000);
    assert_int_not_equal(pid, 0);
    char why[160];
    if (!fixture_pg_stop(pid, why, sizeof why))
        half_skip(&hc, false, NULL, why);
    long long t0 = fixture_now_ms();
    half_send(&hc);
    bool done_frozen = wait_done(&hc.w, HALF_SILENCE_MS + 10000);
    long long took = fixture_now_ms() - t0;
    /* the lane writes on a connection of its own, not the frozen one */
    char cond[64];
    snprintf(cond, sizeof cond, "pid <> %d AND query = 'COMMIT'", (int)pid);
    pid_t fresh = fixture_pg_backend_of(hc.admin, hc.app, cond, 0);
    fixture_pg_continue_all();
    printf("half-open before the writes: status %d after %lld ms "
           "(silence limit %d ms), backend %d frozen, then %d\n",
           hc.w.status[0], took, HALF_SILENCE_MS, (int)pid, (int)fresh);
    assert_true(done_frozen);
    assert_int_equal(hc.w.status[0], 0);
    assert_int_not_equal(fresh, 0);
    half_close(&hc, pid);
}

/* (b) The lane's backend frozen while COMMIT is in flight, holding the
 * transaction with the batch's rows.  A deferred constraint trigger
 * makes COMMIT wait on an advisory lock the test holds (it waits on
 * past the statement timeout), so the backend is caught inside COMMIT
 * every time.  The lane hears nothing; the outcome is unknown while the
 * backend lives: a read back that does not see the rows proves nothing,
 * since the backend may still commit once it runs again.  The command
 * must not complete as failed while that can happen, and must end with
 * the truth once the backend runs again and the lock is free. */
static void test_pg_lanes_half_open_in_commit(void **state)
{
    (void)state;
    static half_case hc;
    char sql[1024];
    /* half_open_case names the schema: the trigger goes in after */
    half_open_case(&hc, "half_b_", NULL);
    snprintf(sql, sizeof sql,
             "CREATE FUNCTION \"%s\".hold() RETURNS trigger LANGUAGE plpgsql "
             "AS $$ BEGIN LOOP BEGIN PERFORM pg_advisory_xact_lock(%d); "
             "RETURN NULL; EXCEPTION WHEN query_canceled THEN NULL; END; "
             "END LOOP; END $$; CREATE CONSTRAINT TRIGGER hold AFTER INSERT "
             "ON \"%s\".commands DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
             "EXECUTE FUNCTION \"%s\".hold()",
             hc.schema, HALF_LOCK, hc.schema, hc.schema);
    PGresult *r = PQexec(hc.admin, sql);
    assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
    PGconn *lock = fixture_pg_connect();
    assert_non_null(lock);
    snprintf(sql, sizeof sql, "SELECT pg_advisory_lock(%d)", HALF_LOCK);
    r = PQexec(lock, sql);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);
    half_send(&hc);
    pid_t pid = fixture_pg_backend_of(hc.admin, hc.app,
                           "query = 'COMMIT' AND wait_event = 'advisory'",
                           10000);
    assert_int_not_equal(pid, 0);
    char why[160];
    if (!fixture_pg_stop(pid, why, sizeof why))
        half_skip(&hc, true, lock, why);
    long long t0 = fixture_now_ms();
    /* the lane gives up on the silent COMMIT, then asks */
    bool done_frozen = wait_done(&hc.w, HALF_SILENCE_MS + 1000);
    long long took = fixture_now_ms() - t0;
    int status_frozen = hc.w.status[0];
    fixture_pg_continue_all();
    PQfinish(lock); /* the lock is free: a living COMMIT goes on */
    assert_true(wait_done(&hc.w, 30000));
    printf("half-open in COMMIT: %s while frozen (%lld ms, status %d), "
           "then status %d, version %llu\n",
           done_frozen ? "completed" : "not completed", took, status_frozen,
           hc.w.status[0], (unsigned long long)hc.w.version[0]);
    half_close(&hc, pid);
    /* nothing could be known while the backend could still commit */
    assert_false(done_frozen);
}

/* (c) The lane's backend alive but stuck inside the batch's writes,
 * holding the rows written so far, before any COMMIT: a trigger on the
 * command ids waits on the test's advisory lock (past the statement
 * timeout).  Not stopped: a server process that still runs but no
 * longer answers (its client gone, or stuck).  The lane gives up on it
 * after the silence limit and writes again on a new connection; those
 * writes would wait on the stuck rows (until the statement timeout
 * failed the batch), so the lane asks the old backend to end first, and
 * the command is acknowledged while the test still holds the lock. */
static void test_pg_lanes_half_open_stuck_in_writes(void **state)
{
    (void)state;
    static half_case hc;
    char sql[1024];
    half_open_case(&hc, "half_c_", NULL);
    /* only the first write waits (a sequence is not rolled back) */
    snprintf(sql, sizeof sql,
             "CREATE SEQUENCE \"%s\".stuck; CREATE FUNCTION \"%s\".hold() "
             "RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF "
             "nextval('\"%s\".stuck') = 1 THEN LOOP BEGIN PERFORM "
             "pg_advisory_xact_lock(%d); EXIT; EXCEPTION WHEN query_canceled "
             "THEN NULL; END; END LOOP; END IF; RETURN NULL; END $$; CREATE "
             "TRIGGER hold AFTER INSERT ON \"%s\".commands FOR EACH ROW "
             "EXECUTE FUNCTION \"%s\".hold()",
             hc.schema, hc.schema, hc.schema, HALF_LOCK + 1, hc.schema,
             hc.schema);
    PGresult *r = PQexec(hc.admin, sql);
    assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
    PGconn *lock = fixture_pg_connect();
    assert_non_null(lock);
    snprintf(sql, sizeof sql, "SELECT pg_advisory_lock(%d)", HALF_LOCK + 1);
    r = PQexec(lock, sql);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);
    long long t0 = fixture_now_ms();
    half_send(&hc);
    pid_t pid = fixture_pg_backend_of(hc.admin, hc.app,
                           "state = 'active' AND wait_event = 'advisory'",
                           10000);
    bool done_stuck = wait_done(&hc.w, HALF_SILENCE_MS + 5000);
    long long took = fixture_now_ms() - t0;
    PQfinish(lock);
    assert_true(wait_done(&hc.w, 30000));
    printf("half-open, stuck in the writes: %s while stuck (%lld ms, "
           "status %d, version %llu)\n",
           done_stuck ? "completed" : "not completed", took,
           hc.w.status[0], (unsigned long long)hc.w.version[0]);
    assert_int_not_equal(pid, 0);
    half_close(&hc, pid);
    assert_true(done_stuck);
    assert_int_equal(hc.w.status[0], 0);
}

int main(void)
{
    atexit(fixture_pg_continue_all); /* no backend left stopped */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_lanes_conflict_among_many),
        cmocka_unit_test(test_pg_lanes_killed_connections),
        cmocka_unit_test(test_pg_lanes_command_ids_survive_restart),
        cmocka_unit_test(test_pg_lanes_encrypted),
        cmocka_unit_test(test_pg_lanes_snapshot_writer),
        cmocka_unit_test(test_pg_lanes_own_connections),
        cmocka_unit_test(test_pg_lanes_prepared_after_reconnect),
        cmocka_unit_test_teardown(test_pg_lanes_half_open_before_writes,
                                  thaw_teardown),
        cmocka_unit_test_teardown(test_pg_lanes_half_open_in_commit,
                                  thaw_teardown),
        cmocka_unit_test(test_pg_lanes_half_open_stuck_in_writes),
    };
    static const fixture_pg_group group = {
        .store = &g_store, .prefix = "lanes_", .schema = g_schema,
        .cap = sizeof g_schema};
    return FIXTURE_PG_RUN("test_pg_lanes", tests, &group);
}
