/*
 * The read side on PostgreSQL (DATABASE_URL; tests/run.py --bench starts
 * a throwaway cluster):
 *
 *   projection_catchup  a projection from position 0 over 1,000,000
 *                       events written with SQL, in each mode
 *                       (exactly_once: a transaction and a checkpoint per
 *                       batch; at_least_once: the checkpoint after it),
 *                       batches of 1,000; the handler reads each payload.
 *                       Records events, seconds, events_per_s and the CPU
 *                       split.
 *   projection_lag      the host commits deposits at a fixed rate
 *                       (10,000 commands/s, 10,000 accounts) while a
 *                       projection follows; each event's lag is the time
 *                       from its transaction's start (created_at) to its
 *                       handler call.  Records the rate reached and
 *                       lag_p50_ms / lag_p99_ms after a warm-up second.
 *
 * Usage: bench_read OUT.json [--quick]  (quick: 100,000 events; 3 s of
 * load)
 */
#include <libpq-fe.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "eventastic.h"
#include "fixtures/deposit.h"

#include "common/bench.h"
#include "common/measure.h"
#include "common/pg.h"
#include "common/report.h"

#define LAG_RATE 10000
#define LAG_KEYS 10000
#define MAX_SAMPLES (1u << 22)

/* ---- the handler ---- */

typedef struct sink {
    atomic_uint_fast64_t events;
    uint64_t bytes;       /* the handler's thread only */
    bool timed;           /* record each event's lag */
    atomic_bool measuring;
    double *lag_ms;       /* samples */
    atomic_size_t n_lag;
} sink;

static int on_event(void *ud, es_txn *txn, const es_recorded_event *ev,
                    es_error *err)
{
    (void)txn;
    (void)err;
    sink *s = ud;
    for (size_t i = 0; i < ev->event.len; i++) s->bytes += ev->event.data[i];
    atomic_fetch_add_explicit(&s->events, 1, memory_order_relaxed);
    if (s->timed && atomic_load(&s->measuring)) {
        size_t k = atomic_fetch_add(&s->n_lag, 1);
        if (k < MAX_SAMPLES)
            s->lag_ms[k] = (double)(es_clock_now_ms() - ev->created_ms);
    }
    return 0;
}

static es_projection *start(es_store *store, const char *name,
                            es_projection_mode mode, sink *s)
{
    es_projection_config *cfg = NULL;
    es_projection *p = NULL;
    es_error err = {0};
    int rc = es_projection_config_new(&cfg, &err);
    if (rc == 0) rc = es_projection_config_set_name(cfg, name, &err);
    if (rc == 0)
        rc = es_projection_config_set_handler(cfg, on_event, NULL, s, &err);
    if (rc == 0) rc = es_projection_config_set_mode(cfg, mode, &err);
    if (rc == 0) rc = es_projection_config_set_batch(cfg, 1000, &err);
    if (rc == 0) rc = es_projection_start(store, cfg, &p, &err);
    es_projection_config_free(cfg);
    if (rc != 0) bench_die(es_status_name(rc), err.message);
    return p;
}

/* ---- projection_catchup ---- */

typedef struct catchup {
    const char *mode;
    uint64_t events;
    double seconds, events_per_s, cpu_host_pct, cpu_pg_pct;
} catchup;

static catchup run_catchup(es_store *store, es_projection_mode mode,
                           const char *mode_name)
{
    sink s;
    memset(&s, 0, sizeof s);
    es_position head;
    es_error err = {0};
    if (es_store_head(store, &head, &err) != 0)
        bench_die("head", err.message);
    cpu_sample c0 = bench_cpu_sample();
    double t0 = bench_now_s();
    es_projection *p = start(store, mode_name, mode, &s);
    int rc = es_projection_wait(p, &head, 600000);
    double dt = bench_now_s() - t0;
    cpu_sample c1 = bench_cpu_sample();
    es_projection_stop(p);
    if (rc != 0) bench_die("catch up", es_status_name(rc));
    catchup r = {mode_name, atomic_load(&s.events), dt, 0, 0, 0};
    r.events_per_s = (double)r.events / dt;
    bench_cpu_pct(&c0, &c1, &r.cpu_host_pct, &r.cpu_pg_pct);
    fprintf(stderr, "  projection_catchup %s: %llu events in %.2f s, "
            "%.0f events/s, cpu host %.0f%% pg %.0f%%\n", mode_name,
            (unsigned long long)r.events, dt, r.events_per_s,
            r.cpu_host_pct, r.cpu_pg_pct);
    return r;
}

/* ---- projection_lag ---- */

typedef struct lag {
    double seconds, ops_per_s, lag_p50_ms, lag_p99_ms;
    double cpu_host_pct, cpu_pg_pct;
} lag;

static atomic_uint_fast64_t sent_ok, sent_failed;

