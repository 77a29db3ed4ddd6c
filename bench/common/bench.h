/*
 * What every bench binary needs besides its aggregate (the deposit
 * account of tests/fixtures/deposit.h): ids, keys, the deposit command
 * handler, a clock and a random generator.
 */
#ifndef BENCH_BENCH_H
#define BENCH_BENCH_H

#include <stdint.h>

#include "eventastic.h"

/* The first 8 bytes of every id bench_make_id returns (a bench that runs
 * against a database that keeps earlier runs' ids sets a per-run value
 * before it starts). */
extern uint64_t bench_id_prefix;

/* A fresh event or command id: the prefix, then a counter (cheaper than
 * UUIDv7, and enough for a benchmark).  Any thread. */
es_uuid bench_make_id(void);

/* The host's decide for deposit_type: the command's payload is an
 * 8-byte amount, deposited. */
int bench_deposit_decide(void *user, const void *state, const es_command *cmd,
                         es_emitter *em);

/* The key of account number i. */
es_uuid bench_key_of(uint64_t i);

/* Seconds on the monotonic clock. */
double bench_now_s(void);

/* xorshift64: the next value of *state (never 0 when *state is not 0). */
uint64_t bench_rnd(uint64_t *state);

#endif
