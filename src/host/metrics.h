/*
 * Latency histograms for the host: log-linear buckets (32 per power of
 * two, about 3% wide) of nanoseconds, counted with relaxed atomics so any
 * thread records without a lock.  Never installed.
 */
#ifndef ES_HOST_METRICS_H
#define ES_HOST_METRICS_H

#include <stdatomic.h>
#include <stdint.h>

#include "eventastic/host.h"

#define ES__HIST_BUCKETS 1920

typedef struct es__hist {
    atomic_uint_least64_t bucket[ES__HIST_BUCKETS];
    atomic_uint_least64_t max_ns;
} es__hist;

/* Record one value in nanoseconds.  Thread: any. */
void es__hist_record(es__hist *h, uint64_t ns);

/* Empty it.  Thread: any (a value recorded meanwhile may be lost). */
void es__hist_reset(es__hist *h);

/* Count and percentiles.  Thread: any (a consistent-enough view). */
void es__hist_read(es__hist *h, es_host_latency *out);


#endif
