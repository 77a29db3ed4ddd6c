/* Helpers shared by the bench binaries (see bench.h). */
#include "bench.h"

#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "fixtures/deposit.h"

uint64_t bench_id_prefix = 0x42;

static atomic_uint_least64_t next_id = 1;

es_uuid bench_make_id(void)
{
    uint64_t n = atomic_fetch_add_explicit(&next_id, 1, memory_order_relaxed);
    es_uuid id;
    fixture_put64(id.bytes, bench_id_prefix);
    fixture_put64(id.bytes + 8, n);
    return id;
}

int bench_deposit_decide(void *user, const void *state, const es_command *cmd,
                         es_emitter *em)
{
    (void)user;
    (void)state;
    deposit d = {bench_make_id(), (int64_t)fixture_get64(cmd->payload)};
    return es_emit(em, &d);
}

es_uuid bench_key_of(uint64_t i)
{
    es_uuid id;
    memset(&id, 0, sizeof id);
    fixture_put64(id.bytes, i + 1);
    id.bytes[15] = 0x7e;
    return id;
}

double bench_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

uint64_t bench_rnd(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}
