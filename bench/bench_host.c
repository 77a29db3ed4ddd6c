/*
 * Benchmarks of the aggregate host on the in-memory store, side by side
 * with a single-threaded loop that does the same work without the host.
 *
 *   host_memory      commands/s through the host: 2 workers, C clients
 *                    (each keeps one command in flight and sends the next
 *                    from the completion of the previous), K keys
 *   direct_loop      one thread: decide, record, save 1024 commands per
 *                    transaction, commit; same commands, same store
 *   host_null        host_memory on a store that accepts every batch and
 *                    keeps nothing: the host's runtime alone
 *   host_memory with 4 workers: scaling past the machine's 2 cores
 *   resident_memory  heap bytes per resident idle aggregate (host side,
 *                    the user's state excluded), N aggregates resident
 *
 * Usage: bench_host OUT.json [--quick].  Writes a JSON array of records
 * (name, store, workers, clients, keys, ops_per_s, p50_us, p99_us,
 * peak_rss_kb, bytes_per_aggregate) to OUT.json; tests/run.py --bench
 * merges the files into build/bench/results.json and prints a table.
 */
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "eventastic.h"

#include "fixtures/deposit.h"
#include "common/bench.h"
#include "common/report.h"
#include "common/load.h"
#include "common/null_store.h"

