/*
 * PostgreSQL restarted under load from the host (immediate stop: a crash,
 * no checkpoint, every connection cut; then down for a while; then
 * started again).  The commit lanes wait the outage out (they keep their
 * batches and reconnect with backoff; a batch whose COMMIT answer was
 * lost is read back once the server answers), so no command fails, short
 * outage or long: every command completes once the server is back, each
 * with the truth (what was acknowledged is stored, nothing stored was
 * reported failed).  ES_EBUSY refusals (not accepted) are counted apart.
 *
 * It needs a cluster of its own to restart: tests/run.py sets
 * ES_PG_CLUSTER_DIR and ES_PG_CLUSTER_TOOL when it started the cluster;
 * with only DATABASE_URL the test is skipped.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include <cmocka.h>

#include "eventastic.h"
#include "fixtures/counter.h"
#include "fixtures/pg.h"

extern char **environ;

static es_store *g_store;
static char g_schema[64];

#define KEYS 16
#define PRODUCERS 16
#define OK_BEFORE 200 /* acknowledged commands before the restart */
#define OK_AFTER 300  /* ... and sent after it, acknowledged */


static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

typedef struct shared {
    es_host *host;
    es_uuid keys[KEYS];
    atomic_int ok[KEYS], unknown[KEYS];
    atomic_int ok_total, ok_after, failed, busy, odd, no_reason;
    atomic_int by_status[4]; /* ES_EDB, ES_EUNKNOWN, ES_ECONFLICT, other */
    atomic_int phase;        /* 0 up, 1 restarting, 2 back */
    atomic_bool stop;
    atomic_uint_least64_t slowest_ms;
    atomic_int odd_status;
    pthread_mutex_t lock;
    char reason[4][256]; /* the first reason of each kind (lock) */
} shared;

typedef struct producer {
    shared *s;
    unsigned seed;
} producer;

