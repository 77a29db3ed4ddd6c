/*
 * libFuzzer target: the event, snapshot (state) and side-effect codecs of
 * every aggregate type that reads stored bytes: the bank's account and
 * transfer, the test fixtures' account, order and counter.
 *
 * Input: byte 0 picks the type, byte 1 the codec, bytes 2-5 the kind
 * (little endian), the rest is the payload.  A decode must either fail
 * with ES_EDECODE or succeed; what succeeds must encode again, and that
 * encoding must decode and encode to the same bytes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../examples/bank/bank.h"
#include "eventastic.h"
#include "fixtures/account.h"
#include "fixtures/counter.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const es_aggregate_type *const types[] = {
    &bank_account_type, &bank_transfer_type, &account_type, &order_type,
    &counter_type,
};

typedef int (*decode_fn)(const es_aggregate_type *t, int32_t kind,
                         const uint8_t *p, size_t n, void *out,
                         es_error *err);
typedef int (*encode_fn)(const es_aggregate_type *t, const void *v,
                         es_buf *out, es_error *err);

static int dec_state(const es_aggregate_type *t, int32_t kind,
                     const uint8_t *p, size_t n, void *out, es_error *err)
{
    (void)kind;
    return t->state_decode(p, n, out, err);
}

static int dec_event(const es_aggregate_type *t, int32_t kind,
                     const uint8_t *p, size_t n, void *out, es_error *err)
{
    return t->event_decode(kind, p, n, out, err);
}

static int dec_effect(const es_aggregate_type *t, int32_t kind,
                      const uint8_t *p, size_t n, void *out, es_error *err)
{
    return t->side_effect_decode(kind, p, n, out, err);
}

static int enc_state(const es_aggregate_type *t, const void *v, es_buf *out,
                     es_error *err)
{
    return t->state_encode(v, out, err);
}

static int enc_event(const es_aggregate_type *t, const void *v, es_buf *out,
                     es_error *err)
{
    return t->event_encode(v, out, err);
}

static int enc_effect(const es_aggregate_type *t, const void *v, es_buf *out,
                      es_error *err)
{
    return t->side_effect_encode(v, out, err);
}

static void release(const es_aggregate_type *t, int which, void *v)
{
    void (*f)(void *) = which == 0   ? t->state_free
                        : which == 1 ? t->event_free
                                     : t->side_effect_free;
    if (f) f(v);
}

static int32_t kind_of(const es_aggregate_type *t, int which, const void *v)
{
    return which == 1 ? t->event_kind(v)
           : which == 2 ? t->side_effect_kind(v)
                        : 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 6) return 0;
    const es_aggregate_type *t = types[data[0] % (sizeof types /
                                                  sizeof types[0])];
    int which = data[1] % 3;
    int32_t kind;
    uint32_t k = (uint32_t)data[2] | (uint32_t)data[3] << 8 |
                 (uint32_t)data[4] << 16 | (uint32_t)data[5] << 24;
    memcpy(&kind, &k, sizeof kind);
    decode_fn dec = which == 0 ? dec_state : which == 1 ? dec_event
                                                        : dec_effect;
    encode_fn enc = which == 0 ? enc_state : which == 1 ? enc_event
                                                        : enc_effect;
    size_t vsize = which == 0 ? t->state_size : which == 1 ? t->event_size
                                                           : t->side_effect_size;
    if (vsize == 0 || (which == 2 && t->side_effect_decode == NULL)) return 0;
    void *v = calloc(1, vsize), *w = calloc(1, vsize);
    es_error err = {0};
    es_buf a = {0}, b = {0};
    int rc = dec(t, kind, data + 6, size - 6, v, &err);
    if (rc != 0 && rc != ES_EDECODE) abort();
    if (rc == 0) {
        if (enc(t, v, &a, &err) != 0) abort();
        if (dec(t, kind_of(t, which, v), a.data, a.len, w, &err) != 0)
            abort();
        if (enc(t, w, &b, &err) != 0) abort();
        if (a.len != b.len || (a.len && memcmp(a.data, b.data, a.len) != 0))
            abort();
        release(t, which, w);
    }
    release(t, which, v);
    es_buf_free(&a);
    es_buf_free(&b);
    free(v);
    free(w);
    return 0;
}
