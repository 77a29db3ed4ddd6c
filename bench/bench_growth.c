/*
 * store_growth: does a command cost the same while the store grows, and
 * on a store that is already large?  (DATABASE_URL; tests/run.py --bench
 * starts a throwaway cluster.)
 *
 * The host on PostgreSQL, 64 closed-loop clients depositing to 10,000
 * accounts (as host_pg in bench_pg), for a fixed run cut into 10-second
 * windows, in two phases, each in a schema of its own:
 *
 *   empty      from an empty store (the accounts are opened by the first
 *              deposits, inside the first window);
 *   prefilled  on a store that already holds 10,000,000 events of other
 *              aggregates, written with SQL (generate_series), vacuumed
 *              and analyzed as a settled store would be.
 *
 * Records, one per window: name "store_growth", phase, window, seconds
 * (the window's end since the phase started), events_in_store (at the
 * window's end: the prefill plus every event committed since),
 * events_table_mb (pg_total_relation_size of the events table), ops_per_s
 * (commands committed in the window), p50_us / p99_us (client-side
 * latency in the window), cpu_host_pct and cpu_pg_pct, checkpoints (that
 * ended in the window) and autovacuums (autovacuum and autoanalyze runs
 * on the schema's tables in the window).  The figures to
 * read: the slowest window against the fastest within a phase, and the
 * prefilled phase against the empty one.
 *
 * Usage: bench_growth OUT.json [--quick]  (quick: 100,000 events and
 * three 2-second windows a phase)
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
#include "common/report.h"
#include "common/load.h"
#include "common/measure.h"
#include "common/pg.h"

#define CLIENTS 64
#define KEYS 10000
#define MAX_WINDOWS 16

typedef struct record {
    const char *phase;
    int window;
    double seconds, ops_per_s, p50_us, p99_us, cpu_host_pct, cpu_pg_pct;
    uint64_t events_in_store;
    double events_table_mb;
    /* the server's background work during the window: checkpoints that
     * ended, autovacuum and autoanalyze runs on the schema's tables */
    long long checkpoints, autovacuums;
} record;

/* Checkpoints so far (the cluster's), and autovacuum and autoanalyze runs
 * on schema's tables. */
static void background_work(PGconn *c, const char *schema,
                            long long *checkpoints, long long *autovacuums)
{
    PGresult *r = bench_pg_sql(c, "SELECT checkpoints_timed + "
                                  "checkpoints_req FROM pg_stat_bgwriter");
    *checkpoints = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    const char *v[1] = {schema};
    r = PQexecParams(c, "SELECT coalesce(sum(autovacuum_count + "
                        "autoanalyze_count), 0) FROM pg_stat_user_tables "
                        "WHERE schemaname = $1", 1, NULL, v, NULL, NULL, 0);
    *autovacuums = PQresultStatus(r) == PGRES_TUPLES_OK
                       ? atoll(PQgetvalue(r, 0, 0))
                       : -1;
    PQclear(r);
}

static double table_mb(PGconn *c, const char *schema)
{
    char q[256];
    snprintf(q, sizeof q, "SELECT pg_total_relation_size('\"%s\".events')",
             schema);
    PGresult *r = bench_pg_sql(c, q);
    double mb = strtod(PQgetvalue(r, 0, 0), NULL) / 1048576.0;
    PQclear(r);
    return mb;
}

