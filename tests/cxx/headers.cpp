// Every public header compiles as C++17 (extern "C", no C-only constructs),
// and the typed facade works from C++.
#include <cstdio>
#include <cstring>

#include "eventastic.h"
#include "eventastic/aggregate.h"
#include "eventastic/common.h"
#include "eventastic/context.h"
#include "eventastic/log.h"
#include "eventastic/memory.h"
#include "eventastic/outbox.h"
#include "eventastic/status.h"
#include "eventastic/store.h"
#include "eventastic/typed.h"
#include "eventastic/uuid.h"

struct counter {
    long value;
};
struct counter_event {
    es_uuid id;
    long delta;
};
struct counter_note {
    es_uuid id;
};

static es_uuid ev_id(const void *e) { return static_cast<const counter_event *>(e)->id; }
static int32_t ev_kind(const void *) { return 1; }
static int apply_new(void *s, const void *e, es_error *)
{
    static_cast<counter *>(s)->value = static_cast<const counter_event *>(e)->delta;
    return 0;
}
static int apply(void *s, const void *e, es_error *)
{
    static_cast<counter *>(s)->value += static_cast<const counter_event *>(e)->delta;
    return 0;
}
static int enc_state(const void *s, es_buf *out, es_error *)
{
    return es_buf_append(out, s, sizeof(counter));
}
static int dec_state(const uint8_t *p, size_t n, void *s, es_error *)
{
    if (n != sizeof(counter)) return ES_EDECODE;
    std::memcpy(s, p, n);
    return 0;
}
static int enc_event(const void *e, es_buf *out, es_error *)
{
    return es_buf_append(out, e, sizeof(counter_event));
}
static int dec_event(int32_t, const uint8_t *p, size_t n, void *e, es_error *)
{
    if (n != sizeof(counter_event)) return ES_EDECODE;
    std::memcpy(e, p, n);
    return 0;
}

static es_aggregate_type make_type()
{
    es_aggregate_type t{};
    t.name = "cxx_counter";
    t.snapshot_version = 1;
    t.state_size = sizeof(counter);
    t.event_size = sizeof(counter_event);
    t.event_id = ev_id;
    t.event_kind = ev_kind;
    t.apply_new = apply_new;
    t.apply = apply;
    t.state_encode = enc_state;
    t.state_decode = dec_state;
    t.event_encode = enc_event;
    t.event_decode = dec_event;
    return t;
}
static const es_aggregate_type counter_type = make_type();

ES_AGGREGATE_DECLARE(counter, counter_type, counter, counter_event,
                     counter_note);

int main()
{
    es_error err{};
    es_store *store = nullptr;
    es_uuid id, e1, e2;
    if (es_memory_store_open(&store, &err) != 0 || es_uuid_v7(&id) != 0 ||
        es_uuid_v7(&e1) != 0 || es_uuid_v7(&e2) != 0)
        return 1;
    counter_event open{e1, 40}, add{e2, 2};
    counter_context *ctx = nullptr;
    es_txn *txn = nullptr;
    int rc = counter_record_new(&id, &open, &ctx, &err);
    if (rc == 0) rc = counter_record(ctx, &add, &err);
    if (rc == 0) rc = es_store_begin(store, &txn, &err);
    if (rc == 0) rc = counter_save(txn, ctx, &err);
    if (rc == 0) rc = es_txn_commit(txn, &err);
    counter_context_free(ctx);
    counter_context *loaded = nullptr;
    if (rc == 0) rc = counter_store_load(store, &id, &loaded, &err);
    long value = rc == 0 ? counter_state(loaded)->value : -1;
    counter_context_free(loaded);
    es_store_close(store);
    std::printf("C++ facade: value %ld (%s) [  PASSED  ] 1 test(s).\n", value,
                es_status_name(rc));
    return value == 42 ? 0 : 1;
}
