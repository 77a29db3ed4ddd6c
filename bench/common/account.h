/*
 * The benchmarks' aggregate: an account whose only event is a deposit,
 * with fixed little-endian codecs.  Shared by every bench binary.
 */
#ifndef BENCH_ACCOUNT_H
#define BENCH_ACCOUNT_H

#include "eventastic.h"

typedef struct account {
    int64_t balance;
} account;

typedef struct deposit {
    es_uuid id;
    int64_t amount;
} deposit;

extern const es_aggregate_type account_type;

void put64(uint8_t *p, uint64_t v);
uint64_t get64(const uint8_t *p);

#endif
