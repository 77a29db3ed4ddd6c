/* Latency histograms: see metrics.h. */
#include <time.h>

#include "host/metrics.h"

static unsigned bucket_of(uint64_t v)
{
    if (v < 64) return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v); /* >= 6 */
    unsigned m = (unsigned)(v >> (e - 5));          /* 32..63 */
    return (e - 4) * 32 + (m - 32);
}

static uint64_t bucket_low(unsigned idx)
{
    if (idx < 64) return idx;
    unsigned e = idx / 32 + 4, m = 32 + idx % 32;
    return (uint64_t)m << (e - 5);
}

void es__hist_record(es__hist *h, uint64_t ns)
{
    atomic_fetch_add_explicit(&h->bucket[bucket_of(ns)], 1,
                              memory_order_relaxed);
    uint64_t max = atomic_load_explicit(&h->max_ns, memory_order_relaxed);
    while (ns > max &&
           !atomic_compare_exchange_weak_explicit(&h->max_ns, &max, ns,
                                                  memory_order_relaxed,
                                                  memory_order_relaxed)) {
    }
}

void es__hist_reset(es__hist *h)
{
    for (unsigned i = 0; i < ES__HIST_BUCKETS; i++)
        atomic_store_explicit(&h->bucket[i], 0, memory_order_relaxed);
    atomic_store_explicit(&h->max_ns, 0, memory_order_relaxed);
}

void es__hist_read(es__hist *h, es_host_latency *out)
{
    uint64_t total = 0;
    for (unsigned i = 0; i < ES__HIST_BUCKETS; i++)
        total += atomic_load_explicit(&h->bucket[i], memory_order_relaxed);
    out->count = total;
    out->max_us =
        (double)atomic_load_explicit(&h->max_ns, memory_order_relaxed) / 1e3;
    const double q[3] = {0.50, 0.99, 0.999};
    double *dst[3] = {&out->p50_us, &out->p99_us, &out->p999_us};
    for (int k = 0; k < 3; k++) {
        *dst[k] = 0;
        if (total == 0) continue;
        uint64_t target = (uint64_t)(q[k] * (double)total);
        if (target == 0) target = 1;
        uint64_t seen = 0;
        for (unsigned i = 0; i < ES__HIST_BUCKETS; i++) {
            seen += atomic_load_explicit(&h->bucket[i], memory_order_relaxed);
            if (seen >= target) {
                /* middle of the bucket */
                uint64_t lo = bucket_low(i);
                uint64_t hi = i + 1 < ES__HIST_BUCKETS ? bucket_low(i + 1) : lo;
                *dst[k] = ((double)lo + (double)(hi - lo) / 2) / 1e3;
                break;
            }
        }
    }
}

