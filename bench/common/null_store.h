/*
 * A store used only by the benchmarks: it accepts every batch and keeps
 * nothing, so a benchmark of the host on it measures the host's runtime
 * alone (bench_host's host_null).  Every aggregate reads as new.
 */
#ifndef BENCH_NULL_STORE_H
#define BENCH_NULL_STORE_H

#include "eventastic.h"

/* *out: a new null store (es_store_close).  0 or ES_ENOMEM. */
int bench_null_store_open(es_store **out);

#endif
