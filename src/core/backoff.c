/*
 * Waiting out a database that cannot be reached: the "unreachable"
 * predicate and the jittered backoff (see backoff.h).  No state of its
 * own: any thread.
 */
#include "core/backoff.h"

#include <string.h>

bool es__unreachable(const es_error *err)
{
    return strncmp(err->sqlstate, "08", 2) == 0 ||
           strncmp(err->sqlstate, "57P0", 4) == 0;
}

uint64_t es__random_next(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return x;
}

unsigned es__backoff_grow(unsigned delay_ms, unsigned min_ms, unsigned max_ms)
{
    if (delay_ms == 0) return min_ms;
    return delay_ms > max_ms / 2 ? max_ms : delay_ms * 2;
}

unsigned es__backoff_jitter(uint64_t *rng, unsigned ms)
{
    unsigned half = ms / 2;
    return half + (unsigned)(es__random_next(rng) % (ms - half + 1u));
}
