/* Queries at the mailbox (es_host_query, es_host_query_call) on the
 * in-memory store: read-your-writes, only committed state, loads of
 * passivated aggregates, races with passivation, unknown keys, wrong
 * types, bounds, closing.  Worker threads never assert: they record, the
 * test joins, then asserts. */
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
#include "eventastic/host.h"
#include "fixtures/deposit.h"
#include "fixtures/faults.h"
#include "fixtures/tally.h"

/* ---- a counter aggregate ---- */

typedef tally_state counter;

typedef struct counter_event {
    es_uuid id;
    int64_t amount;
} counter_event;

static es_uuid ev_id(const void *e) { return ((const counter_event *)e)->id; }
static int32_t ev_kind(const void *e)
{
    (void)e;
    return 1;
}

static int c_apply_new(void *state, const void *event, es_error *err)
{
    (void)err;
    ((counter *)state)->value = ((const counter_event *)event)->amount;
    ((counter *)state)->n = 1;
    return 0;
}

static int c_apply(void *state, const void *event, es_error *err)
{
    (void)err;
    ((counter *)state)->value += ((const counter_event *)event)->amount;
    ((counter *)state)->n++;
    return 0;
}

#define put64 fixture_put64
#define get64 fixture_get64

static int c_event_encode(const void *e, es_buf *out, es_error *err)
{
    (void)err;
    const counter_event *ev = e;
    return tally_event_put(out, &ev->id, ev->amount);
}

static int c_event_decode(int32_t kind, const uint8_t *p, size_t len, void *e,
                          es_error *err)
{
    (void)err;
    if (kind != 1) return ES_EDECODE;
    counter_event *ev = e;
    return tally_event_get(p, len, &ev->id, &ev->amount);
}

#define COUNTER_FIELDS                                                      \
    .snapshot_version = 1, .state_size = sizeof(counter),                   \
    .event_size = sizeof(counter_event), .event_id = ev_id,                 \
    .event_kind = ev_kind, .apply_new = c_apply_new, .apply = c_apply,      \
    .state_encode = tally_state_encode, .state_decode = tally_state_decode,         \
    .event_encode = c_event_encode, .event_decode = c_event_decode

static const es_aggregate_type counter_type = {.name = "counter",
                                               COUNTER_FIELDS};
/* The same shape under another name: a key of one is the wrong type for
 * the other. */
static const es_aggregate_type other_type = {.name = "other", COUNTER_FIELDS};

/* ---- commands ---- */

enum {
    CMD_ADD = 1,    /* one event of the payload's amount */
    CMD_REJECT,     /* es_emit_reject */
    CMD_WAIT,       /* blocks on the gate, then adds */
    CMD_QUERY_SELF, /* es_host_query_call to its own key */
};

typedef struct world {
    es_host *host;
    pthread_mutex_t gate_lock;
    pthread_cond_t gate_cond;
    bool gate_open;
    int waiting;           /* decides blocked on the gate */
    atomic_int self_query; /* status of CMD_QUERY_SELF's query */
} world;

static int q_copy(void *ud, const void *state, uint64_t version);

static int decide(void *user, const void *state, const es_command *cmd,
                  es_emitter *em)
{
    world *w = user;
    (void)state;
    counter_event e = {{{0}}, cmd->len >= 8 ? (int64_t)get64(cmd->payload)
                                            : 1};
    es_uuid_v7(&e.id);
    switch (cmd->kind) {
    case CMD_ADD:
        return es_emit(em, &e);
    case CMD_REJECT:
        return es_emit_reject(em, "no");
    case CMD_WAIT:
        pthread_mutex_lock(&w->gate_lock);
        w->waiting++;
        pthread_cond_broadcast(&w->gate_cond);
        while (!w->gate_open)
            pthread_cond_wait(&w->gate_cond, &w->gate_lock);
        pthread_mutex_unlock(&w->gate_lock);
        return es_emit(em, &e);
    case CMD_QUERY_SELF: {
        counter c;
        atomic_store(&w->self_query,
                     es_host_query_call(w->host, &counter_type,
                                        es_emit_aggregate_id(em), q_copy, &c,
                                        NULL));
        return es_emit(em, &e);
    }
    }
    return es_emit_reject(em, "unknown command");
}

static void world_init(world *w)
{
    memset(w, 0, sizeof *w);
    pthread_mutex_init(&w->gate_lock, NULL);
    pthread_cond_init(&w->gate_cond, NULL);
}

static void world_destroy(world *w)
{
    pthread_mutex_destroy(&w->gate_lock);
    pthread_cond_destroy(&w->gate_cond);
}

