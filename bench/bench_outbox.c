/*
 * Outbox delivery on PostgreSQL (DATABASE_URL; tests/run.py --bench starts
 * a throwaway cluster): how fast a dispatcher drains a backlog of pending
 * side effects with a handler that does nothing, and what one claim round
 * costs with the whole backlog still pending, behind as many pending
 * messages of a type no handler takes.  Both figures show the machinery's
 * own cost (claim, lease, verdicts), not a handler's.
 *
 * Records: outbox_round (ops_per_s = messages per second of single rounds
 * through es_outbox_run_once; p50_us/p99_us = one round of up to 256
 * messages, with the backlog pending), outbox_drain (ops_per_s = messages
 * per second of the running dispatcher, 8 workers, until the backlog is
 * empty).  keys = the backlog.
 *
 * Usage: bench_outbox OUT.json [--quick]
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "eventastic.h"

#include "common/bench.h"
#include "common/report.h"

typedef struct job {
    int64_t count;
} job;

typedef struct job_event {
    es_uuid id;
} job_event;

typedef struct job_effect {
    es_uuid id;
} job_effect;

static es_uuid ev_id(const void *e) { return ((const job_event *)e)->id; }
static int32_t ev_kind(const void *e)
{
    (void)e;
    return 1;
}
static int apply(void *s, const void *e, es_error *err)
{
    (void)e;
    (void)err;
    ((job *)s)->count++;
    return 0;
}
static int effects(const void *s, const void *e, es_side_effect_sink *sink,
                   es_error *err)
{
    (void)s;
    (void)err;
    job_effect fx = {((const job_event *)e)->id};
    fx.id.bytes[15] ^= 0xff;
    return es_side_effect_emit(sink, &fx);
}
static int blob_enc(const void *v, size_t n, es_buf *out)
{
    return es_buf_append(out, v, n);
}
static int blob_dec(const uint8_t *p, size_t len, void *v, size_t n)
{
    if (len != n) return ES_EDECODE;
    memcpy(v, p, n);
    return 0;
}
static int st_enc(const void *s, es_buf *out, es_error *err)
{
    (void)err;
    return blob_enc(s, sizeof(job), out);
}
static int st_dec(const uint8_t *p, size_t n, void *s, es_error *err)
{
    (void)err;
    return blob_dec(p, n, s, sizeof(job));
}
static int ev_enc(const void *e, es_buf *out, es_error *err)
{
    (void)err;
    return blob_enc(e, sizeof(job_event), out);
}
static int ev_dec(int32_t k, const uint8_t *p, size_t n, void *e,
                  es_error *err)
{
    (void)k;
    (void)err;
    return blob_dec(p, n, e, sizeof(job_event));
}
static es_uuid fx_id(const void *f) { return ((const job_effect *)f)->id; }
static int32_t fx_kind(const void *f)
{
    (void)f;
    return 7;
}
static int fx_enc(const void *f, es_buf *out, es_error *err)
{
    (void)err;
    return blob_enc(f, sizeof(job_effect), out);
}
static int fx_dec(int32_t k, const uint8_t *p, size_t n, void *f,
                  es_error *err)
{
    (void)k;
    (void)err;
    return blob_dec(p, n, f, sizeof(job_effect));
}

static const es_aggregate_type job_type = {
    .name = "job", .snapshot_version = 1,
    .state_size = sizeof(job), .event_size = sizeof(job_event),
    .side_effect_size = sizeof(job_effect),
    .event_id = ev_id, .event_kind = ev_kind,
    .apply_new = apply, .apply = apply, .side_effects = effects,
    .state_encode = st_enc, .state_decode = st_dec,
    .event_encode = ev_enc, .event_decode = ev_dec,
    .side_effect_id = fx_id, .side_effect_kind = fx_kind,
    .side_effect_encode = fx_enc, .side_effect_decode = fx_dec,
};

/* The same under another name (set in main): messages no handler of the
 * bench takes. */
static es_aggregate_type noise_type;

static atomic_uint_least64_t g_delivered;

static es_outbox_verdict nothing(void *ud, const es_outbox_entry *e,
                                 const void *value, es_error *reason)
{
    (void)ud;
    (void)e;
    (void)value;
    (void)reason;
    atomic_fetch_add(&g_delivered, 1);
    return ES_OUTBOX_VERDICT_DONE;
}

static void die(const char *what, int rc, const es_error *err)
{
    fprintf(stderr, "bench_outbox: %s: %s: %s\n", what, es_status_name(rc),
            err->message);
    exit(1);
}

/* n aggregates with one event (one side effect) each, 1000 a transaction. */
static void fill(es_store *store, const es_aggregate_type *type, size_t n)
{
    es_error err = {0};
    for (size_t done = 0; done < n;) {
        es_txn *txn = NULL;
        int rc = es_store_begin(store, &txn, &err);
        if (rc != 0) die("begin", rc, &err);
        for (size_t k = 0; k < 1000 && done < n; k++, done++) {
            es_uuid id;
            job_event ev;
            es_uuid_v7(&id);
            es_uuid_v7(&ev.id);
            es_context *ctx = NULL;
            rc = es_context_record_new(type, &id, &ev, &ctx, &err);
            if (rc == 0) rc = es_context_save(txn, ctx, &err);
            es_context_free(ctx);
            if (rc != 0) die("save", rc, &err);
        }
        rc = es_txn_commit(txn, &err);
        if (rc != 0) die("commit", rc, &err);
    }
}