static void *produce(void *arg)
{
    producer *p = arg;
    shared *s = p->s;
    while (!atomic_load(&s->stop)) {
        p->seed = p->seed * 1103515245u + 12345u;
        int k = (int)((p->seed >> 16) % KEYS);
        uint8_t value[4] = {1, 0, 0, 0};
        es_command c = {{{0}}, 1, value, 4};
        es_uuid_v7(&c.id);
        bool after = atomic_load(&s->phase) == 2;
        uint64_t t0 = now_ms();
        es_host_reply *r = NULL;
        int rc = es_host_call(s->host, &counter_type, &s->keys[k], &c, &r,
                              NULL);
        uint64_t took = now_ms() - t0;
        uint64_t slow = atomic_load(&s->slowest_ms);
        while (took > slow &&
               !atomic_compare_exchange_weak(&s->slowest_ms, &slow, took)) {
        }
        if (rc == ES_EBUSY && r == NULL) {
            atomic_fetch_add(&s->busy, 1); /* refused, not accepted */
        } else if (rc == 0) {
            atomic_fetch_add(&s->ok[k], 1);
            atomic_fetch_add(&s->ok_total, 1);
            if (after) atomic_fetch_add(&s->ok_after, 1);
        } else {
            atomic_fetch_add(&s->failed, 1);
            /* a reason that says more than the status name */
            if (r == NULL || r->reason[0] == '\0' ||
                strcmp(r->reason, es_strerror(rc)) == 0)
                atomic_fetch_add(&s->no_reason, 1);
            int slot = rc == ES_EDB         ? 0
                       : rc == ES_EUNKNOWN  ? 1
                       : rc == ES_ECONFLICT ? 2
                                            : 3;
            atomic_fetch_add(&s->by_status[slot], 1);
            if (slot == 3) atomic_store(&s->odd_status, rc);
            pthread_mutex_lock(&s->lock);
            if (r && s->reason[slot][0] == '\0')
                snprintf(s->reason[slot], sizeof s->reason[slot], "%s",
                         r->reason);
            pthread_mutex_unlock(&s->lock);
            if (rc == ES_EUNKNOWN) atomic_fetch_add(&s->unknown[k], 1);
        }
        es_host_reply_free(r);
        if (rc != 0) { /* do not spin while the server is down */
            struct timespec ts = {0, 5000000L};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

/* Waits (up to limit_ms) until *v reaches want. */
static bool wait_for(atomic_int *v, int want, uint64_t limit_ms)
{
    uint64_t end = now_ms() + limit_ms;
    while (atomic_load(v) < want && now_ms() < end) {
        struct timespec ts = {0, 10000000L};
        nanosleep(&ts, NULL);
    }
    return atomic_load(v) >= want;
}

static int restart_server(const char *tool, const char *dir,
                          const char *down)
{
    char *argv[] = {"python3", (char *)tool, "restart", (char *)dir,
                    "--down", (char *)down, NULL};
    pid_t pid;
    int rc = posix_spawnp(&pid, "python3", NULL, NULL, argv, environ);
    if (rc != 0) return rc;
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Load from PRODUCERS threads; the server restarted with `down` seconds
 * without it (long_outage: 9 s, many steps of the lanes' backoff). */
static void restart_under_load(const char *down, bool long_outage)
{
    const char *dir = getenv("ES_PG_CLUSTER_DIR");
    const char *tool = getenv("ES_PG_CLUSTER_TOOL");
    if (dir == NULL || tool == NULL) {
        printf("restart: skipped, the cluster is not this run's own "
               "(ES_PG_CLUSTER_DIR, ES_PG_CLUSTER_TOOL unset)\n");
        skip();
    }
    static shared s;
    memset(&s, 0, sizeof s);
    pthread_mutex_init(&s.lock, NULL);
    for (int k = 0; k < KEYS; k++) es_uuid_v7(&s.keys[k]);
    es_host_config *cfg = NULL;
    assert_int_equal(es_host_config_new(&cfg, NULL), 0);
    assert_int_equal(es_host_config_add_type(cfg, &counter_type,
                                             counter_decide_add, NULL, NULL),
                     0);
    assert_int_equal(es_host_open(cfg, g_store, &s.host, NULL), 0);
    es_host_config_free(cfg);

    pthread_t th[PRODUCERS];
    producer ps[PRODUCERS];
    for (int i = 0; i < PRODUCERS; i++) {
        ps[i] = (producer){&s, 17u * (unsigned)i + 3u};
        assert_int_equal(pthread_create(&th[i], NULL, produce, &ps[i]), 0);
    }
    bool before = wait_for(&s.ok_total, OK_BEFORE, 60000);
    atomic_store(&s.phase, 1);
    uint64_t t0 = now_ms();
    int restarted = restart_server(tool, dir, down);
    uint64_t down_ms = now_ms() - t0;
    atomic_store(&s.phase, 2);
    uint64_t t1 = now_ms();
    bool after = wait_for(&s.ok_after, OK_AFTER, 60000);
    uint64_t recover_ms = now_ms() - t1;
    atomic_store(&s.stop, true);
    for (int i = 0; i < PRODUCERS; i++) pthread_join(th[i], NULL);
    es_host_metrics m;
    es_host_metrics_get(s.host, &m);
    assert_int_equal(es_host_shutdown(s.host, NULL), 0);

    printf("restart: %s; server down %llu ms; %d ok (%d sent after it), %d "
           "failed (EDB %d, EUNKNOWN %d, ECONFLICT %d, other %d), %d busy; "
           "slowest call %llu ms; %llu ms to %d acknowledgements after "
           "it\n",
           long_outage ? "long outage" : "short", (unsigned long long)down_ms,
           atomic_load(&s.ok_total),
           atomic_load(&s.ok_after), atomic_load(&s.failed),
           atomic_load(&s.by_status[0]), atomic_load(&s.by_status[1]),
           atomic_load(&s.by_status[2]), atomic_load(&s.by_status[3]),
           atomic_load(&s.busy),
           (unsigned long long)atomic_load(&s.slowest_ms),
           (unsigned long long)recover_ms, OK_AFTER);
    for (int i = 0; i < 4; i++)
        if (s.reason[i][0]) printf("  e.g. %s\n", s.reason[i]);
    pthread_mutex_destroy(&s.lock);
    assert_int_equal(restarted, 0);
    assert_true(before);
    assert_true(after); /* the host works again after the restart */
    /* every command completed (all calls returned), each failure with a
     * reason and a status that says what happened */
    assert_int_equal(atomic_load(&s.no_reason), 0);
    if (atomic_load(&s.by_status[3]) != 0)
        printf("restart: unexpected status %s\n",
               es_status_name(atomic_load(&s.odd_status)));
    assert_int_equal(atomic_load(&s.by_status[3]), 0);
    assert_int_equal(m.accepted, m.completed);
    /* the lanes wait the outage out: no accepted command fails, not even
     * with ES_EUNKNOWN (a cut COMMIT is read back once the server is
     * back); ES_EBUSY refusals are not failures */
    assert_int_equal(atomic_load(&s.failed), 0);
    /* Acknowledged: stored, and nothing stored that was not acknowledged
     * (no command failed).  Each stored command added 1, and the first
     * also stored the reset, so n stored commands give result n at
     * version n. */
    for (int k = 0; k < KEYS; k++) {
        int ok = atomic_load(&s.ok[k]), unk = atomic_load(&s.unknown[k]);
        counter_context *ctx = NULL;
        es_error lerr = {0};
        int rc = counter_store_load(g_store, &s.keys[k], &ctx, &lerr);
        if (rc != 0 && rc != ES_ENOTFOUND)
            printf("load: %s: %s\n", es_status_name(rc), lerr.message);
        int stored = 0;
        if (rc == 0) {
            stored = counter_state(ctx)->result;
            assert_int_equal(counter_version(ctx), (uint64_t)stored);
            counter_context_free(ctx);
        } else {
            assert_int_equal(rc, ES_ENOTFOUND);
        }
        assert_true(stored >= ok);
        assert_true(stored <= ok + unk);
        assert_int_equal(stored, ok); /* unk is 0: asserted above */
    }
}

/* What the store holds for key: n stored commands give result n at
 * version n (the first also stored the reset); 0 when it has none. */
static int stored_count(const es_uuid *key)
{
    counter_context *ctx = NULL;
    es_error err = {0};
    int rc = counter_store_load(g_store, key, &ctx, &err);
    if (rc == ES_ENOTFOUND) return 0;
    if (rc != 0) printf("load: %s: %s\n", es_status_name(rc), err.message);
    assert_int_equal(rc, 0);
    int n = counter_state(ctx)->result;
    assert_int_equal(counter_version(ctx), (uint64_t)n);
    counter_context_free(ctx);
    return n;
}

#define BOUND_KEYS 8 /* resident before the outage */
#define FRESH_KEYS 4 /* and never loaded before it */
#define ALL_KEYS (BOUND_KEYS + FRESH_KEYS)
#define SHUT_KEYS (ALL_KEYS + FRESH_KEYS) /* and FRESH_KEYS new ones */
#define HOST_BOUND 200

typedef struct bounds {
    atomic_int done, ok[SHUT_KEYS], closed, db, other;
} bounds;

typedef struct bound_ud {
    bounds *b;
    int k;
} bound_ud;

static void bound_done(void *ud, const es_host_result *r)
{
    bound_ud *u = ud;
    if (r->status == 0) atomic_fetch_add(&u->b->ok[u->k], 1);
    else if (r->status == ES_ECLOSED) atomic_fetch_add(&u->b->closed, 1);
    else if (r->status == ES_EDB) atomic_fetch_add(&u->b->db, 1);
    else atomic_fetch_add(&u->b->other, 1);
    if (r->status != 0 && r->status != ES_ECLOSED) /* what went wrong */
        printf("outage: %s: %s\n", es_status_name(r->status), r->reason);
    atomic_fetch_add(&u->b->done, 1);
}

typedef struct restarter {
    const char *tool, *dir, *down;
    int rc;
} restarter;

static void *restart_thread(void *arg)
{
    restarter *r = arg;
    r->rc = restart_server(r->tool, r->dir, r->down);
    return NULL;
}

/* Waits (up to 20 s) until the store cannot begin a transaction. */
static bool wait_down(void)
{
    uint64_t end = now_ms() + 20000;
    while (now_ms() < end) {
        es_txn *txn = NULL;
        if (es_store_begin(g_store, &txn, NULL) != 0) return true;
        es_txn_rollback(txn);
        struct timespec ts = {0, 20000000L};
        nanosleep(&ts, NULL);
    }
    return false;
}

static void send_one(es_host *host, const es_uuid *key, bound_ud *ud,
                     int *rc)
{
    uint8_t value[4] = {1, 0, 0, 0};
    es_command c = {{{0}}, 1, value, 4};
    es_uuid_v7(&c.id);
    *rc = es_host_send(host, &counter_type, key, &c, bound_done, ud, NULL);
}

/* While the server is down, accepted commands wait for their commit (a
 * resident key) or for their load (a key never loaded before: the actor
 * is parked and its load tried again with backoff) and count against the
 * host bound: sends are accepted up to it and then refused with ES_EBUSY;
 * once the server is back all complete, committed.  Then a shutdown while
 * the server is down again: the lanes stop waiting, and what they could
 * not commit completes with ES_ECLOSED, not stored; so do the commands of
 * keys that could not be loaded, and a later command of a resident key,
 * decided on the state that lost those events, is decided again and
 * cannot be loaded either: all ES_ECLOSED, nothing stored. */
static void test_pg_restart_outage_bounds(void **state)
{
    (void)state;
    const char *dir = getenv("ES_PG_CLUSTER_DIR");
    const char *tool = getenv("ES_PG_CLUSTER_TOOL");
    if (dir == NULL || tool == NULL) {
        printf("restart: skipped, the cluster is not this run's own\n");
        skip();
    }
    es_uuid keys[SHUT_KEYS];
    static bounds b;
    memset(&b, 0, sizeof b);
    static bound_ud uds[SHUT_KEYS];
    for (int k = 0; k < SHUT_KEYS; k++) {
        es_uuid_v7(&keys[k]);
        uds[k] = (bound_ud){&b, k};
    }
    es_host_config *cfg = NULL;
    assert_int_equal(es_host_config_new(&cfg, NULL), 0);
    assert_int_equal(es_host_config_add_type(cfg, &counter_type,
                                             counter_decide_add, NULL, NULL),
                     0);
    assert_int_equal(es_host_config_set_host_bound(cfg, HOST_BOUND), 0);
    es_host *host = NULL;
    assert_int_equal(es_host_open(cfg, g_store, &host, NULL), 0);
    es_host_config_free(cfg);
    /* the first BOUND_KEYS resident; the others first loaded during the
     * outage */
    for (int k = 0; k < BOUND_KEYS; k++) {
        int rc = 0;
        send_one(host, &keys[k], &uds[k], &rc);
        assert_int_equal(rc, 0);
    }
    assert_true(wait_for(&b.done, BOUND_KEYS, 30000));

    restarter r = {tool, dir, "4", -1};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, restart_thread, &r), 0);
    bool down = wait_down();
    int accepted = 0, busy_rc = 0;
    for (int i = 0; down && i < 10 * HOST_BOUND; i++) {
        int rc = 0;
        send_one(host, &keys[i % ALL_KEYS], &uds[i % ALL_KEYS], &rc);
        if (rc != 0) {
            busy_rc = rc;
            break;
        }
        accepted++;
    }
    int done_in_outage = atomic_load(&b.done) - BOUND_KEYS;
    pthread_join(th, NULL);
    bool all = wait_for(&b.done, BOUND_KEYS + accepted, 60000);
    printf("outage: %d accepted while down, then %s; %d completed during "
           "the outage; all completed after it: %s (%d closed, %d other)\n",
           accepted, es_status_name(busy_rc), done_in_outage,
           all ? "yes" : "no", atomic_load(&b.closed),
           atomic_load(&b.other));
    assert_int_equal(r.rc, 0);
    assert_true(down);
    assert_int_equal(busy_rc, ES_EBUSY);
    assert_int_equal(accepted, HOST_BOUND);
    assert_true(all);
    assert_int_equal(atomic_load(&b.closed) + atomic_load(&b.db) +
                         atomic_load(&b.other),
                     0);
    for (int k = 0; k < ALL_KEYS; k++)
        assert_int_equal(stored_count(&keys[k]), atomic_load(&b.ok[k]));
    for (int k = BOUND_KEYS; k < ALL_KEYS; k++) /* they were loaded */
        assert_true(atomic_load(&b.ok[k]) > 0);

    /* shutdown during an outage */
    memset(&b, 0, sizeof b);
    int before[SHUT_KEYS];
    for (int k = 0; k < SHUT_KEYS; k++) before[k] = stored_count(&keys[k]);
    r = (restarter){tool, dir, "6", -1};
    assert_int_equal(pthread_create(&th, NULL, restart_thread, &r), 0);
    down = wait_down();
    accepted = 0;
    for (int i = 0; down && i < 40; i++) {
        int rc = 0;
        send_one(host, &keys[i % SHUT_KEYS], &uds[i % SHUT_KEYS], &rc);
        if (rc == 0) accepted++;
    }
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    int done_at_shutdown = atomic_load(&b.done);
    pthread_join(th, NULL);
    int ok = 0;
    for (int k = 0; k < SHUT_KEYS; k++) ok += atomic_load(&b.ok[k]);
    printf("outage: shutdown while down: %d accepted, %d completed by "
           "then (%d closed, %d failed to load, %d committed, %d other)\n",
           accepted, done_at_shutdown, atomic_load(&b.closed),
           atomic_load(&b.db), ok, atomic_load(&b.other));
    assert_int_equal(r.rc, 0);
    assert_true(down);
    assert_int_equal(accepted, 40);
    assert_int_equal(done_at_shutdown, accepted);
    assert_int_equal(atomic_load(&b.other), 0);
    assert_int_equal(atomic_load(&b.db), 0);
    assert_int_equal(ok, 0);
    assert_int_equal(atomic_load(&b.closed), accepted);
    /* the truth: ES_ECLOSED ones not stored */
    for (int k = 0; k < SHUT_KEYS; k++)
        assert_int_equal(stored_count(&keys[k]), before[k]);
}

static void test_pg_restart_under_load(void **state)
{
    (void)state;
    restart_under_load("1.5", false);
}

static void test_pg_restart_long_outage(void **state)
{
    (void)state;
    restart_under_load("9", true);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_restart_under_load),
        cmocka_unit_test(test_pg_restart_long_outage),
        cmocka_unit_test(test_pg_restart_outage_bounds),
    };
    static const fixture_pg_group group = {
        .store = &g_store, .prefix = "restart_", .schema = g_schema,
        .cap = sizeof g_schema};
    return FIXTURE_PG_RUN("test_pg_restart", tests, &group);
}