static void gate_wait_blocked(world *w, int n)
{
    pthread_mutex_lock(&w->gate_lock);
    while (w->waiting < n) pthread_cond_wait(&w->gate_cond, &w->gate_lock);
    pthread_mutex_unlock(&w->gate_lock);
}

static void gate_open(world *w)
{
    pthread_mutex_lock(&w->gate_lock);
    w->gate_open = true;
    pthread_cond_broadcast(&w->gate_cond);
    pthread_mutex_unlock(&w->gate_lock);
}

static es_host *open_host(world *w, es_store *store, unsigned workers,
                          void (*tune)(es_host_config *))
{
    es_host_config *cfg = NULL;
    assert_int_equal(es_host_config_new(&cfg, NULL), 0);
    assert_int_equal(es_host_config_set_workers(cfg, workers), 0);
    assert_int_equal(
        es_host_config_add_type(cfg, &counter_type, decide, w, NULL), 0);
    assert_int_equal(
        es_host_config_add_type(cfg, &other_type, decide, w, NULL), 0);
    if (tune) tune(cfg);
    es_host *host = NULL;
    assert_int_equal(es_host_open(cfg, store, &host, NULL), 0);
    es_host_config_free(cfg);
    w->host = host;
    return host;
}

static es_command command(int32_t kind, uint8_t payload[8], int64_t amount)
{
    put64(payload, (uint64_t)amount);
    es_command c = {{{0}}, kind, payload, 8};
    es_uuid_v7(&c.id);
    return c;
}

static int add(es_host *host, const es_aggregate_type *type,
               const es_uuid *key, int64_t amount, uint64_t *version)
{
    uint8_t p[8];
    es_command c = command(CMD_ADD, p, amount);
    es_host_reply *reply = NULL;
    int rc = es_host_call(host, type, key, &c, &reply, NULL);
    if (version) *version = reply ? reply->version : ES_HOST_NO_VERSION;
    es_host_reply_free(reply);
    return rc;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static es_host_metrics metrics(es_host *host)
{
    es_host_metrics m;
    assert_int_equal(es_host_metrics_get(host, &m), 0);
    return m;
}

/* Wait (up to 2 s) for the resident count to reach n: an actor is
 * dropped or passivated a little after the completion that ended its
 * turn. */
static uint64_t wait_resident(es_host *host, uint64_t n)
{
    es_host_metrics m;
    for (int i = 0; i < 2000; i++) {
        es_host_metrics_get(host, &m);
        if (m.resident == n) break;
        sleep_ms(1);
    }
    return m.resident;
}

/* ---- query functions ---- */

/* What a query saw: a copy of the state and its version. */
typedef struct seen {
    counter c;
    uint64_t version;
    int calls;
} seen;

static int q_copy(void *ud, const void *state, uint64_t version)
{
    seen *s = ud;
    s->c = *(const counter *)state;
    s->version = version;
    s->calls++;
    return 0;
}

static int q_fail(void *ud, const void *state, uint64_t version)
{
    (void)ud;
    (void)state;
    (void)version;
    return ES_ENOMEM;
}

/* The asynchronous completion: recorded under a lock, read after. */
typedef struct qdone {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int n;
    int status;
    uint64_t version;
    char reason[128];
    es_uuid id;
} qdone;

static void qdone_init(qdone *d)
{
    memset(d, 0, sizeof *d);
    pthread_mutex_init(&d->lock, NULL);
    pthread_cond_init(&d->cond, NULL);
}

static void qdone_destroy(qdone *d)
{
    pthread_mutex_destroy(&d->lock);
    pthread_cond_destroy(&d->cond);
}

static void on_qdone(void *ud, const es_query_result *r)
{
    qdone *d = ud;
    pthread_mutex_lock(&d->lock);
    d->n++;
    d->status = r->status;
    d->version = r->version;
    snprintf(d->reason, sizeof d->reason, "%s", r->reason);
    d->id = r->aggregate_id;
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
}

static void qdone_wait(qdone *d, int n)
{
    pthread_mutex_lock(&d->lock);
    while (d->n < n) pthread_cond_wait(&d->cond, &d->lock);
    pthread_mutex_unlock(&d->lock);
}

/* ---- tests ---- */

/* The query sees the exact version, no store round trip while resident,
 * the query function's status comes back, bad arguments are refused. */
static void test_host_query_exact_version(void **state)
{
    (void)state;
    world w;
    world_init(&w);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_host *host = open_host(&w, store, 2, NULL);
    es_uuid key;
    es_uuid_v7(&key);
    for (int i = 1; i <= 5; i++) {
        uint64_t v = 0;
        assert_int_equal(add(host, &counter_type, &key, i, &v), 0);
        assert_int_equal(v, (uint64_t)i - 1);
    }
    uint64_t loads = metrics(host).loads;
    seen s = {{0, 0}, 0, 0};
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, q_copy, &s, NULL), 0);
    assert_int_equal(s.calls, 1);
    assert_int_equal(s.version, 4);
    assert_int_equal(s.c.n, 5);
    assert_int_equal(s.c.value, 15);
    /* resident: answered without a load */
    assert_int_equal(metrics(host).loads, loads);

    /* asynchronous, with the query function's status */
    qdone d;
    qdone_init(&d);
    assert_int_equal(es_host_query(host, &counter_type, &key, q_fail, NULL,
                                   on_qdone, &d, NULL),
                     0);
    qdone_wait(&d, 1);
    assert_int_equal(d.status, ES_ENOMEM);
    assert_int_equal(d.version, 4);
    assert_true(es_uuid_equal(&d.id, &key));
    assert_true(d.reason[0] != 0);
    es_error err = {0};
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, q_fail, NULL, &err),
        ES_ENOMEM);
    assert_int_equal(err.code, ES_ENOMEM);

    /* a query without a completion still runs */
    assert_int_equal(es_host_query(host, &counter_type, &key, q_copy, &s,
                                   NULL, NULL, NULL),
                     0);

    /* misuse */
    es_uuid nil;
    memset(&nil, 0, sizeof nil);
    assert_int_equal(
        es_host_query_call(host, &counter_type, &nil, q_copy, &s, NULL),
        ES_EINVAL);
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, NULL, &s, NULL),
        ES_EINVAL);
    static const es_aggregate_type unregistered = {.name = "nope",
                                                   COUNTER_FIELDS};
    assert_int_equal(
        es_host_query_call(host, &unregistered, &key, q_copy, &s, NULL),
        ES_EINVAL);
    assert_int_equal(
        es_host_query_call(NULL, &counter_type, &key, q_copy, &s, NULL),
        ES_EINVAL);
    /* a blocking query of the aggregate whose decide runs */
    uint8_t p[8];
    es_command c = command(CMD_QUERY_SELF, p, 1);
    assert_int_equal(es_host_call(host, &counter_type, &key, &c, NULL, NULL),
                     0);
    assert_int_equal(atomic_load(&w.self_query), ES_EMISUSE);

    es_host_metrics m = metrics(host);
    assert_int_equal(m.queries, 4);
    assert_int_equal(m.query.count, 4);
    assert_int_equal(m.accepted, 6); /* queries are not commands */
    assert_int_equal(m.completed, 6);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    qdone_destroy(&d);
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w);
}

