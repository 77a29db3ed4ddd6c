/*
 * Group commit on PostgreSQL (DATABASE_URL; tests/run.py --bench starts a
 * throwaway cluster), side by side in one run, bank-like deposits over
 * 10,000 accounts:
 *
 *   host_pg         the host: C closed-loop clients (each keeps one
 *                   command in flight and sends the next from the
 *                   completion of the previous); commits go through the
 *                   commit lanes and the PostgreSQL batch writer
 *   per_command_pg  the library the Eventastic way: C client threads, each
 *                   with a connection of its own, one transaction per
 *                   command (begin, load, record, save, commit; a conflict
 *                   is retried)
 *
 * at 1, 8, 64 and 256 clients.  Records name, store, workers, lanes,
 * clients, keys, ops_per_s (committed commands per second), p50_us,
 * p99_us (client-side latency of a command), cpu_host_pct and cpu_pg_pct
 * (CPU of this process and of the PostgreSQL server's processes, in % of
 * one core over the point) to OUT.json.
 *
 * Rehydration, one thread loading one 10,000-event aggregate over and
 * over (es_store_load):
 *
 *   load_replay     no snapshot: all 10,000 events read and applied
 *   load_snapshot   a snapshot at version 9,994 and the 5 events after it
 *
 * with ops_per_s = loads per second, p50_us / p99_us per load, events
 * (in the aggregate), replayed (events applied per load) and
 * events_per_s (replayed events per second).
 *
 * Usage: bench_pg OUT.json [--quick] [--lanes N,...] [--only commands|load]
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "eventastic.h"

#include "fixtures/deposit.h"
#include "common/bench.h"
#include "common/report.h"
#include "common/load.h"
#include "common/measure.h"

typedef struct record {
    const char *name;
    unsigned workers, lanes, clients;
    uint64_t keys;
    double ops_per_s, p50_us, p99_us, cpu_host_pct, cpu_pg_pct;
    uint64_t errors;
    uint64_t events, replayed; /* rehydration records only */
    /* host_pg only: where a command's time went (p50 / p99 us per stage,
     * from the host's metrics over the measured window), commands and
     * round trips per batch, lanes busy when the window ended */
    bool stages;
    es_host_latency queue, decide, lane, write, commit, handback, total;
    double per_batch, trips_per_batch;
    uint64_t lanes_busy;
} record;

static es_store *open_store(size_t pool)
{
    es_pg_config *cfg = NULL;
    es_store *store = NULL;
    es_error err = {0};
    int rc = es_pg_config_new(&cfg, &err);
    if (rc == 0) rc = es_pg_config_set_schema(cfg, "bench_pg", &err);
    if (rc == 0) rc = es_pg_config_set_pool_size(cfg, pool, &err);
    if (rc == 0) rc = es_pg_migrate(cfg, NULL, &err);
    if (rc == 0) rc = es_pg_store_open(cfg, &store, &err);
    es_pg_config_free(cfg);
    if (rc != 0) {
        fprintf(stderr, "bench_pg: %s: %s\n", es_status_name(rc),
                err.message);
        exit(1);
    }
    return store;
}

/* ---- host_pg: closed-loop clients (common/load.c) ---- */


static void count_done(void *ud, const es_host_result *res)
{
    (void)res;
    atomic_fetch_add((atomic_uint_least64_t *)ud, 1);
}

/* A host with every account resident: the host is a long-lived process
 * with hot aggregates, so loads are not what a point measures. */