static size_t phase(const char *name, uint64_t prefilled, int windows,
                    double window_s, record *out)
{
    char schema[64];
    snprintf(schema, sizeof schema, "growth_%s_%d", name, (int)getpid());
    es_store *store = bench_pg_open_store(schema);
    PGconn *c = bench_pg_connect();
    if (prefilled > 0) bench_pg_prefill(c, schema, prefilled);
    es_host *host = bench_pg_host(store);

    bench_load r;
    bench_lat_reset();
    double start = bench_now_s();
    cpu_sample s0 = bench_cpu_sample();
    bench_load_start(&r, host, KEYS, 0, CLIENTS, true);
    long long ck0 = 0, av0 = 0;
    background_work(c, schema, &ck0, &av0);
    size_t n = 0;
    for (int w = 0; w < windows; w++) {
        double t0 = bench_now_s();
        bench_sleep_s(window_s);
        atomic_store(&r.measuring, false);
        double dt = bench_now_s() - t0;
        uint64_t done = atomic_exchange(&r.done, 0);
        cpu_sample s1 = bench_cpu_sample();
        record *rec = &out[n++];
        memset(rec, 0, sizeof *rec);
        rec->phase = name;
        rec->window = w + 1;
        rec->seconds = bench_now_s() - start;
        rec->ops_per_s = (double)done / dt;
        bench_lat_percentiles(&rec->p50_us, &rec->p99_us);
        bench_cpu_pct(&s0, &s1, &rec->cpu_host_pct, &rec->cpu_pg_pct);
        /* a new account's first deposit writes one event, as the rest */
        rec->events_in_store = prefilled + atomic_load(&r.committed);
        rec->events_table_mb = table_mb(c, schema);
        long long ck = 0, av = 0;
        background_work(c, schema, &ck, &av);
        rec->checkpoints = ck - ck0;
        rec->autovacuums = av - av0;
        ck0 = ck;
        av0 = av;
        fprintf(stderr, "  %s window %d: %.0f/s, p50 %.0f us, p99 %.0f us, "
                "%llu events (%.0f MB), cpu host %.0f%% pg %.0f%%, "
                "checkpoints %lld, autovacuum runs %lld\n", name,
                rec->window, rec->ops_per_s, rec->p50_us, rec->p99_us,
                (unsigned long long)rec->events_in_store,
                rec->events_table_mb, rec->cpu_host_pct, rec->cpu_pg_pct,
                rec->checkpoints, rec->autovacuums);
        s0 = bench_cpu_sample();
        bench_lat_reset();
        atomic_store(&r.measuring, true);
    }
    bench_load_stop(&r);
    bench_load_report(&r, name);
    es_host_shutdown(host, NULL);
    es_store_close(store);
    bench_pg_drop(c, schema);
    PQfinish(c);
    return n;
}

static void write_json(const char *path, const record *r, size_t n)
{
    bench_json j;
    if (bench_json_open(&j, path) != 0) bench_die(path, "cannot write");
    for (size_t i = 0; i < n; i++) {
        bench_json_begin(&j, "store_growth", "postgres");
        bench_json_field(&j, "phase", "\"%s\"", r[i].phase);
        bench_json_field(&j, "window", "%d", r[i].window);
        bench_json_field(&j, "seconds", "%.1f", r[i].seconds);
        bench_json_field(&j, "clients", "%d", CLIENTS);
        bench_json_field(&j, "keys", "%d", KEYS);
        bench_json_field(&j, "events_in_store", "%llu",
                         (unsigned long long)r[i].events_in_store);
        bench_json_field(&j, "events_table_mb", "%.1f", r[i].events_table_mb);
        bench_json_field(&j, "checkpoints", "%lld", r[i].checkpoints);
        bench_json_field(&j, "autovacuums", "%lld", r[i].autovacuums);
        bench_json_field(&j, "ops_per_s", "%.0f", r[i].ops_per_s);
        bench_json_field(&j, "p50_us", "%.0f", r[i].p50_us);
        bench_json_field(&j, "p99_us", "%.0f", r[i].p99_us);
        bench_json_field(&j, "cpu_host_pct", "%.0f", r[i].cpu_host_pct);
        bench_json_field(&j, "cpu_pg_pct", "%.0f", r[i].cpu_pg_pct);
        bench_json_end(&j);
    }
    bench_json_close(&j);
}

int main(int argc, char **argv)
{
    bool quick = false;
    int st = bench_pg_begin(argc, argv, &quick);
    if (st != 0) return st;
    bench_lat_init();
    int windows = quick ? 3 : 6;
    double window_s = quick ? 2.0 : 10.0;
    uint64_t big = quick ? 100000 : 10000000;
    record recs[2 * MAX_WINDOWS];
    size_t n = phase("empty", 0, windows, window_s, recs);
    n += phase("prefilled", big, windows, window_s, recs + n);
    write_json(argv[1], recs, n);
    return 0;
}