/* A query sent behind pipelined commands waits for their commits: it sees
 * all of them (its version is exact) and never an event the store does
 * not have yet.  Broken (a query taken while items are in flight), the
 * query sees a version the store has not committed. */
typedef struct committed_probe {
    es_store *store;
    es_uuid key;
    uint64_t version; /* the query's */
    uint64_t stored;  /* the store's, read inside the query */
    int64_t value;
    int load_status;
} committed_probe;

static int q_against_store(void *ud, const void *state, uint64_t version)
{
    committed_probe *p = ud;
    p->version = version;
    p->value = ((const counter *)state)->value;
    es_context *ctx = NULL;
    p->load_status = es_store_load(p->store, &counter_type, &p->key, &ctx,
                                   NULL);
    p->stored = ctx ? es_context_version(ctx) : ES_HOST_NO_VERSION;
    es_context_free(ctx);
    return 0;
}

static atomic_int acks;

static void count_ack(void *ud, const es_host_result *r)
{
    (void)ud;
    if (r->status == 0) atomic_fetch_add(&acks, 1);
}

static void test_host_query_waits_for_commits(void **state)
{
    (void)state;
    world w;
    world_init(&w);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_host *host = open_host(&w, store, 2, NULL);
    enum { ROUNDS = 10, BURST = 99 }; /* within the mailbox bound */
    committed_probe p[ROUNDS];
    qdone d;
    qdone_init(&d);
    es_uuid key;
    es_uuid_v7(&key);
    atomic_store(&acks, 0);
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < BURST; i++) {
            uint8_t b[8];
            es_command c = command(CMD_ADD, b, 1);
            assert_int_equal(es_host_send(host, &counter_type, &key, &c,
                                          count_ack, NULL, NULL),
                             0);
        }
        memset(&p[r], 0, sizeof p[r]);
        p[r].store = store;
        p[r].key = key;
        assert_int_equal(es_host_query(host, &counter_type, &key,
                                       q_against_store, &p[r], on_qdone, &d,
                                       NULL),
                         0);
    }
    qdone_wait(&d, ROUNDS);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    assert_int_equal(atomic_load(&acks), ROUNDS * BURST);
    for (int r = 0; r < ROUNDS; r++) {
        assert_int_equal(p[r].load_status, 0);
        /* every command sent before it, none after */
        assert_int_equal(p[r].version, (uint64_t)(r + 1) * BURST - 1);
        assert_int_equal(p[r].value, (r + 1) * BURST);
        /* nothing uncommitted */
        assert_true(p[r].stored >= p[r].version);
    }
    qdone_destroy(&d);
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w);
}

