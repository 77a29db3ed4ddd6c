/*
 * Closed-loop clients of the host for the benchmarks: each keeps one
 * deposit (bench_deposit_decide, 1 cent) in flight to a random account
 * and sends the next from the completion of the previous.
 */
#ifndef BENCH_LOAD_H
#define BENCH_LOAD_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "eventastic.h"

typedef struct bench_client bench_client;

typedef struct bench_load {
    es_host *host;
    uint64_t keys, base;      /* accounts bench_key_of(base .. base+keys) */
    bool timed;               /* latencies to bench_lat_record */
    atomic_bool stop;
    atomic_bool measuring;    /* done and latencies count while set */
    atomic_uint_least64_t done;      /* committed while measuring */
    atomic_uint_least64_t committed; /* committed since the start (timed) */
    atomic_uint_least64_t errors;    /* failed commands or sends */
    atomic_uint_least64_t by_status[32]; /* failed commands, by -status */
    atomic_int live;
    bench_client *clients;
    unsigned n_clients;
} bench_load;

/* Start n clients on host (measuring at once); l is the caller's and must
 * stay put until bench_load_stop returns. */
void bench_load_start(bench_load *l, es_host *host, uint64_t keys,
                      uint64_t base, unsigned n, bool timed);
/* Stop sending and wait until every client's last command completed. */
void bench_load_stop(bench_load *l);
/* Print the failed commands by status to stderr, after what (if any). */
void bench_load_report(const bench_load *l, const char *what);

/* Sleep for s seconds. */
void bench_sleep_s(double s);

#endif