static es_host *open_warm_host(es_store *store, unsigned lanes,
                               uint64_t keys)
{
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    es_host_config_new(&cfg, NULL);
    es_host_config_set_workers(cfg, 2);
    if (lanes > 0) es_host_config_set_lanes(cfg, lanes);
    es_host_config_add_type(cfg, &deposit_type, bench_deposit_decide, NULL,
                            NULL);
    if (es_host_open(cfg, store, &host, NULL) != 0) abort();
    es_host_config_free(cfg);
    atomic_uint_least64_t done = 0;
    uint8_t amount[8];
    fixture_put64(amount, 1);
    double t0 = bench_now_s();
    for (uint64_t i = 0; i < keys; i++) {
        es_uuid key = bench_key_of(i);
        es_command cmd = {bench_make_id(), 1, amount, 8};
        while (es_host_send(host, &deposit_type, &key, &cmd, count_done,
                            &done, NULL) == ES_EBUSY) {
        }
    }
    struct timespec tick = {0, 1000000};
    while (atomic_load(&done) < keys) nanosleep(&tick, NULL);
    fprintf(stderr, "  host_pg lanes %u: %llu accounts loaded in %.1f s\n",
            lanes, (unsigned long long)keys, bench_now_s() - t0);
    return host;
}

static record host_point(es_host *host, unsigned lanes, unsigned clients,
                         uint64_t keys, double warm, double seconds)
{
    bench_load r;
    bench_load_start(&r, host, keys, 0, clients, true);
    bench_sleep_s(warm); /* the accounts are loaded */
    es_host_metrics m0, m;
    es_host_metrics_get(host, &m0);
    es_host_metrics_reset_latencies(host);
    cpu_sample s0 = bench_cpu_sample();
    double t0 = bench_now_s();
    atomic_store(&r.done, 0);
    bench_lat_reset();
    bench_sleep_s(seconds);
    atomic_store(&r.measuring, false);
    double dt = bench_now_s() - t0;
    cpu_sample s1 = bench_cpu_sample();
    es_host_metrics_get(host, &m);
    uint64_t done = atomic_load(&r.done);
    bench_load_stop(&r);
    record rec;
    memset(&rec, 0, sizeof rec);
    rec.name = "host_pg";
    rec.workers = 2;
    rec.lanes = lanes;
    rec.clients = clients;
    rec.keys = keys;
    rec.ops_per_s = (double)done / dt;
    rec.errors = atomic_load(&r.errors);
    bench_cpu_pct(&s0, &s1, &rec.cpu_host_pct, &rec.cpu_pg_pct);
    bench_lat_percentiles(&rec.p50_us, &rec.p99_us);
    rec.stages = true;
    rec.queue = m.queue_wait;
    rec.decide = m.decide;
    rec.lane = m.lane_wait;
    rec.write = m.batch_write;
    rec.commit = m.batch_commit;
    rec.handback = m.hand_back;
    rec.total = m.total;
    uint64_t batches = m.batches - m0.batches;
    rec.per_batch = batches ? (double)(m.batch_items - m0.batch_items) /
                                  (double)batches
                            : 0.0;
    rec.trips_per_batch = batches ? (double)(m.round_trips - m0.round_trips) /
                                        (double)batches
                                  : 0.0;
    rec.lanes_busy = m.lanes_busy;
    fprintf(stderr, "  host_pg lanes %u clients %u: %.0f/s, p50 %.0f us, "
            "p99 %.0f us, cpu host %.0f%% pg %.0f%%, %llu errors\n"
            "    stages p50/p99 us: queue %.0f/%.0f  decide %.0f/%.0f  "
            "lane %.0f/%.0f  write %.0f/%.0f (commit %.0f/%.0f)  "
            "hand-back %.0f/%.0f  total %.0f/%.0f\n"
            "    %.1f commands and %.1f round trips a batch\n", lanes,
            clients, rec.ops_per_s, rec.p50_us, rec.p99_us, rec.cpu_host_pct,
            rec.cpu_pg_pct, (unsigned long long)rec.errors, rec.queue.p50_us,
            rec.queue.p99_us, rec.decide.p50_us, rec.decide.p99_us,
            rec.lane.p50_us, rec.lane.p99_us, rec.write.p50_us,
            rec.write.p99_us, rec.commit.p50_us, rec.commit.p99_us,
            rec.handback.p50_us, rec.handback.p99_us, rec.total.p50_us,
            rec.total.p99_us, rec.per_batch, rec.trips_per_batch);
    return rec;
}