/* Commits that fail: the query sees the state rebuilt from the store,
 * never the events of a failed commit. */
static void test_host_query_after_failed_commits(void **state)
{
    (void)state;
    world w;
    world_init(&w);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    fixture_faults_wrap(store, true, true);
    es_host *host = open_host(&w, store, 2, NULL);
    enum { ROUNDS = 10, BURST = 50 };
    committed_probe p[ROUNDS];
    qdone d[ROUNDS];
    for (int r = 0; r < ROUNDS; r++) qdone_init(&d[r]);
    es_uuid key;
    es_uuid_v7(&key);
    for (int r = 0; r < ROUNDS; r++) {
        atomic_store(&fixture_fault_failing_commits, 1);
        for (int i = 0; i < BURST; i++) {
            uint8_t b[8];
            es_command c = command(CMD_ADD, b, 1);
            assert_int_equal(es_host_send(host, &counter_type, &key, &c,
                                          NULL, NULL, NULL),
                             0);
        }
        memset(&p[r], 0, sizeof p[r]);
        p[r].store = store;
        p[r].key = key;
        assert_int_equal(es_host_query(host, &counter_type, &key,
                                       q_against_store, &p[r], on_qdone,
                                       &d[r], NULL),
                         0);
    }
    for (int r = 0; r < ROUNDS; r++) qdone_wait(&d[r], 1);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    uint64_t last = 0;
    int ran = 0;
    for (int r = 0; r < ROUNDS; r++) {
        if (d[r].status == ES_ENOTFOUND && ran == 0) {
            /* every command so far failed: nothing committed yet */
            assert_int_equal(p[r].version, 0);
            assert_int_equal(p[r].value, 0);
            continue;
        }
        ran++;
        assert_int_equal(d[r].status, 0);
        assert_int_equal(d[r].version, p[r].version);
        assert_int_equal(p[r].load_status, 0);
        /* exactly the committed state: nothing in flight behind it */
        assert_int_equal(p[r].stored, p[r].version);
        assert_int_equal(p[r].value, (int64_t)p[r].version + 1);
        assert_true(p[r].version >= last);
        last = p[r].version;
    }
    assert_true(ran > 0);
    fixture_faults_unwrap(store);
    for (int r = 0; r < ROUNDS; r++) qdone_destroy(&d[r]);
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w);
}

/* Read-your-writes: several senders, several keys, many rounds; after a
 * command's acknowledgement with version v a query sees at least v.  A
 * query's version is also never above what the store committed. */
#define RYW_KEYS 4
#define RYW_THREADS 4
#define RYW_ROUNDS 300

typedef struct ryw_ctx {
    es_host *host;
    es_store *store;
    const es_uuid *keys;
    int id;
    int stale, errors, torn;
} ryw_ctx;

static void *ryw_thread(void *arg)
{
    ryw_ctx *c = arg;
    for (int r = 0; r < RYW_ROUNDS; r++) {
        const es_uuid *key = &c->keys[(r + c->id) % RYW_KEYS];
        uint64_t v = 0;
        int rc = add(c->host, &counter_type, key, 1, &v);
        if (rc != 0) {
            c->errors++;
            continue;
        }
        committed_probe p;
        memset(&p, 0, sizeof p);
        p.store = c->store;
        p.key = *key;
        rc = es_host_query_call(c->host, &counter_type, key,
                                q_against_store, &p, NULL);
        if (rc != 0) {
            c->errors++;
            continue;
        }
        if (p.version < v) c->stale++;
        if (p.stored < p.version || p.stored == ES_HOST_NO_VERSION ||
            p.value != (int64_t)p.version + 1)
            c->torn++;
    }
    return NULL;
}