static long peak_rss_kb(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

/* ---- host_memory: closed-loop clients (common/load.c) ---- */

typedef struct record {
    const char *name;
    unsigned workers, clients;
    uint64_t keys;
    double ops_per_s, p50_us, p99_us;
    long peak_rss_kb;
    double bytes_per_aggregate; /* < 0: not applicable */
} record;

/* null: on the null store (the host's runtime alone), else the memory
 * store. */
static record host_point(unsigned workers, unsigned clients, uint64_t keys,
                         double seconds, bool null)
{
    es_store *store = NULL;
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    if (null)
        bench_null_store_open(&store);
    else
        es_memory_store_open(&store, NULL);
    es_host_config_new(&cfg, NULL);
    es_host_config_set_workers(cfg, workers);
    es_host_config_set_resident_bound(cfg, 2000000);
    es_host_config_set_snapshots(cfg, 0, false);
    es_host_config_add_type(cfg, &deposit_type, bench_deposit_decide, NULL,
                            NULL);
    if (es_host_open(cfg, store, &host, NULL) != 0) abort();
    es_host_config_free(cfg);

    bench_load r;
    double t0 = bench_now_s();
    bench_load_start(&r, host, keys, 0, clients, false);
    struct timespec tick = {0, 10000000};
    while (bench_now_s() - t0 < seconds) nanosleep(&tick, NULL);
    uint64_t done = atomic_load(&r.done);
    double dt = bench_now_s() - t0;
    bench_load_stop(&r);
    es_host_metrics m;
    es_host_metrics_get(host, &m);
    es_host_shutdown(host, NULL);
    es_store_close(store);
    const char *name = null ? "host_null" : "host_memory";
    if (atomic_load(&r.errors) != 0)
        fprintf(stderr, "%s: %llu errors\n", name,
                (unsigned long long)atomic_load(&r.errors));
    record rec = {name, workers, clients, keys, (double)done / dt,
                  m.total.p50_us, m.total.p99_us, peak_rss_kb(), -1};
    fprintf(stderr, "  %s workers %u clients %u keys %llu: %.0f/s, %.1f "
            "commands a batch, p50 %.1f us, p99 %.1f us\n", name, workers,
            clients, (unsigned long long)keys, rec.ops_per_s,
            m.batches ? (double)m.batch_items / (double)m.batches : 0.0,
            m.total.p50_us, m.total.p99_us);
    return rec;
}

/* ---- direct_loop: the same work on one thread, no host ---- */

static record direct_point(uint64_t keys, double seconds)
{
    es_store *store = NULL;
    es_memory_store_open(&store, NULL);
    es_context **ctx = calloc(keys, sizeof *ctx);
    uint64_t *dirty = calloc(1024, sizeof *dirty);
    uint64_t seed = 0x9e3779b97f4a7c15u, done = 0;
    uint8_t amount[8];
    fixture_put64(amount, 1);
    double t0 = bench_now_s(), dt = 0;
    for (;;) {
        size_t n_dirty = 0;
        for (int i = 0; i < 1024; i++) {
            uint64_t k = bench_rnd(&seed) % keys;
            es_uuid key = bench_key_of(k);
            /* what the decide emits, applied through the context */
            deposit d = {bench_make_id(), (int64_t)fixture_get64(amount)};
            if (ctx[k] == NULL) {
                if (es_context_record_new(&deposit_type, &key, &d, &ctx[k],
                                          NULL) != 0)
                    abort();
            } else if (es_context_record(ctx[k], &d, NULL) != 0) {
                abort();
            }
            if (es_context_uncommitted_count(ctx[k]) == 1)
                dirty[n_dirty++] = k;
        }
        es_txn *txn = NULL;
        if (es_store_begin(store, &txn, NULL) != 0) abort();
        for (size_t i = 0; i < n_dirty; i++)
            if (es_context_save(txn, ctx[dirty[i]], NULL) != 0) abort();
        if (es_txn_commit(txn, NULL) != 0) abort();
        done += 1024;
        dt = bench_now_s() - t0;
        if (dt >= seconds) break;
    }
    for (uint64_t k = 0; k < keys; k++) es_context_free(ctx[k]);
    free(ctx);
    free(dirty);
    es_store_close(store);
    record rec = {"direct_loop", 1, 1, keys, (double)done / dt, 0, 0,
                  peak_rss_kb(), -1};
    fprintf(stderr, "  direct_loop keys %llu: %.0f/s\n",
            (unsigned long long)keys, rec.ops_per_s);
    return rec;
}

/* ---- resident_memory ---- */

static void count_done(void *ud, const es_host_result *r)
{
    (void)r;
    atomic_fetch_add((atomic_uint_least64_t *)ud, 1);
}

static record resident_point(uint64_t n)
{
    es_store *store = NULL;
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    es_memory_store_open(&store, NULL);
    es_host_config_new(&cfg, NULL);
    es_host_config_set_resident_bound(cfg, n * 2);
    es_host_config_set_idle_ms(cfg, 0);
    es_host_config_set_snapshots(cfg, 0, false);
    es_host_config_add_type(cfg, &deposit_type, bench_deposit_decide, NULL,
                            NULL);
    if (es_host_open(cfg, store, &host, NULL) != 0) abort();
    es_host_config_free(cfg);
    atomic_uint_least64_t done = 0;
    uint8_t amount[8];
    fixture_put64(amount, 1);
    malloc_trim(0);
    size_t before = mallinfo2().uordblks;
    for (uint64_t i = 0; i < n; i++) {
        es_uuid key = bench_key_of(i);
        es_command cmd = {bench_make_id(), 1, amount, 8};
        while (es_host_send(host, &deposit_type, &key, &cmd, count_done,
                            &done, NULL) == ES_EBUSY) {
        }
    }
    struct timespec tick = {0, 1000000};
    while (atomic_load(&done) < n) nanosleep(&tick, NULL);
    nanosleep(&tick, NULL);
    size_t resident = mallinfo2().uordblks;
    es_host_shutdown(host, NULL); /* frees the actors, keeps the store */
    size_t after = mallinfo2().uordblks;
    es_store_close(store);
    /* the user's state: state_size bytes in a malloc chunk of at least 32 */
    double state_bytes = 32;
    double per = ((double)resident - (double)after) / (double)n - state_bytes;
    record rec = {"resident_memory", 2, 1, n, 0, 0, 0, peak_rss_kb(), per};
    fprintf(stderr, "  resident_memory %llu aggregates: %.0f bytes each "
            "(heap in use %.0f MiB with the store, %.0f MiB before)\n",
            (unsigned long long)n, per, (double)resident / 1048576.0,
            (double)before / 1048576.0);
    return rec;
}

static void write_json(const char *path, const record *r, size_t n)
{
    bench_json j;
    if (bench_json_open(&j, path) != 0) {
        perror(path);
        exit(1);
    }
    for (size_t i = 0; i < n; i++) {
        bench_json_begin(&j, r[i].name, "memory");
        bench_json_field(&j, "workers", "%u", r[i].workers);
        bench_json_field(&j, "clients", "%u", r[i].clients);
        bench_json_field(&j, "keys", "%llu", (unsigned long long)r[i].keys);
        bench_json_field(&j, "ops_per_s", "%.0f", r[i].ops_per_s);
        bench_json_field(&j, "p50_us", "%.1f", r[i].p50_us);
        bench_json_field(&j, "p99_us", "%.1f", r[i].p99_us);
        bench_json_field(&j, "peak_rss_kb", "%ld", r[i].peak_rss_kb);
        if (r[i].bytes_per_aggregate >= 0)
            bench_json_field(&j, "bytes_per_aggregate", "%.0f",
                             r[i].bytes_per_aggregate);
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
    double secs = quick ? 0.2 : 1.0;
    record recs[32];
    size_t n = 0;
    const uint64_t keyset[2] = {10000, 1000000};
    const unsigned clientset[3] = {1, 64, 1024};
    for (int k = 0; k < 2; k++) {
        recs[n++] = direct_point(keyset[k], secs);
        for (int c = 0; c < 3; c++)
            recs[n++] = host_point(2, clientset[c], keyset[k], secs, false);
    }
    /* The parts: the runtime alone (null store), and 4 workers. */
    recs[n++] = host_point(2, 64, keyset[0], secs, true);
    recs[n++] = host_point(2, 1, keyset[0], secs, true);
    recs[n++] = host_point(4, 64, keyset[0], secs, false);
    recs[n++] = resident_point(quick ? 100000 : 1000000);
    write_json(argv[1], recs, n);
    return 0;
}