/* ---- per_command_pg: one transaction per command ---- */

typedef struct pc_run {
    es_store *store;
    pthread_barrier_t opened; /* every client holds a connection */
    uint64_t keys, base;
    atomic_bool stop, measuring;
    atomic_uint_least64_t done, errors, conflicts;
} pc_run;

typedef struct pc_client {
    pc_run *r;
    uint64_t seed;
    pthread_t th;
} pc_client;

static void *pc_main(void *arg)
{
    pc_client *c = arg;
    pc_run *r = c->r;
    /* The pool opens connections on demand: hold one in a transaction
     * until every client holds one, so that all are open before the
     * warm-up, not started (a backend's start is milliseconds of server
     * CPU) inside the measured time. */
    es_txn *first = NULL;
    if (es_store_begin(r->store, &first, NULL) != 0) first = NULL;
    pthread_barrier_wait(&r->opened);
    if (first) es_txn_rollback(first);
    while (!atomic_load_explicit(&r->stop, memory_order_relaxed)) {
        es_uuid key = bench_key_of(r->base + bench_rnd(&c->seed) % r->keys);
        double t0 = bench_now_s();
        int rc;
        for (;;) {
            es_error err = {0};
            es_txn *txn = NULL;
            es_context *ctx = NULL;
            rc = es_store_begin(r->store, &txn, &err);
            if (rc != 0) break;
            deposit d = {bench_make_id(), 1};
            rc = es_context_load(txn, &deposit_type, &key, &ctx, &err);
            if (rc == ES_ENOTFOUND)
                rc = es_context_record_new(&deposit_type, &key, &d, &ctx,
                                           &err);
            else if (rc == 0)
                rc = es_context_record(ctx, &d, &err);
            if (rc == 0) rc = es_context_save(txn, ctx, &err);
            if (rc == 0)
                rc = es_txn_commit(txn, &err);
            else
                es_txn_rollback(txn);
            es_context_free(ctx);
            if (rc != ES_ECONFLICT) break;
            atomic_fetch_add(&r->conflicts, 1);
        }
        if (rc != 0) {
            atomic_fetch_add(&r->errors, 1);
            continue;
        }
        if (atomic_load_explicit(&r->measuring, memory_order_relaxed)) {
            atomic_fetch_add_explicit(&r->done, 1, memory_order_relaxed);
            bench_lat_record(t0);
        }
    }
    return NULL;
}

static record per_command_point(unsigned clients, uint64_t keys,
                                double warm, double seconds)
{
    es_store *store = open_store(clients);
    pc_run r;
    memset(&r, 0, sizeof r);
    r.store = store;
    r.keys = keys;
    r.base = 1000000; /* accounts of their own */
    pc_client *cs = calloc(clients, sizeof *cs);
    bench_lat_reset();
    pthread_barrier_init(&r.opened, NULL, clients + 1);
    for (unsigned i = 0; i < clients; i++) {
        cs[i].r = &r;
        cs[i].seed = 0x9e3779b97f4a7c15u * (i + 7);
        if (pthread_create(&cs[i].th, NULL, pc_main, &cs[i]) != 0) abort();
    }
    pthread_barrier_wait(&r.opened);
    bench_sleep_s(warm);
    cpu_sample s0 = bench_cpu_sample();
    double t0 = bench_now_s();
    atomic_store(&r.measuring, true);
    bench_sleep_s(seconds);
    atomic_store(&r.measuring, false);
    double dt = bench_now_s() - t0;
    cpu_sample s1 = bench_cpu_sample();
    atomic_store(&r.stop, true);
    for (unsigned i = 0; i < clients; i++) pthread_join(cs[i].th, NULL);
    pthread_barrier_destroy(&r.opened);
    free(cs);
    es_store_close(store);
    record rec = {.name = "per_command_pg", .clients = clients, .keys = keys,
                  .ops_per_s = (double)atomic_load(&r.done) / dt,
                  .errors = atomic_load(&r.errors)};
    bench_cpu_pct(&s0, &s1, &rec.cpu_host_pct, &rec.cpu_pg_pct);
    bench_lat_percentiles(&rec.p50_us, &rec.p99_us);
    fprintf(stderr, "  per_command_pg clients %u: %.0f/s, p50 %.0f us, "
            "p99 %.0f us, cpu host %.0f%% pg %.0f%%, %llu conflicts, %llu "
            "errors\n", clients, rec.ops_per_s, rec.p50_us, rec.p99_us,
            rec.cpu_host_pct, rec.cpu_pg_pct,
            (unsigned long long)atomic_load(&r.conflicts),
            (unsigned long long)rec.errors);
    return rec;
}