static void test_host_query_read_your_writes(void **state)
{
    (void)state;
    world w;
    world_init(&w);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_host *host = open_host(&w, store, 2, NULL);
    es_uuid keys[RYW_KEYS];
    for (int k = 0; k < RYW_KEYS; k++) es_uuid_v7(&keys[k]);
    pthread_t th[RYW_THREADS];
    ryw_ctx c[RYW_THREADS];
    for (int i = 0; i < RYW_THREADS; i++) {
        memset(&c[i], 0, sizeof c[i]);
        c[i].host = host;
        c[i].store = store;
        c[i].keys = keys;
        c[i].id = i;
        assert_int_equal(pthread_create(&th[i], NULL, ryw_thread, &c[i]), 0);
    }
    for (int i = 0; i < RYW_THREADS; i++) pthread_join(th[i], NULL);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    for (int i = 0; i < RYW_THREADS; i++) {
        assert_int_equal(c[i].errors, 0);
        assert_int_equal(c[i].stale, 0);
        assert_int_equal(c[i].torn, 0);
    }
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w);
}

/* A passivated aggregate is loaded by a query and stays resident. */
static void tune_idle(es_host_config *cfg)
{
    es_host_config_set_idle_ms(cfg, 1);
}

static void test_host_query_loads_passivated(void **state)
{
    (void)state;
    world w;
    world_init(&w);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_host *host = open_host(&w, store, 2, tune_idle);
    es_uuid key;
    es_uuid_v7(&key);
    for (int i = 0; i < 3; i++)
        assert_int_equal(add(host, &counter_type, &key, 10, NULL), 0);
    assert_int_equal(wait_resident(host, 0), 0);
    es_host_metrics m0 = metrics(host);
    assert_true(m0.passivations >= 1);
    seen s = {{0, 0}, 0, 0};
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, q_copy, &s, NULL), 0);
    assert_int_equal(s.version, 2);
    assert_int_equal(s.c.value, 30);
    es_host_metrics m1 = metrics(host);
    assert_int_equal(m1.loads, m0.loads + 1);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w);
}

static void test_host_query_keeps_loaded_resident(void **state)
{
    (void)state;
    world w;
    world_init(&w);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_host *host = open_host(&w, store, 1, NULL);
    es_uuid key;
    es_uuid_v7(&key);
    assert_int_equal(add(host, &counter_type, &key, 7, NULL), 0);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    /* a new host on the same store: the key is not resident */
    host = open_host(&w, store, 1, NULL);
    assert_int_equal(metrics(host).resident, 0);
    seen s = {{0, 0}, 0, 0};
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, q_copy, &s, NULL), 0);
    assert_int_equal(s.c.value, 7);
    assert_int_equal(wait_resident(host, 1), 1);
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, q_copy, &s, NULL), 0);
    es_host_metrics m = metrics(host);
    assert_int_equal(m.loads, 1); /* the second query: no load */
    assert_int_equal(m.resident, 1);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w);
}

/* Many threads query (and some send) while the idle sweep passivates. */
#define RACE_KEYS 32
#define RACE_THREADS 4
#define RACE_QUERIES 1500

typedef struct race_ctx {
    es_host *host;
    const es_uuid *keys;
    int id;
    int ok, wrong, errors;
} race_ctx;

static void *race_thread(void *arg)
{
    race_ctx *c = arg;
    uint64_t x = (uint64_t)c->id * 7919u + 1;
    for (int i = 0; i < RACE_QUERIES; i++) {
        x = x * 6364136223846793005u + 1442695040888963407u;
        int k = (int)((x >> 33) % RACE_KEYS);
        seen s = {{0, 0}, 0, 0};
        int rc = es_host_query_call(c->host, &counter_type, &c->keys[k],
                                    q_copy, &s, NULL);
        if (rc == ES_EBUSY) continue;
        if (rc != 0) {
            c->errors++;
            continue;
        }
        /* key k holds k + 1 events of amount 1 */
        if (s.c.value != k + 1 || s.version != (uint64_t)k) c->wrong++;
        else c->ok++;
        if (i % 100 == 0) sleep_ms(1); /* let the sweep find them idle */
    }
    return NULL;
}

static void tune_evict(es_host_config *cfg)
{
    es_host_config_set_idle_ms(cfg, 1);
    es_host_config_set_resident_bound(cfg, 1); /* one per shard */
}

