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
 * latency in the window), cpu_host_pct and cpu_pg_pct.  The figures to
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

#define CLIENTS 64
#define KEYS 10000
#define MAX_WINDOWS 16

typedef struct record {
    const char *phase;
    int window;
    double seconds, ops_per_s, p50_us, p99_us, cpu_host_pct, cpu_pg_pct;
    uint64_t events_in_store;
    double events_table_mb;
} record;

static void die(const char *what, const char *why)
{
    fprintf(stderr, "bench_growth: %s: %s\n", what, why);
    exit(1);
}

static void quiet(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

static PGresult *sql(PGconn *c, const char *text)
{
    PGresult *r = PQexec(c, text);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        die(text, PQerrorMessage(c));
    return r;
}

static double table_mb(PGconn *c, const char *schema)
{
    char q[256];
    snprintf(q, sizeof q, "SELECT pg_total_relation_size('\"%s\".events')",
             schema);
    PGresult *r = sql(c, q);
    double mb = strtod(PQgetvalue(r, 0, 0), NULL) / 1048576.0;
    PQclear(r);
    return mb;
}

static es_store *open_store(const char *schema)
{
    es_pg_config *cfg = NULL;
    es_store *store = NULL;
    es_error err = {0};
    int rc = es_pg_config_new(&cfg, &err);
    if (rc == 0) rc = es_pg_config_set_schema(cfg, schema, &err);
    if (rc == 0) rc = es_pg_config_set_pool_size(cfg, 8, &err);
    if (rc == 0) rc = es_pg_migrate(cfg, NULL, &err);
    if (rc == 0) rc = es_pg_store_open(cfg, &store, &err);
    es_pg_config_free(cfg);
    if (rc != 0) die(es_status_name(rc), err.message);
    return store;
}

/* events of other aggregates (ten each), in id order so the indexes grow
 * at their end; then VACUUM ANALYZE, as a settled store has had.  Their
 * ids end in 01, the benchmark's accounts' in 7e (bench_key_of): no
 * account of the load is one of them. */
static void prefill(PGconn *c, const char *schema, uint64_t events)
{
    double t0 = bench_now_s();
    char q[1024];
    snprintf(q, sizeof q,
             "INSERT INTO \"%s\".events (aggregate_type, aggregate_id, "
             "version, event_id, kind, payload) SELECT 'account', ('ff' || "
             "lpad(to_hex(i / 10), 28, '0') || '01')::uuid, i %% 10, ('fe' || "
             "lpad(to_hex(i), 30, '0'))::uuid, 2, '\\x0000000000000001' "
             "FROM generate_series(0, %llu) AS i",
             schema, (unsigned long long)events - 1);
    PQclear(sql(c, q));
    snprintf(q, sizeof q, "VACUUM ANALYZE \"%s\".events", schema);
    PQclear(sql(c, q));
    fprintf(stderr, "  prefilled %llu events in %.0f s\n",
            (unsigned long long)events, bench_now_s() - t0);
}

static es_host *host_open(es_store *store)
{
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    es_host_config_new(&cfg, NULL);
    es_host_config_set_workers(cfg, 2);
    es_host_config_add_type(cfg, &deposit_type, bench_deposit_decide, NULL,
                            NULL);
    if (es_host_open(cfg, store, &host, NULL) != 0) die("host", "open");
    es_host_config_free(cfg);
    return host;
}

static size_t phase(const char *name, uint64_t prefilled, int windows,
                    double window_s, record *out)
{
    char schema[64];
    snprintf(schema, sizeof schema, "growth_%s_%d", name, (int)getpid());
    es_store *store = open_store(schema);
    PGconn *c = PQconnectdb(getenv("DATABASE_URL"));
    if (PQstatus(c) != CONNECTION_OK) die("connect", PQerrorMessage(c));
    PQsetNoticeProcessor(c, quiet, NULL); /* DROP ... CASCADE */
    if (prefilled > 0) prefill(c, schema, prefilled);
    es_host *host = host_open(store);

    bench_load r;
    bench_lat_reset();
    double start = bench_now_s();
    cpu_sample s0 = bench_cpu_sample();
    bench_load_start(&r, host, KEYS, 0, CLIENTS, true);
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
        fprintf(stderr, "  %s window %d: %.0f/s, p50 %.0f us, p99 %.0f us, "
                "%llu events (%.0f MB), cpu host %.0f%% pg %.0f%%\n", name,
                rec->window, rec->ops_per_s, rec->p50_us, rec->p99_us,
                (unsigned long long)rec->events_in_store,
                rec->events_table_mb, rec->cpu_host_pct, rec->cpu_pg_pct);
        s0 = bench_cpu_sample();
        bench_lat_reset();
        atomic_store(&r.measuring, true);
    }
    bench_load_stop(&r);
    bench_load_report(&r, name);
    es_host_shutdown(host, NULL);
    es_store_close(store);
    char q[128];
    snprintf(q, sizeof q, "DROP SCHEMA \"%s\" CASCADE", schema);
    PQclear(sql(c, q));
    PQfinish(c);
    return n;
}

static void write_json(const char *path, const record *r, size_t n)
{
    bench_json j;
    if (bench_json_open(&j, path) != 0) die(path, "cannot write");
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
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT.json [--quick]\n", argv[0]);
        return 2;
    }
    bool quick = argc > 2 && strcmp(argv[2], "--quick") == 0;
    if (getenv("DATABASE_URL") == NULL) {
        fprintf(stderr, "bench_growth: DATABASE_URL is not set "
                        "(tests/run.py --bench sets it)\n");
        return 1;
    }
    bench_lat_init();
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    bench_id_prefix = ((uint64_t)rt.tv_sec << 30 ^ (uint64_t)rt.tv_nsec) * 31 +
                      (uint64_t)getpid();
    bench_find_postmaster();
    int windows = quick ? 3 : 6;
    double window_s = quick ? 2.0 : 10.0;
    uint64_t big = quick ? 100000 : 10000000;
    record recs[2 * MAX_WINDOWS];
    size_t n = phase("empty", 0, windows, window_s, recs);
    n += phase("prefilled", big, windows, window_s, recs + n);
    write_json(argv[1], recs, n);
    return 0;
}