static void sent(void *ud, const es_host_result *res)
{
    (void)ud;
    if (res->status == 0)
        atomic_fetch_add(&sent_ok, 1);
    else
        atomic_fetch_add(&sent_failed, 1);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static lag run_lag(es_store *store, double seconds)
{
    sink s;
    memset(&s, 0, sizeof s);
    s.timed = true;
    s.lag_ms = malloc(MAX_SAMPLES * sizeof *s.lag_ms);
    if (s.lag_ms == NULL) bench_die("lag", "out of memory");
    es_host *host = bench_pg_host(store);
    es_projection *p = start(store, "lag", ES_PROJECTION_AT_LEAST_ONCE, &s);
    uint8_t amount[8];
    fixture_put64(amount, 1);
    uint64_t seed = 0x2545f4914f6cdd1du;
    /* Open loop: every millisecond the commands due by then. */
    double t0 = bench_now_s(), warm = t0 + 1.0, end = t0 + 1.0 + seconds;
    uint64_t due_sent = 0, at_warm = 0;
    cpu_sample c0 = {0};
    bool measuring = false;
    for (double now = t0; now < end; now = bench_now_s()) {
        if (!measuring && now >= warm) {
            measuring = true;
            at_warm = atomic_load(&sent_ok);
            c0 = bench_cpu_sample();
            atomic_store(&s.measuring, true);
        }
        uint64_t due = (uint64_t)((now - t0) * LAG_RATE);
        for (; due_sent < due; due_sent++) {
            es_uuid key = bench_key_of(bench_rnd(&seed) % LAG_KEYS);
            es_command cmd = {bench_make_id(), 1, amount, 8};
            if (es_host_send(host, &deposit_type, &key, &cmd, sent, NULL,
                             NULL) != 0)
                atomic_fetch_add(&sent_failed, 1);
        }
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    atomic_store(&s.measuring, false);
    cpu_sample c1 = bench_cpu_sample();
    uint64_t done = atomic_load(&sent_ok) - at_warm;
    es_host_shutdown(host, NULL);
    es_projection_stop(p);
    lag r;
    memset(&r, 0, sizeof r);
    r.seconds = seconds;
    r.ops_per_s = (double)done / seconds;
    size_t n = atomic_load(&s.n_lag);
    if (n > MAX_SAMPLES) n = MAX_SAMPLES;
    qsort(s.lag_ms, n, sizeof *s.lag_ms, cmp_double);
    if (n > 0) {
        r.lag_p50_ms = s.lag_ms[n / 2];
        r.lag_p99_ms = s.lag_ms[(size_t)((double)n * 0.99)];
    }
    bench_cpu_pct(&c0, &c1, &r.cpu_host_pct, &r.cpu_pg_pct);
    fprintf(stderr, "  projection_lag: %.0f commands/s (%llu failed), "
            "%zu events seen, lag p50 %.0f ms p99 %.0f ms, cpu host %.0f%% "
            "pg %.0f%%\n", r.ops_per_s,
            (unsigned long long)atomic_load(&sent_failed), n, r.lag_p50_ms,
            r.lag_p99_ms, r.cpu_host_pct, r.cpu_pg_pct);
    free(s.lag_ms);
    return r;
}

int main(int argc, char **argv)
{
    bool quick = false;
    int st = bench_pg_begin(argc, argv, &quick);
    if (st != 0) return st;
    uint64_t events = quick ? 100000 : 1000000;
    char schema[64];
    snprintf(schema, sizeof schema, "read_%d", (int)getpid());
    es_store *store = bench_pg_open_store(schema);
    PGconn *c = bench_pg_connect();
    bench_pg_prefill(c, schema, events);
    catchup cu[2];
    cu[0] = run_catchup(store, ES_PROJECTION_EXACTLY_ONCE, "exactly_once");
    cu[1] = run_catchup(store, ES_PROJECTION_AT_LEAST_ONCE, "at_least_once");
    es_store_close(store);
    bench_pg_drop(c, schema);

    snprintf(schema, sizeof schema, "lag_%d", (int)getpid());
    store = bench_pg_open_store(schema);
    lag lg = run_lag(store, quick ? 3.0 : 20.0);
    es_store_close(store);
    bench_pg_drop(c, schema);
    PQfinish(c);

    bench_json j;
    if (bench_json_open(&j, argv[1]) != 0) bench_die(argv[1], "cannot write");
    for (int i = 0; i < 2; i++) {
        bench_json_begin(&j, "projection_catchup", "postgres");
        bench_json_field(&j, "phase", "\"%s\"", cu[i].mode);
        bench_json_field(&j, "events_in_store", "%llu",
                         (unsigned long long)cu[i].events);
        bench_json_field(&j, "seconds", "%.2f", cu[i].seconds);
        bench_json_field(&j, "events_per_s", "%.0f", cu[i].events_per_s);
        bench_json_field(&j, "cpu_host_pct", "%.0f", cu[i].cpu_host_pct);
        bench_json_field(&j, "cpu_pg_pct", "%.0f", cu[i].cpu_pg_pct);
        bench_json_end(&j);
    }
    bench_json_begin(&j, "projection_lag", "postgres");
    bench_json_field(&j, "keys", "%d", LAG_KEYS);
    bench_json_field(&j, "target_ops_per_s", "%d", LAG_RATE);
    bench_json_field(&j, "ops_per_s", "%.0f", lg.ops_per_s);
    bench_json_field(&j, "seconds", "%.0f", lg.seconds);
    bench_json_field(&j, "lag_p50_ms", "%.0f", lg.lag_p50_ms);
    bench_json_field(&j, "lag_p99_ms", "%.0f", lg.lag_p99_ms);
    bench_json_field(&j, "cpu_host_pct", "%.0f", lg.cpu_host_pct);
    bench_json_field(&j, "cpu_pg_pct", "%.0f", lg.cpu_pg_pct);
    bench_json_end(&j);
    bench_json_close(&j);
    return 0;
}