/* ---- rehydration ---- */

#define LOAD_EVENTS 10000
#define AFTER_SNAPSHOT 5

static void die(const char *what, int rc, const es_error *err)
{
    fprintf(stderr, "bench_pg: %s: %s: %s\n", what, es_status_name(rc),
            err->message);
    exit(1);
}

/* Append n deposits to the aggregate (a new one when *ctx is NULL) and
 * save them in one transaction.  Saving also stores a snapshot. */
static void append(es_store *store, const es_uuid *key, es_context **ctx,
                   size_t n)
{
    es_error err = {0};
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        deposit d = {bench_make_id(), 1};
        rc = *ctx == NULL
                 ? es_context_record_new(&deposit_type, key, &d, ctx, &err)
                 : es_context_record(*ctx, &d, &err);
    }
    es_txn *txn = NULL;
    if (rc == 0) rc = es_store_begin(store, &txn, &err);
    if (rc == 0) rc = es_context_save(txn, *ctx, &err);
    if (rc == 0) rc = es_txn_commit(txn, &err);
    else if (txn) es_txn_rollback(txn);
    if (rc != 0) die("rehydration: append", rc, &err);
}

/* Replace the aggregate's snapshots by snap (NULL: none). */
static void set_snapshot(es_store *store, const es_uuid *key,
                         const es_snapshot *snap)
{
    es_error err = {0};
    es_txn *txn = NULL;
    int rc = es_store_begin(store, &txn, &err);
    if (rc == 0) rc = es_txn_delete_snapshots(txn, key, &err);
    if (rc == 0 && snap) rc = es_txn_store_snapshot(txn, snap, &err);
    if (rc == 0) rc = es_txn_commit(txn, &err);
    else if (txn) es_txn_rollback(txn);
    if (rc != 0) die("rehydration: snapshot", rc, &err);
}

static record load_point(es_store *store, const char *name,
                         const es_uuid *key, uint64_t replayed,
                         double warm, double seconds)
{
    bench_lat_reset();
    uint64_t loads = 0;
    bool measuring = false;
    double start = bench_now_s(), t0 = 0;
    cpu_sample s0 = {0, 0, 0, 0};
    for (;;) {
        double t = bench_now_s();
        if (!measuring && t - start >= warm) {
            measuring = true;
            s0 = bench_cpu_sample();
            t = t0 = bench_now_s();
            bench_lat_reset();
        }
        if (measuring && t - t0 >= seconds) break;
        es_context *ctx = NULL;
        es_error err = {0};
        int rc = es_store_load(store, &deposit_type, key, &ctx, &err);
        if (rc != 0) die("rehydration: load", rc, &err);
        if (es_context_version(ctx) != LOAD_EVENTS - 1 ||
            ((const deposit_account *)es_context_state(ctx))->balance !=
                LOAD_EVENTS) {
            fprintf(stderr, "bench_pg: %s loaded a wrong state\n", name);
            exit(1);
        }
        es_context_free(ctx);
        if (measuring) {
            loads++;
            bench_lat_record(t);
        }
    }
    double dt = bench_now_s() - t0;
    cpu_sample s1 = bench_cpu_sample();
    record rec = {.name = name, .clients = 1, .keys = 1,
                  .ops_per_s = (double)loads / dt, .events = LOAD_EVENTS,
                  .replayed = replayed};
    bench_cpu_pct(&s0, &s1, &rec.cpu_host_pct, &rec.cpu_pg_pct);
    bench_lat_percentiles(&rec.p50_us, &rec.p99_us);
    fprintf(stderr, "  %s: %.0f loads/s (%.0f events/s), p50 %.0f us, p99 "
            "%.0f us, cpu host %.0f%% pg %.0f%%\n", name, rec.ops_per_s,
            rec.ops_per_s * (double)replayed, rec.p50_us, rec.p99_us,
            rec.cpu_host_pct, rec.cpu_pg_pct);
    return rec;
}

