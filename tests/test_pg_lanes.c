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
#include "store/store_impl.h"
#include "fixtures/pg.h"

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

typedef struct shared {
    es_host *host;
    es_uuid keys[KEYS];
    atomic_int ok[KEYS], failed;
    atomic_bool done;
    atomic_int kills;
} shared;

typedef struct producer {
    shared *s;
    int id;
} producer;

static void *produce(void *arg)
{
    producer *p = arg;
    for (int i = 0; i < SENDS; i++) {
        int k = (i + p->id) % KEYS;
        uint8_t value[4];
        es_command c = command(value, 1);
        int rc = es_host_call(p->s->host, &counter_type, &p->s->keys[k], &c,
                              NULL, NULL);
        if (rc == 0)
            atomic_fetch_add(&p->s->ok[k], 1);
        else
            atomic_fetch_add(&p->s->failed, 1);
    }
    return NULL;
}

/* Terminates the host's connections (by application name) now and then. */
static void *killer(void *arg)
{
    shared *s = arg;
    PGconn *c = fixture_pg_connect();
    if (c == NULL) return NULL;
    unsigned seed = 7;
    while (!atomic_load(&s->done)) {
        PGresult *r = PQexec(c, "SELECT count(pg_terminate_backend(pid)) "
                                "FROM pg_stat_activity WHERE "
                                "application_name = '" APP_NAME "'");
        if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
            atomic_fetch_add(&s->kills, atoi(PQgetvalue(r, 0, 0)));
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
    const char *url = getenv("DATABASE_URL");
    char ci[1024];
    if (strncmp(url, "postgres", 8) == 0)
        snprintf(ci, sizeof ci, "%s%capplication_name=%s", url,
                 strchr(url, '?') ? '&' : '?', APP_NAME);
    else
        snprintf(ci, sizeof ci, "%s application_name=%s", url, APP_NAME);
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
    assert_int_equal(ok + atomic_load(&s.failed), PRODUCERS * SENDS);
    assert_true(ok > 0);
    printf("killed connections: %d kills, %d ok, %d failed\n",
           atomic_load(&s.kills), ok, atomic_load(&s.failed));
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

/* A pool of one connection: were the snapshot writer to take it, the
 * lane could not commit while the writer waits.  The snapshots table is
 * locked against writes from another session; a command makes the writer
 * wait on the lock; then more commands, each asking for a snapshot, are
 * all acknowledged while it waits, and once the lock is released the
 * writer stores only the latest snapshot of the many queued. */
static void test_pg_lanes_snapshot_writer(void **state)
{
    (void)state;
    es_pg_config *pcfg = NULL;
    es_store *store = NULL;
    assert_int_equal(es_pg_config_new(&pcfg, NULL), 0);
    assert_int_equal(es_pg_config_set_schema(pcfg, g_schema, NULL), 0);
    assert_int_equal(es_pg_config_set_pool_size(pcfg, 1, NULL), 0);
    assert_int_equal(es_pg_store_open(pcfg, &store, NULL), 0);
    es_pg_config_free(pcfg);
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
    es_pg_config *pcfg = NULL;
    es_store *store = NULL;
    assert_int_equal(es_pg_config_new(&pcfg, NULL), 0);
    assert_int_equal(es_pg_config_set_schema(pcfg, g_schema, NULL), 0);
    assert_int_equal(es_pg_config_set_pool_size(pcfg, 1, NULL), 0);
    assert_int_equal(es_pg_store_open(pcfg, &store, NULL), 0);
    es_pg_config_free(pcfg);
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
                              1,    0,     false, false,   NULL};
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
        assert_int_equal(store->ops->write_batch(store, &conn, &it, 1), 1);
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
    store->ops->background_close(store, conn);
}

static int group_setup(void **state)
{
    (void)state;
    fixture_pg_random_name(g_schema, sizeof g_schema, "lanes_");
    return fixture_pg_open(g_schema, &g_store) == 0 ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    es_store_close(g_store);
    fixture_pg_drop_schema(g_schema);
    return 0;
}

int main(void)
{
    if (getenv("DATABASE_URL") == NULL) {
        printf("test_pg_lanes: skipped, DATABASE_URL is not set "
               "(tests/run.py sets it)\n");
        return 0;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_lanes_conflict_among_many),
        cmocka_unit_test(test_pg_lanes_killed_connections),
        cmocka_unit_test(test_pg_lanes_command_ids_survive_restart),
        cmocka_unit_test(test_pg_lanes_encrypted),
        cmocka_unit_test(test_pg_lanes_snapshot_writer),
        cmocka_unit_test(test_pg_lanes_own_connections),
        cmocka_unit_test(test_pg_lanes_prepared_after_reconnect),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
