/* What the PostgreSQL benchmarks share (see pg.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "measure.h"
#include "fixtures/deposit.h"
#include "pg.h"

void bench_die(const char *what, const char *why)
{
    fprintf(stderr, "bench: %s: %s\n", what, why);
    exit(1);
}

int bench_pg_begin(int argc, char **argv, bool *quick)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT.json [--quick]\n", argv[0]);
        return 2;
    }
    *quick = argc > 2 && strcmp(argv[2], "--quick") == 0;
    if (getenv("DATABASE_URL") == NULL) {
        fprintf(stderr, "%s: DATABASE_URL is not set (tests/run.py --bench "
                "sets it)\n", argv[0]);
        return 1;
    }
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    bench_id_prefix = ((uint64_t)rt.tv_sec << 30 ^ (uint64_t)rt.tv_nsec) * 31 +
                      (uint64_t)getpid();
    bench_find_postmaster();
    return 0;
}

es_store *bench_pg_open_store(const char *schema)
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
    if (rc != 0) bench_die(es_status_name(rc), err.message);
    return store;
}

static void quiet(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

PGconn *bench_pg_connect(void)
{
    PGconn *c = PQconnectdb(getenv("DATABASE_URL"));
    if (PQstatus(c) != CONNECTION_OK) bench_die("connect", PQerrorMessage(c));
    PQsetNoticeProcessor(c, quiet, NULL); /* DROP ... CASCADE */
    return c;
}

PGresult *bench_pg_sql(PGconn *c, const char *text)
{
    PGresult *r = PQexec(c, text);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        bench_die(text, PQerrorMessage(c));
    return r;
}

void bench_pg_prefill(PGconn *c, const char *schema, uint64_t events)
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
    PQclear(bench_pg_sql(c, q));
    snprintf(q, sizeof q, "VACUUM ANALYZE \"%s\".events", schema);
    PQclear(bench_pg_sql(c, q));
    fprintf(stderr, "  prefilled %llu events in %.0f s\n",
            (unsigned long long)events, bench_now_s() - t0);
}

void bench_pg_drop(PGconn *c, const char *schema)
{
    char q[128];
    snprintf(q, sizeof q, "DROP SCHEMA \"%s\" CASCADE", schema);
    PQclear(bench_pg_sql(c, q));
}

es_host *bench_pg_host(es_store *store)
{
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    es_host_config_new(&cfg, NULL);
    es_host_config_set_workers(cfg, 2);
    es_host_config_add_type(cfg, &deposit_type, bench_deposit_decide, NULL,
                            NULL);
    if (es_host_open(cfg, store, &host, NULL) != 0) bench_die("host", "open");
    es_host_config_free(cfg);
    return host;
}
