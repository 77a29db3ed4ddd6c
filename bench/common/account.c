/* The benchmarks' aggregate (see account.h). */
#include "account.h"

#include <string.h>

static es_uuid ev_id(const void *e) { return ((const deposit *)e)->id; }
static int32_t ev_kind(const void *e)
{
    (void)e;
    return 1;
}

static int apply(void *s, const void *e, es_error *err)
{
    (void)err;
    ((account *)s)->balance += ((const deposit *)e)->amount;
    return 0;
}

void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static int state_encode(const void *s, es_buf *out, es_error *err)
{
    (void)err;
    uint8_t b[8];
    put64(b, (uint64_t)((const account *)s)->balance);
    return es_buf_append(out, b, 8);
}

static int state_decode(const uint8_t *p, size_t len, void *s, es_error *err)
{
    (void)err;
    if (len != 8) return ES_EDECODE;
    ((account *)s)->balance = (int64_t)get64(p);
    return 0;
}

static int event_encode(const void *e, es_buf *out, es_error *err)
{
    (void)err;
    uint8_t b[24];
    memcpy(b, ((const deposit *)e)->id.bytes, 16);
    put64(b + 16, (uint64_t)((const deposit *)e)->amount);
    return es_buf_append(out, b, 24);
}

static int event_decode(int32_t kind, const uint8_t *p, size_t len, void *e,
                        es_error *err)
{
    (void)err;
    if (kind != 1 || len != 24) return ES_EDECODE;
    memcpy(((deposit *)e)->id.bytes, p, 16);
    ((deposit *)e)->amount = (int64_t)get64(p + 16);
    return 0;
}

const es_aggregate_type account_type = {
    .name = "account",
    .snapshot_version = 1,
    .state_size = sizeof(account),
    .event_size = sizeof(deposit),
    .event_id = ev_id,
    .event_kind = ev_kind,
    .apply_new = apply,
    .apply = apply,
    .state_encode = state_encode,
    .state_decode = state_decode,
    .event_encode = event_encode,
    .event_decode = event_decode,
};