static void test_host_query_races_passivation(void **state)
{
    (void)state;
    world w;
    world_init(&w);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_host *host = open_host(&w, store, 2, tune_evict);
    es_uuid keys[RACE_KEYS];
    for (int k = 0; k < RACE_KEYS; k++) {
        es_uuid_v7(&keys[k]);
        for (int i = 0; i <= k; i++) {
            /* the resident bound: ES_EBUSY until the shard's actor is
             * idle (its turn over) and can be evicted */
            int rc;
            while ((rc = add(host, &counter_type, &keys[k], 1, NULL)) ==
                   ES_EBUSY)
                sleep_ms(1);
            assert_int_equal(rc, 0);
        }
    }
    pthread_t th[RACE_THREADS];
    race_ctx c[RACE_THREADS];
    for (int i = 0; i < RACE_THREADS; i++) {
        memset(&c[i], 0, sizeof c[i]);
        c[i].host = host;
        c[i].keys = keys;
        c[i].id = i;
        assert_int_equal(pthread_create(&th[i], NULL, race_thread, &c[i]),
                         0);
    }
    for (int i = 0; i < RACE_THREADS; i++) pthread_join(th[i], NULL);
    es_host_metrics m = metrics(host);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    int ok = 0;
    for (int i = 0; i < RACE_THREADS; i++) {
        assert_int_equal(c[i].errors, 0);
        assert_int_equal(c[i].wrong, 0);
        ok += c[i].ok;
    }
    assert_true(ok > RACE_THREADS * RACE_QUERIES / 2);
    assert_true(m.passivations > RACE_KEYS);
    assert_true(m.loads > RACE_KEYS);
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w);
}

/* A key without events: ES_ENOTFOUND, and no actor is left behind, also
 * for an actor a rejected command had made resident. */
static void test_host_query_unknown_key(void **state)
{
    (void)state;
    world w;
    world_init(&w);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_host *host = open_host(&w, store, 2, NULL);
    es_uuid key;
    es_uuid_v7(&key);
    seen s = {{0, 0}, 0, 0};
    es_error err = {0};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(es_host_query_call(host, &counter_type, &key,
                                            q_copy, &s, &err),
                         ES_ENOTFOUND);
        assert_int_equal(err.code, ES_ENOTFOUND);
        assert_int_equal(wait_resident(host, 0), 0);
    }
    assert_int_equal(s.calls, 0);
    assert_int_equal(metrics(host).loads, 3);

    /* a rejected command leaves a loaded actor without events */
    uint8_t p[8];
    es_command c = command(CMD_REJECT, p, 1);
    assert_int_equal(es_host_call(host, &counter_type, &key, &c, NULL, NULL),
                     ES_EREJECTED);
    assert_int_equal(wait_resident(host, 1), 1);
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, q_copy, &s, NULL),
        ES_ENOTFOUND);
    assert_int_equal(wait_resident(host, 0), 0);
    /* the key still works for commands */
    uint64_t v = 0;
    assert_int_equal(add(host, &counter_type, &key, 2, &v), 0);
    assert_int_equal(v, 0);
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, q_copy, &s, NULL), 0);
    assert_int_equal(s.c.value, 2);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w);
}

/* A key stored under another type: ES_EWRONGTYPE, resident or not, and the
 * failed actor is not kept. */
static void test_host_query_wrong_type(void **state)
{
    (void)state;
    world w;
    world_init(&w);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_host *host = open_host(&w, store, 2, NULL);
    es_uuid key;
    es_uuid_v7(&key);
    assert_int_equal(add(host, &counter_type, &key, 1, NULL), 0);
    assert_int_equal(wait_resident(host, 1), 1);
    seen s = {{0, 0}, 0, 0};
    es_error err = {0};
    for (int i = 0; i < 2; i++) {
        assert_int_equal(es_host_query_call(host, &other_type, &key, q_copy,
                                            &s, &err),
                         ES_EWRONGTYPE);
        assert_int_equal(wait_resident(host, 1), 1);
    }
    assert_int_equal(s.calls, 0);
    /* the real type still answers */
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, q_copy, &s, NULL), 0);
    assert_int_equal(s.c.value, 1);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    host = open_host(&w, store, 2, NULL); /* nothing resident */
    assert_int_equal(
        es_host_query_call(host, &other_type, &key, q_copy, &s, NULL),
        ES_EWRONGTYPE);
    assert_int_equal(wait_resident(host, 0), 0);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w);
}

/* The mailbox bound counts queries: ES_EBUSY when full; the accepted ones
 * complete once the actor runs again.  Then the host bound. */
static void tune_tiny(es_host_config *cfg)
{
    es_host_config_set_mailbox_bound(cfg, 3);
    es_host_config_set_host_bound(cfg, 6);
}

