/*
 * Waiting out a database that cannot be reached: which errors mean it
 * (es__unreachable) and how long to wait before the next try (capped
 * exponential backoff with jitter).  One generator for every jitter of
 * the library.  Never installed.
 *
 * Threads: pure functions; a generator state belongs to its caller, who
 * guards it as it guards the rest of its state.
 */
#ifndef ES_CORE_BACKOFF_H
#define ES_CORE_BACKOFF_H

#include <stdbool.h>
#include <stdint.h>

#include "eventastic/status.h"

/* True when err says the database could not be reached: the connection
 * broke or could not be made (SQLSTATE class 08) or the server ended the
 * session (57P0x: a restart, a terminated backend).  Nothing is wrong
 * with the request: it is worth another try, on a fresh connection. */
bool es__unreachable(const es_error *err);

/* Next value of a xorshift64 generator; *state must not start at 0. */
uint64_t es__random_next(uint64_t *state);

/* The next delay of a doubling backoff: min_ms after 0 (no wait yet),
 * else twice delay_ms, never more than max_ms. */
unsigned es__backoff_grow(unsigned delay_ms, unsigned min_ms, unsigned max_ms);

/* A jittered wait for a delay of ms: between half and all of it, drawn
 * from *rng, so that waiters cut off together do not come back
 * together. */
unsigned es__backoff_jitter(uint64_t *rng, unsigned ms);

#endif
