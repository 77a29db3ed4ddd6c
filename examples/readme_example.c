/*
 * The example of docs/guide.md: define an aggregate type, give it a typed
 * facade, record events, save them in a transaction, load the aggregate back.
 */
#include <stdio.h>
#include <string.h>

#include "eventastic.h"

/* The state, the events and the side effects of a bank account. */
typedef struct account {
    int64_t balance;
} account;

typedef enum account_event_kind {
    ACCOUNT_OPENED = 1,
    ACCOUNT_DEPOSITED = 2,
} account_event_kind;

typedef struct account_event {
    account_event_kind kind;
    es_uuid id;
    int64_t amount;
} account_event;

typedef struct account_notice { /* a side effect: tell the owner */
    es_uuid id;
    int64_t amount;
} account_notice;

static es_uuid event_id(const void *e) { return ((const account_event *)e)->id; }
static int32_t event_kind(const void *e)
{
    return (int32_t)((const account_event *)e)->kind;
}

static int apply_new(void *state, const void *event, es_error *err)
{
    const account_event *e = event;
    switch (e->kind) {
    case ACCOUNT_OPENED:
        ((account *)state)->balance = e->amount;
        return 0;
    case ACCOUNT_DEPOSITED:
        break;
    }
    snprintf(err->message, sizeof err->message, "first event must open");
    return ES_EAPPLY;
}

static int apply(void *state, const void *event, es_error *err)
{
    const account_event *e = event;
    switch (e->kind) { /* -Wswitch-enum: a forgotten kind does not build */
    case ACCOUNT_OPENED:
        snprintf(err->message, sizeof err->message, "already open");
        return ES_EAPPLY;
    case ACCOUNT_DEPOSITED:
        ((account *)state)->balance += e->amount;
        return 0;
    }
    return ES_EAPPLY;
}

static int side_effects(const void *state, const void *event,
                        es_side_effect_sink *sink, es_error *err)
{
    (void)state;
    (void)err;
    const account_event *e = event;
    account_notice n = {e->id, e->amount};
    return es_side_effect_emit(sink, &n);
}

/* Codecs: fixed little-endian layouts keep them deterministic. */
static int put_i64(es_buf *out, int64_t v)
{
    uint8_t b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)v >> (8 * i));
    return es_buf_append(out, b, 8);
}

static int get_i64(const uint8_t *p, size_t len, int64_t *v)
{
    if (len != 8) return ES_EDECODE;
    uint64_t u = 0;
    for (int i = 0; i < 8; i++) u |= (uint64_t)p[i] << (8 * i);
    *v = (int64_t)u;
    return 0;
}

static int state_encode(const void *s, es_buf *out, es_error *err)
{
    (void)err;
    return put_i64(out, ((const account *)s)->balance);
}

static int state_decode(const uint8_t *p, size_t len, void *s, es_error *err)
{
    (void)err;
    return get_i64(p, len, &((account *)s)->balance);
}

static int event_encode(const void *e, es_buf *out, es_error *err)
{
    (void)err;
    const account_event *ev = e;
    int rc = es_buf_append(out, ev->id.bytes, 16);
    return rc ? rc : put_i64(out, ev->amount);
}

static int event_decode(int32_t kind, const uint8_t *p, size_t len, void *e,
                        es_error *err)
{
    account_event *ev = e;
    if (kind != ACCOUNT_OPENED && kind != ACCOUNT_DEPOSITED) {
        snprintf(err->message, sizeof err->message, "unknown kind %d",
                 (int)kind);
        return ES_EDECODE;
    }
    if (len != 24) return ES_EDECODE;
    ev->kind = (account_event_kind)kind;
    memcpy(ev->id.bytes, p, 16);
    return get_i64(p + 16, 8, &ev->amount);
}

static es_uuid notice_id(const void *n)
{
    es_uuid id = ((const account_notice *)n)->id;
    id.bytes[15] ^= 0x5a; /* stable, and distinct from the event id */
    return id;
}
static int32_t notice_kind(const void *n)
{
    (void)n;
    return 1;
}
static int notice_encode(const void *n, es_buf *out, es_error *err)
{
    (void)err;
    return put_i64(out, ((const account_notice *)n)->amount);
}
static int notice_decode(int32_t kind, const uint8_t *p, size_t len, void *n,
                         es_error *err)
{
    (void)kind;
    (void)err;
    return get_i64(p, len, &((account_notice *)n)->amount);
}

static const es_aggregate_type account_type = {
    .name = "account",
    .snapshot_version = 1,
    .state_size = sizeof(account),
    .event_size = sizeof(account_event),
    .side_effect_size = sizeof(account_notice),
    .event_id = event_id,
    .event_kind = event_kind,
    .apply_new = apply_new,
    .apply = apply,
    .side_effects = side_effects,
    .state_encode = state_encode,
    .state_decode = state_decode,
    .event_encode = event_encode,
    .event_decode = event_decode,
    .side_effect_id = notice_id,
    .side_effect_kind = notice_kind,
    .side_effect_encode = notice_encode,
    .side_effect_decode = notice_decode,
};

/* The typed facade: account_record() takes only account_event, and
 * account_state() returns only const account *. */
ES_AGGREGATE_DECLARE(account, account_type, account, account_event,
                     account_notice);

static int fail(const char *what, int rc, const es_error *err)
{
    fprintf(stderr, "%s: %s: %s\n", what, es_status_name(rc), err->message);
    return 1;
}

int main(void)
{
    es_error err = {0};
    es_store *store = NULL;
    int rc = es_memory_store_open(&store, &err);
    if (rc != 0) return fail("open", rc, &err);

    es_uuid id;
    es_uuid_v7(&id);
    account_event opened = {ACCOUNT_OPENED, {{0}}, 100};
    account_event deposited = {ACCOUNT_DEPOSITED, {{0}}, 50};
    es_uuid_v7(&opened.id);
    es_uuid_v7(&deposited.id);

    account_context *ctx = NULL;
    es_txn *txn = NULL;
    if ((rc = account_record_new(&id, &opened, &ctx, &err)) != 0 ||
        (rc = account_record(ctx, &deposited, &err)) != 0 ||
        (rc = account_record(ctx, &deposited, &err)) != 0 || /* a no-op */
        (rc = es_store_begin(store, &txn, &err)) != 0 ||
        (rc = account_save(txn, ctx, &err)) != 0 ||
        (rc = es_txn_commit(txn, &err)) != 0)
        return fail("save", rc, &err);
    account_context_free(ctx);

    account_context *loaded = NULL;
    if ((rc = account_store_load(store, &id, &loaded, &err)) != 0)
        return fail("load", rc, &err);
    char text[ES_UUID_STRLEN + 1];
    printf("account %s: balance %lld at version %llu\n",
           es_uuid_format(&id, text),
           (long long)account_state(loaded)->balance,
           (unsigned long long)account_version(loaded));
    int ok = account_state(loaded)->balance == 150 &&
             account_version(loaded) == 1;
    account_context_free(loaded);
    es_store_close(store);
    return ok ? 0 : 1;
}