static void test_host_query_busy(void **state)
{
    (void)state;
    world w;
    world_init(&w);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_host *host = open_host(&w, store, 2, tune_tiny);
    es_uuid key, key2;
    es_uuid_v7(&key);
    es_uuid_v7(&key2);
    /* both workers held in decide: nothing completes meanwhile */
    uint8_t p[8];
    es_command c = command(CMD_WAIT, p, 1);
    assert_int_equal(
        es_host_send(host, &counter_type, &key, &c, NULL, NULL, NULL), 0);
    es_command c1 = command(CMD_WAIT, p, 1);
    assert_int_equal(
        es_host_send(host, &counter_type, &key2, &c1, NULL, NULL, NULL), 0);
    gate_wait_blocked(&w, 2); /* taken: the mailboxes are empty */
    qdone d;
    qdone_init(&d);
    seen s[8];
    memset(s, 0, sizeof s);
    for (int i = 0; i < 3; i++)
        assert_int_equal(es_host_query(host, &counter_type, &key, q_copy,
                                       &s[i], on_qdone, &d, NULL),
                         0);
    es_error err = {0};
    assert_int_equal(es_host_query(host, &counter_type, &key, q_copy, &s[3],
                                   on_qdone, &d, &err),
                     ES_EBUSY);
    assert_int_equal(err.code, ES_EBUSY);
    /* a command meets the same full mailbox */
    es_command c2 = command(CMD_ADD, p, 1);
    assert_int_equal(
        es_host_send(host, &counter_type, &key, &c2, NULL, NULL, NULL),
        ES_EBUSY);
    /* the host bound (6): 2 commands + 3 queries in, one more fits */
    assert_int_equal(es_host_query(host, &counter_type, &key2, q_copy, &s[4],
                                   on_qdone, &d, NULL),
                     0);
    assert_int_equal(es_host_query(host, &counter_type, &key2, q_copy, &s[5],
                                   on_qdone, &d, NULL),
                     ES_EBUSY);
    assert_int_equal(metrics(host).busy, 3);
    assert_int_equal(metrics(host).queries, 4);
    gate_open(&w);
    qdone_wait(&d, 4);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(s[i].calls, 1);
        assert_int_equal(s[i].version, 0); /* after the waiting command */
        assert_int_equal(s[i].c.value, 1);
    }
    assert_int_equal(s[3].calls, 0);
    assert_int_equal(s[4].calls, 1);
    assert_int_equal(s[5].calls, 0);
    assert_int_equal(d.n, 4);
    qdone_destroy(&d);
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w);
}

/* Closing: queries after es_host_stop or once es_host_shutdown began are
 * refused with ES_ECLOSED; those accepted before shutdown run; those
 * accepted before es_host_close completes with ES_ECLOSED. */
typedef struct ender {
    es_host *host;
    bool now;
    int rc;
} ender;

static void *end_thread(void *arg)
{
    ender *e = arg;
    e->rc = e->now ? es_host_close(e->host) : es_host_shutdown(e->host, NULL);
    return NULL;
}

static void closing_case(bool now)
{
    world w;
    world_init(&w);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_host *host = open_host(&w, store, 2, NULL);
    es_uuid key;
    es_uuid_v7(&key);
    assert_int_equal(add(host, &counter_type, &key, 1, NULL), 0);
    uint8_t p[8];
    es_command c = command(CMD_WAIT, p, 1);
    assert_int_equal(
        es_host_send(host, &counter_type, &key, &c, NULL, NULL, NULL), 0);
    gate_wait_blocked(&w, 1);
    qdone d;
    qdone_init(&d);
    seen s = {{0, 0}, 0, 0};
    assert_int_equal(es_host_query(host, &counter_type, &key, q_copy, &s,
                                   on_qdone, &d, NULL),
                     0);
    ender e = {host, now, -1};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, end_thread, &e), 0);
    /* the end has begun once a query is refused (of a key that answers
     * at once: key waits for the gate, and so does the end) */
    es_uuid other;
    es_uuid_v7(&other);
    int rc = 0, n2 = 0;
    seen s2 = {{0, 0}, 0, 0};
    qdone d2;
    qdone_init(&d2);
    for (int i = 0; i < 5000; i++) {
        rc = es_host_query(host, &counter_type, &other, q_copy, &s2, on_qdone,
                           &d2, NULL);
        if (rc != 0) break;
        qdone_wait(&d2, ++n2);
        sleep_ms(1);
    }
    assert_int_equal(rc, ES_ECLOSED);
    assert_int_equal(
        es_host_query(host, &counter_type, &key, q_copy, &s2, on_qdone, &d2,
                      NULL),
        ES_ECLOSED);
    assert_int_equal(
        es_host_query_call(host, &counter_type, &other, q_copy, &s2, NULL),
        ES_ECLOSED);
    gate_open(&w);
    pthread_join(th, NULL);
    assert_int_equal(e.rc, 0);
    assert_int_equal(d.n, 1);
    if (now) {
        assert_int_equal(d.status, ES_ECLOSED);
        assert_int_equal(s.calls, 0);
    } else {
        assert_int_equal(d.status, 0);
        assert_int_equal(s.calls, 1);
        assert_int_equal(s.version, 1);
    }
    qdone_destroy(&d);
    qdone_destroy(&d2);
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w);
}

static void test_host_query_closed_on_shutdown(void **state)
{
    (void)state;
    closing_case(false);
}

