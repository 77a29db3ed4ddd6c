/*
 * The README's host example: a bank account served by the aggregate host.
 * Commands are decided one at a time per account, their events committed
 * in batches; a retried command id is answered with its original outcome.
 */
#include <stdio.h>
#include <string.h>

#include "eventastic.h"

/* The state and the events. */
typedef struct account {
    int64_t balance;
} account;

typedef enum account_event_kind {
    ACCOUNT_DEPOSITED = 1,
    ACCOUNT_WITHDRAWN = 2,
} account_event_kind;

typedef struct account_event {
    account_event_kind kind;
    es_uuid id;
    int64_t amount;
} account_event;

static es_uuid event_id(const void *e)
{
    return ((const account_event *)e)->id;
}
static int32_t event_kind(const void *e)
{
    return (int32_t)((const account_event *)e)->kind;
}

static int apply(void *state, const void *event, es_error *err)
{
    (void)err;
    const account_event *e = event;
    account *a = state;
    switch (e->kind) {
    case ACCOUNT_DEPOSITED:
        a->balance += e->amount;
        return 0;
    case ACCOUNT_WITHDRAWN:
        a->balance -= e->amount;
        return 0;
    }
    return ES_EAPPLY;
}

/* The first event is applied to a zeroed state, like any other. */
static int apply_new(void *state, const void *event, es_error *err)
{
    return apply(state, event, err);
}

static int put_i64(es_buf *out, int64_t v)
{
    uint8_t b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)v >> (8 * i));
    return es_buf_append(out, b, 8);
}

static int64_t get_i64(const uint8_t *p)
{
    uint64_t u = 0;
    for (int i = 0; i < 8; i++) u |= (uint64_t)p[i] << (8 * i);
    return (int64_t)u;
}

static int state_encode(const void *s, es_buf *out, es_error *err)
{
    (void)err;
    return put_i64(out, ((const account *)s)->balance);
}

static int state_decode(const uint8_t *p, size_t len, void *s, es_error *err)
{
    (void)err;
    if (len != 8) return ES_EDECODE;
    ((account *)s)->balance = get_i64(p);
    return 0;
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
    (void)err;
    account_event *ev = e;
    if ((kind != ACCOUNT_DEPOSITED && kind != ACCOUNT_WITHDRAWN) || len != 24)
        return ES_EDECODE;
    ev->kind = (account_event_kind)kind;
    memcpy(ev->id.bytes, p, 16);
    ev->amount = get_i64(p + 16);
    return 0;
}

static const es_aggregate_type account_type = {
    .name = "account",
    .snapshot_version = 1,
    .state_size = sizeof(account),
    .event_size = sizeof(account_event),
    .event_id = event_id,
    .event_kind = event_kind,
    .apply_new = apply_new,
    .apply = apply,
    .state_encode = state_encode,
    .state_decode = state_decode,
    .event_encode = event_encode,
    .event_decode = event_decode,
};

/* Commands: the kind says what, the payload is the amount (8 bytes). */
enum { DEPOSIT = 1, WITHDRAW = 2 };

/* decide: state is NULL before the account's first event. */
static int decide(void *user, const void *state, const es_command *cmd,
                  es_emitter *em)
{
    (void)user;
    const account *a = state;
    if (cmd->len != 8) return es_emit_reject(em, "amount missing");
    int64_t amount = get_i64(cmd->payload);
    if (amount <= 0) return es_emit_reject(em, "amount must be positive");
    account_event e = {ACCOUNT_DEPOSITED, {{0}}, amount};
    es_uuid_v7(&e.id);
    switch (cmd->kind) {
    case DEPOSIT:
        return es_emit(em, &e);
    case WITHDRAW:
        if (a == NULL || a->balance < amount)
            return es_emit_reject(em, "insufficient funds: %lld",
                                  (long long)(a ? a->balance : 0));
        e.kind = ACCOUNT_WITHDRAWN;
        return es_emit(em, &e);
    }
    return es_emit_reject(em, "unknown command %d", (int)cmd->kind);
}

static es_command command(int32_t kind, const uint8_t amount[8])
{
    es_command c = {{{0}}, kind, amount, 8};
    es_uuid_v7(&c.id);
    return c;
}

/* Completion of an asynchronous send: runs on a worker thread. */
static void deposited(void *ud, const es_host_result *r)
{
    (void)ud;
    printf("async deposit: %s, version %llu\n", es_status_name(r->status),
           (unsigned long long)r->version);
}

int main(void)
{
    es_error err = {0};
    es_store *store = NULL;
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    int rc;
    if ((rc = es_memory_store_open(&store, &err)) != 0 ||
        (rc = es_host_config_new(&cfg, &err)) != 0 ||
        (rc = es_host_config_add_type(cfg, &account_type, decide, NULL,
                                      &err)) != 0 ||
        (rc = es_host_open(cfg, store, &host, &err)) != 0) {
        fprintf(stderr, "setup: %s: %s\n", es_status_name(rc), err.message);
        return 1;
    }
    es_host_config_free(cfg);

    es_uuid id;
    es_uuid_v7(&id);
    uint8_t hundred[8] = {100}, thirty[8] = {30}, five_hundred[8];
    memset(five_hundred, 0, 8);
    five_hundred[0] = 500 & 0xff;
    five_hundred[1] = 500 >> 8;

    /* Blocking calls: the reply holds the outcome and the events. */
    es_command deposit = command(DEPOSIT, hundred);
    es_host_reply *reply = NULL;
    rc = es_host_call(host, &account_type, &id, &deposit, &reply, &err);
    printf("deposit 100: %s, version %llu\n", es_status_name(rc),
           (unsigned long long)reply->version);
    es_host_reply_free(reply);

    es_command withdraw = command(WITHDRAW, five_hundred);
    rc = es_host_call(host, &account_type, &id, &withdraw, &reply, &err);
    printf("withdraw 500: %s (%s)\n", es_status_name(rc), reply->reason);
    es_host_reply_free(reply);

    /* The same command id again: the original outcome, nothing new. */
    rc = es_host_call(host, &account_type, &id, &deposit, &reply, &err);
    printf("deposit 100 again: %s, duplicate %d, version %llu\n",
           es_status_name(rc), reply->duplicate,
           (unsigned long long)reply->version);
    es_host_reply_free(reply);

    /* Asynchronous: the callback runs on a worker. */
    es_command more = command(DEPOSIT, thirty);
    rc = es_host_send(host, &account_type, &id, &more, deposited, NULL, &err);
    if (rc != 0) fprintf(stderr, "send: %s\n", err.message);

    es_host_metrics m;
    es_host_metrics_get(host, &m);
    /* Graceful: decides what is queued, waits for commits, snapshots. */
    if ((rc = es_host_shutdown(host, &err)) != 0)
        fprintf(stderr, "shutdown: %s\n", err.message);

    es_context *ctx = NULL;
    if ((rc = es_store_load(store, &account_type, &id, &ctx, &err)) != 0) {
        fprintf(stderr, "load: %s\n", err.message);
        return 1;
    }
    int64_t balance = ((const account *)es_context_state(ctx))->balance;
    printf("balance %lld at version %llu; %llu commands accepted\n",
           (long long)balance,
           (unsigned long long)es_context_version(ctx),
           (unsigned long long)m.accepted);
    int ok = balance == 130 && es_context_version(ctx) == 1;
    es_context_free(ctx);
    es_store_close(store);
    return ok ? 0 : 1;
}