/* Two aggregates of LOAD_EVENTS deposits: one without a snapshot, one
 * with a snapshot AFTER_SNAPSHOT events before its end. */
static void rehydration(es_store *store, double warm, double seconds,
                        record *out)
{
    es_uuid replay_key = bench_make_id(), snap_key = bench_make_id();
    es_context *ctx = NULL;
    append(store, &replay_key, &ctx, LOAD_EVENTS);
    es_context_free(ctx);
    set_snapshot(store, &replay_key, NULL);

    ctx = NULL;
    append(store, &snap_key, &ctx, LOAD_EVENTS - AFTER_SNAPSHOT);
    es_error err = {0};
    es_txn *txn = NULL;
    es_snapshot *early = NULL;
    int rc = es_store_begin(store, &txn, &err);
    if (rc == 0)
        rc = es_txn_get_snapshot(txn, &snap_key, deposit_type.snapshot_version,
                                 &early, &err);
    if (txn) es_txn_rollback(txn);
    if (rc != 0) die("rehydration: read snapshot", rc, &err);
    append(store, &snap_key, &ctx, AFTER_SNAPSHOT);
    es_context_free(ctx);
    set_snapshot(store, &snap_key, early); /* the one 5 events back */
    es_free(early);

    out[0] = load_point(store, "load_replay", &replay_key, LOAD_EVENTS, warm,
                        seconds);
    out[1] = load_point(store, "load_snapshot", &snap_key, AFTER_SNAPSHOT,
                        warm, seconds);
}