static es_outbox_config *config(es_store *store)
{
    es_error err = {0};
    es_outbox_config *cfg = NULL;
    int rc = es_outbox_config_new(store, &cfg, &err);
    if (rc == 0)
        rc = es_outbox_config_add_handler(cfg, &job_type, ES_OUTBOX_ANY_KIND,
                                          nothing, NULL, &err);
    if (rc == 0) rc = es_outbox_config_set_concurrency(cfg, 8, &err);
    if (rc == 0) rc = es_outbox_config_set_batch_size(cfg, 256, &err);
    if (rc == 0) rc = es_outbox_config_set_poll_ms(cfg, 50, &err);
    if (rc != 0) die("outbox config", rc, &err);
    return cfg;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct record {
    const char *name;
    size_t backlog;
    double ops_per_s, p50_us, p99_us;
} record;

static void measure(size_t backlog, size_t rounds, record *round_rec,
                    record *drain_rec)
{
    es_pg_config *pcfg = NULL;
    es_store *store = NULL;
    es_error err = {0};
    char schema[40];
    snprintf(schema, sizeof schema, "bench_outbox_%d_%zu", (int)getpid(),
             backlog);
    int rc = es_pg_config_new(&pcfg, &err);
    if (rc == 0) rc = es_pg_config_set_schema(pcfg, schema, &err);
    if (rc == 0) rc = es_pg_config_set_pool_size(pcfg, 16, &err);
    if (rc == 0) rc = es_pg_migrate(pcfg, NULL, &err);
    if (rc == 0) rc = es_pg_store_open(pcfg, &store, &err);
    es_pg_config_free(pcfg);
    if (rc != 0) die("store", rc, &err);
    fill(store, &noise_type, backlog); /* ahead of the bench's own */
    fill(store, &job_type, backlog);
    /* Statistics, as autovacuum would have them in a running system. */
    PGconn *c = PQconnectdb(getenv("DATABASE_URL"));
    char sql[96];
    snprintf(sql, sizeof sql, "ANALYZE \"%s\".outbox", schema);
    PGresult *r = PQstatus(c) == CONNECTION_OK ? PQexec(c, sql) : NULL;
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        fprintf(stderr, "bench_outbox: ANALYZE: %s", PQerrorMessage(c));
    PQclear(r);
    PQfinish(c);

    /* Single rounds with (nearly) the whole backlog pending. */
    es_outbox_config *cfg = config(store);
    es_outbox *ob = NULL;
    rc = es_outbox_open(cfg, false, &ob, &err);
    if (rc != 0) die("outbox", rc, &err);
    double *lat = calloc(rounds, sizeof *lat);
    size_t msgs = 0;
    double total = 0;
    for (size_t i = 0; i < rounds; i++) {
        size_t n = 0;
        double t0 = bench_now_s();
        rc = es_outbox_run_once(ob, &n, &err);
        lat[i] = (bench_now_s() - t0) * 1e6;
        if (rc != 0) die("round", rc, &err);
        total += lat[i] / 1e6;
        msgs += n;
    }
    es_outbox_close(ob);
    qsort(lat, rounds, sizeof *lat, cmp_double);
    *round_rec = (record){"outbox_round", backlog, (double)msgs / total,
                          lat[rounds / 2], lat[(rounds * 99) / 100]};
    free(lat);

    /* The running dispatcher drains the rest. */
    size_t rest = backlog - msgs;
    atomic_store(&g_delivered, 0);
    double t0 = bench_now_s();
    rc = es_outbox_open(cfg, true, &ob, &err);
    if (rc != 0) die("outbox", rc, &err);
    for (;;) {
        es_outbox_stats st;
        if (atomic_load(&g_delivered) >= rest &&
            es_outbox_stats_get(store, 0, &st, &err) == 0 &&
            st.pending == backlog) /* the noise is left */
            break;
        usleep(2000);
    }
    double secs = bench_now_s() - t0;
    es_outbox_close(ob);
    es_outbox_config_free(cfg);
    *drain_rec = (record){"outbox_drain", backlog, (double)rest / secs, 0, 0};
    printf("backlog %7zu: round p50 %.1f ms p99 %.1f ms; drain %.0f "
           "messages/s (%zu in %.2f s)\n", backlog, round_rec->p50_us / 1e3,
           round_rec->p99_us / 1e3, drain_rec->ops_per_s, rest, secs);
    es_store_close(store);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT.json [--quick]\n", argv[0]);
        return 2;
    }
    bool quick = argc > 2 && strcmp(argv[2], "--quick") == 0;
    bench_json j;
    if (bench_json_open(&j, argv[1]) != 0) {
        perror(argv[1]);
        return 1;
    }
    if (getenv("DATABASE_URL") == NULL) {
        fprintf(stderr, "bench_outbox: skipped, DATABASE_URL is not set\n");
        bench_json_close(&j); /* no records */
        return 0;
    }
    noise_type = job_type;
    noise_type.name = "noise";
    const size_t backlogs[2] = {quick ? 2000 : 10000, quick ? 20000 : 100000};
    record recs[4];
    for (size_t i = 0; i < 2; i++) {
        /* Rounds that take about a quarter of the backlog. */
        size_t rounds = backlogs[i] / 1024;
        measure(backlogs[i], rounds < 20 ? rounds : 20, &recs[2 * i],
                &recs[2 * i + 1]);
    }
    for (size_t i = 0; i < 4; i++) {
        bench_json_begin(&j, recs[i].name, "postgres");
        bench_json_field(&j, "workers", "%d", 8);
        bench_json_field(&j, "clients", "%d", 1);
        bench_json_field(&j, "keys", "%zu", recs[i].backlog);
        bench_json_field(&j, "ops_per_s", "%.0f", recs[i].ops_per_s);
        bench_json_field(&j, "p50_us", "%.0f", recs[i].p50_us);
        bench_json_field(&j, "p99_us", "%.0f", recs[i].p99_us);
        bench_json_end(&j);
    }
    bench_json_close(&j);
    return 0;
}