static void fresh_queries(es_host_config *cfg)
{
    assert_int_equal(es_host_config_set_query_fresh(cfg, true), 0);
}

/* Two hosts on one store write the same key.  A query of the first
 * host's resident aggregate answers from memory, behind the second's
 * commits; with fresh queries it folds them in first, and the next
 * command builds on the state it read (a conflict would have reloaded it
 * anyway). */
static void test_host_query_fresh_sees_other_hosts(void **state)
{
    (void)state;
    world w1, w2, w3;
    world_init(&w1);
    world_init(&w2);
    world_init(&w3);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_host *a = open_host(&w1, store, 1, NULL);
    es_host *fresh = open_host(&w3, store, 1, fresh_queries);
    es_host *b = open_host(&w2, store, 1, NULL);
    es_uuid key;
    es_uuid_v7(&key);
    uint64_t v = 0;
    assert_int_equal(add(a, &counter_type, &key, 1, &v), 0);
    seen s = {{0, 0}, 0, 0};
    assert_int_equal(
        es_host_query_call(a, &counter_type, &key, q_copy, &s, NULL), 0);
    assert_int_equal(s.version, 0);
    assert_int_equal(
        es_host_query_call(fresh, &counter_type, &key, q_copy, &s, NULL), 0);
    assert_int_equal(s.version, 0); /* both resident now */
    for (int i = 2; i <= 4; i++)
        assert_int_equal(add(b, &counter_type, &key, i, &v), 0);
    assert_int_equal(v, 3);

    assert_int_equal(
        es_host_query_call(a, &counter_type, &key, q_copy, &s, NULL), 0);
    assert_int_equal(s.version, 0); /* from memory: behind */
    assert_int_equal(s.c.value, 1);
    uint64_t loads = metrics(fresh).loads;
    assert_int_equal(
        es_host_query_call(fresh, &counter_type, &key, q_copy, &s, NULL), 0);
    assert_int_equal(s.version, 3);
    assert_int_equal(s.c.n, 4);
    assert_int_equal(s.c.value, 1 + 2 + 3 + 4);
    assert_int_equal(metrics(fresh).loads, loads); /* caught up, no load */
    /* the caught-up state is the one its commands build on */
    assert_int_equal(add(fresh, &counter_type, &key, 5, &v), 0);
    assert_int_equal(v, 4);
    assert_int_equal(metrics(fresh).conflicts, 0);
    /* nothing new: the same answer */
    assert_int_equal(
        es_host_query_call(fresh, &counter_type, &key, q_copy, &s, NULL), 0);
    assert_int_equal(s.version, 4);
    assert_int_equal(s.c.value, 15);
    assert_int_equal(es_host_shutdown(a, NULL), 0);
    assert_int_equal(es_host_shutdown(b, NULL), 0);
    assert_int_equal(es_host_shutdown(fresh, NULL), 0);
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w1);
    world_destroy(&w2);
    world_destroy(&w3);
}

static void test_host_query_closed_on_close(void **state)
{
    (void)state;
    closing_case(true);
}

static void test_host_query_closed_after_stop(void **state)
{
    (void)state;
    world w;
    world_init(&w);
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_host *host = open_host(&w, store, 1, NULL);
    es_uuid key;
    es_uuid_v7(&key);
    assert_int_equal(add(host, &counter_type, &key, 1, NULL), 0);
    es_host_stop(host);
    seen s = {{0, 0}, 0, 0};
    es_error err = {0};
    assert_int_equal(
        es_host_query_call(host, &counter_type, &key, q_copy, &s, &err),
        ES_ECLOSED);
    assert_int_equal(err.code, ES_ECLOSED);
    assert_int_equal(s.calls, 0);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    assert_int_equal(es_store_close(store), 0);
    world_destroy(&w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_host_query_exact_version),
        cmocka_unit_test(test_host_query_waits_for_commits),
        cmocka_unit_test(test_host_query_after_failed_commits),
        cmocka_unit_test(test_host_query_read_your_writes),
        cmocka_unit_test(test_host_query_loads_passivated),
        cmocka_unit_test(test_host_query_keeps_loaded_resident),
        cmocka_unit_test(test_host_query_races_passivation),
        cmocka_unit_test(test_host_query_unknown_key),
        cmocka_unit_test(test_host_query_wrong_type),
        cmocka_unit_test(test_host_query_busy),
        cmocka_unit_test(test_host_query_closed_after_stop),
        cmocka_unit_test(test_host_query_closed_on_shutdown),
        cmocka_unit_test(test_host_query_closed_on_close),
        cmocka_unit_test(test_host_query_fresh_sees_other_hosts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