static void write_json(const char *path, const record *r, size_t n)
{
    bench_json j;
    if (bench_json_open(&j, path) != 0) {
        perror(path);
        exit(1);
    }
    for (size_t i = 0; i < n; i++) {
        bench_json_begin(&j, r[i].name, "postgres");
        bench_json_field(&j, "workers", "%u", r[i].workers);
        bench_json_field(&j, "lanes", "%u", r[i].lanes);
        bench_json_field(&j, "clients", "%u", r[i].clients);
        bench_json_field(&j, "keys", "%llu", (unsigned long long)r[i].keys);
        bench_json_field(&j, "ops_per_s", "%.0f", r[i].ops_per_s);
        bench_json_field(&j, "p50_us", "%.0f", r[i].p50_us);
        bench_json_field(&j, "p99_us", "%.0f", r[i].p99_us);
        bench_json_field(&j, "cpu_host_pct", "%.0f", r[i].cpu_host_pct);
        bench_json_field(&j, "cpu_pg_pct", "%.0f", r[i].cpu_pg_pct);
        /* PostgreSQL's CPU per command, us (issue: <= 25 at 64 clients) */
        if (r[i].ops_per_s > 0)
            bench_json_field(&j, "pg_us_per_op", "%.0f",
                             r[i].cpu_pg_pct * 1e4 / r[i].ops_per_s);
        bench_json_field(&j, "errors", "%llu",
                         (unsigned long long)r[i].errors);
        if (r[i].stages) {
            const struct {
                const char *key;
                const es_host_latency *l;
            } st[] = {{"queue", &r[i].queue},   {"decide", &r[i].decide},
                      {"lane", &r[i].lane},     {"write", &r[i].write},
                      {"commit", &r[i].commit}, {"handback", &r[i].handback},
                      {"total", &r[i].total}};
            for (size_t k = 0; k < sizeof st / sizeof st[0]; k++) {
                char key[40];
                snprintf(key, sizeof key, "%s_p50_us", st[k].key);
                bench_json_field(&j, key, "%.0f", st[k].l->p50_us);
                snprintf(key, sizeof key, "%s_p99_us", st[k].key);
                bench_json_field(&j, key, "%.0f", st[k].l->p99_us);
            }
            bench_json_field(&j, "commands_per_batch", "%.1f",
                             r[i].per_batch);
            bench_json_field(&j, "round_trips_per_batch", "%.2f",
                             r[i].trips_per_batch);
        }
        if (r[i].events > 0) {
            bench_json_field(&j, "events", "%llu",
                             (unsigned long long)r[i].events);
            bench_json_field(&j, "replayed", "%llu",
                             (unsigned long long)r[i].replayed);
            bench_json_field(&j, "events_per_s", "%.0f",
                             r[i].ops_per_s * (double)r[i].replayed);
        }
        bench_json_end(&j);
    }
    bench_json_close(&j);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT.json [--quick] [--lanes N,...] "
                "[--only commands|load]\n", argv[0]);
        return 2;
    }
    bool quick = false;
    const char *only = "";
    unsigned lanes_set[8] = {2};
    size_t n_lanes = 1;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) quick = true;
        if (strcmp(argv[i], "--only") == 0 && i + 1 < argc) only = argv[++i];
        if (strcmp(argv[i], "--lanes") == 0 && i + 1 < argc) {
            n_lanes = 0;
            for (char *p = argv[++i]; *p && n_lanes < 8;) {
                lanes_set[n_lanes++] = (unsigned)strtoul(p, &p, 10);
                if (*p == ',') p++;
            }
        }
    }
    if (getenv("DATABASE_URL") == NULL) {
        fprintf(stderr, "bench_pg: skipped, DATABASE_URL is not set "
                        "(tests/run.py --bench sets it)\n");
        FILE *f = fopen(argv[1], "w");
        if (f) {
            fputs("[]\n", f);
            fclose(f);
        }
        return 0;
    }
    bench_lat_init();
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    bench_id_prefix = ((uint64_t)rt.tv_sec << 30 ^ (uint64_t)rt.tv_nsec) * 31 +
                (uint64_t)getpid();
    double warm = quick ? 0.3 : 1.0, secs = quick ? 0.5 : 3.0;
    const uint64_t keys = 10000;
    const unsigned clientset[4] = {1, 8, 64, 256};
    es_store *store = open_store(16);
    bench_find_postmaster();
    record recs[64];
    size_t n = 0;
    if (strcmp(only, "load") == 0) n_lanes = 0;
    for (int c = 0; c < 4 && n_lanes > 0; c++)
        recs[n++] = per_command_point(clientset[c], keys, warm, secs);
    for (size_t l = 0; l < n_lanes; l++) {
        es_host *host = open_warm_host(store, lanes_set[l], keys);
        for (int c = 0; c < 4; c++)
            recs[n++] = host_point(host, lanes_set[l], clientset[c], keys,
                                   warm, secs);
        es_host_shutdown(host, NULL);
    }
    if (strcmp(only, "commands") != 0) {
        rehydration(store, warm, secs, &recs[n]);
        n += 2;
    }
    es_store_close(store);
    write_json(argv[1], recs, n);
    return 0;
}
