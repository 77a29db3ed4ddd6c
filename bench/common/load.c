/* Closed-loop clients of the host for the benchmarks (see load.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench.h"
#include "fixtures/deposit.h"
#include "load.h"
#include "measure.h"

struct bench_client {
    bench_load *l;
    uint64_t seed;
    double t0;
    uint8_t amount[8];
};

static void send_next(bench_client *c);

static void client_done(void *ud, const es_host_result *res)
{
    bench_client *c = ud;
    bench_load *l = c->l;
    if (res->status == 0) {
        /* untimed (bench_host): one shared counter a command, no clock */
        if (l->timed)
            atomic_fetch_add_explicit(&l->committed, 1,
                                      memory_order_relaxed);
        if (atomic_load_explicit(&l->measuring, memory_order_relaxed)) {
            atomic_fetch_add_explicit(&l->done, 1, memory_order_relaxed);
            if (l->timed) bench_lat_record(c->t0);
        }
    } else {
        atomic_fetch_add(&l->errors, 1);
        atomic_fetch_add(&l->by_status[(unsigned)-res->status & 31], 1);
    }
    send_next(c);
}

static void send_next(bench_client *c)
{
    bench_load *l = c->l;
    if (atomic_load_explicit(&l->stop, memory_order_relaxed)) {
        atomic_fetch_sub(&l->live, 1);
        return;
    }
    es_uuid key = bench_key_of(l->base + bench_rnd(&c->seed) % l->keys);
    es_command cmd = {bench_make_id(), 1, c->amount, 8};
    if (l->timed) c->t0 = bench_now_s();
    int rc;
    while ((rc = es_host_send(l->host, &deposit_type, &key, &cmd,
                              client_done, c, NULL)) == ES_EBUSY) {
    }
    if (rc != 0) {
        atomic_fetch_add(&l->errors, 1);
        atomic_fetch_sub(&l->live, 1);
    }
}

void bench_load_start(bench_load *l, es_host *host, uint64_t keys,
                      uint64_t base, unsigned n, bool timed)
{
    memset(l, 0, sizeof *l);
    l->host = host;
    l->keys = keys;
    l->base = base;
    l->timed = timed;
    l->clients = calloc(n, sizeof *l->clients);
    if (l->clients == NULL) abort();
    l->n_clients = n;
    atomic_store(&l->measuring, true);
    atomic_store(&l->live, (int)n);
    for (unsigned i = 0; i < n; i++) {
        l->clients[i].l = l;
        l->clients[i].seed = 0x9e3779b97f4a7c15u * (i + 1);
        fixture_put64(l->clients[i].amount, 1);
        send_next(&l->clients[i]);
    }
}

void bench_load_stop(bench_load *l)
{
    atomic_store(&l->stop, true);
    struct timespec tick = {0, 5000000};
    while (atomic_load(&l->live) > 0) nanosleep(&tick, NULL);
    free(l->clients);
    l->clients = NULL;
}

void bench_load_report(const bench_load *l, const char *what)
{
    for (int i = 0; i < 32; i++) {
        uint64_t n = atomic_load(&l->by_status[i]);
        if (n > 0)
            fprintf(stderr, "  %s: %llu commands failed with %s\n", what,
                    (unsigned long long)n, es_status_name(-i));
    }
}

void bench_sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}
