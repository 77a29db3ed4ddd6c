/*
 * The bank's domain on the in-memory store, through the host: the decide
 * rules (no negative balance, positive amounts, overflow rejected and not
 * wrapped, unknown and existing accounts), the command codec, command
 * idempotency, and the transfer saga (completed, refunded, and every step
 * idempotent under redelivery).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "../../examples/bank/bank.h"

typedef struct fixture {
    es_store *store;
    es_host *host;
    es_outbox *outbox;
} fixture;

static int setup(void **state)
{
    static fixture f;
    memset(&f, 0, sizeof f);
    es_error err = {0};
    es_host_config *cfg = NULL;
    es_outbox_config *ocfg = NULL;
    int rc = es_memory_store_open(&f.store, &err);
    if (rc == 0) rc = es_host_config_new(&cfg, &err);
    if (rc == 0) rc = es_host_config_set_workers(cfg, 2);
    if (rc == 0) rc = bank_register(cfg, &err);
    if (rc == 0) rc = es_host_open(cfg, f.store, &f.host, &err);
    es_host_config_free(cfg);
    if (rc == 0) rc = es_outbox_config_new(f.store, &ocfg, &err);
    if (rc == 0)
        rc = es_outbox_config_add_handler(ocfg, &bank_account_type,
                                          ES_OUTBOX_ANY_KIND,
                                          bank_effect_handler, f.host, &err);
    /* Not started: the tests deliver with es_outbox_run_once. */
    if (rc == 0) rc = es_outbox_open(ocfg, false, &f.outbox, &err);
    es_outbox_config_free(ocfg);
    if (rc != 0) {
        fprintf(stderr, "setup: %s: %s\n", es_status_name(rc), err.message);
        return -1;
    }
    *state = &f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    es_outbox_close(f->outbox);
    int rc = es_host_close(f->host);
    if (es_store_close(f->store) != 0) rc = -1;
    return rc == 0 ? 0 : -1;
}

/* The outcome of one account command: status, reason, balance after. */
typedef struct outcome {
    int status;
    bool duplicate;
    uint64_t version;
    int64_t balance;
    char reason[256];
} outcome;

static outcome call(fixture *f, const es_aggregate_type *type,
                    const es_uuid *key, const es_uuid *cid,
                    const bank_command *c)
{
    outcome o;
    memset(&o, 0, sizeof o);
    o.balance = -1;
    es_host_reply *reply = NULL;
    es_error err = {0};
    o.status = bank_call(f->host, type, key, cid, c, &reply, &err);
    if (reply != NULL) {
        o.duplicate = reply->duplicate;
        o.version = reply->version;
        snprintf(o.reason, sizeof o.reason, "%s", reply->reason);
        if (type == &bank_account_type && reply->n_events > 0) {
            bank_account_event e;
            if (es_event_decode(&bank_account_type,
                                &reply->events[reply->n_events - 1], &e,
                                &err) == 0)
                o.balance = e.balance;
        }
    }
    es_host_reply_free(reply);
    return o;
}

static es_uuid new_id(void)
{
    es_uuid id;
    assert_int_equal(es_uuid_v7(&id), 0);
    return id;
}

static outcome account_cmd(fixture *f, const es_uuid *account,
                           bank_command_kind kind, int64_t amount)
{
    bank_command c;
    memset(&c, 0, sizeof c);
    c.kind = kind;
    c.amount = amount;
    if (kind == BANK_CMD_OPEN) {
        snprintf(c.owner, sizeof c.owner, "Ada");
        snprintf(c.email, sizeof c.email, "ada@example.com");
    }
    es_uuid cid = new_id();
    return call(f, &bank_account_type, account, &cid, &c);
}

static es_uuid open_account(fixture *f, int64_t balance)
{
    es_uuid id = new_id();
    outcome o = account_cmd(f, &id, BANK_CMD_OPEN, balance);
    assert_int_equal(o.status, 0);
    assert_int_equal(o.balance, balance);
    return id;
}

static int64_t balance_of(fixture *f, const es_uuid *id)
{
    es_context *ctx = NULL;
    assert_int_equal(es_store_load(f->store, &bank_account_type, id, &ctx,
                                   NULL),
                     0);
    int64_t b = ((const bank_account *)es_context_state(ctx))->balance;
    es_context_free(ctx);
    return b;
}

static bank_transfer_status transfer_status(fixture *f, const es_uuid *id)
{
    es_context *ctx = NULL;
    assert_int_equal(es_store_load(f->store, &bank_transfer_type, id, &ctx,
                                   NULL),
                     0);
    bank_transfer_status s =
        ((const bank_transfer *)es_context_state(ctx))->status;
    es_context_free(ctx);
    return s;
}

static void expect_reject(outcome o, const char *reason)
{
    assert_int_equal(o.status, ES_EREJECTED);
    assert_string_equal(o.reason, reason);
}

static void test_bank_open_deposit_withdraw(void **state)
{
    fixture *f = *state;
    es_uuid a = open_account(f, 100);
    outcome o = account_cmd(f, &a, BANK_CMD_DEPOSIT, 50);
    assert_int_equal(o.status, 0);
    assert_int_equal(o.balance, 150);
    assert_int_equal(o.version, 1);
    o = account_cmd(f, &a, BANK_CMD_WITHDRAW, 150);
    assert_int_equal(o.status, 0);
    assert_int_equal(o.balance, 0);
    assert_int_equal(balance_of(f, &a), 0);
    /* A zero initial balance is allowed. */
    open_account(f, 0);
}

static void test_bank_no_negative_balance(void **state)
{
    fixture *f = *state;
    es_uuid a = open_account(f, 10);
    expect_reject(account_cmd(f, &a, BANK_CMD_WITHDRAW, 11),
                  BANK_REJECT_INSUFFICIENT);
    expect_reject(account_cmd(f, &a, BANK_CMD_DEBIT, 11),
                  BANK_REJECT_INSUFFICIENT);
    assert_int_equal(balance_of(f, &a), 10);
}

static void test_bank_amounts_positive(void **state)
{
    fixture *f = *state;
    es_uuid a = open_account(f, 10);
    bank_command_kind kinds[] = {BANK_CMD_DEPOSIT, BANK_CMD_WITHDRAW,
                                 BANK_CMD_DEBIT, BANK_CMD_CREDIT,
                                 BANK_CMD_REFUND};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        expect_reject(account_cmd(f, &a, kinds[i], 0), BANK_REJECT_INVALID);
        expect_reject(account_cmd(f, &a, kinds[i], -1), BANK_REJECT_INVALID);
        expect_reject(account_cmd(f, &a, kinds[i], INT64_MIN),
                      BANK_REJECT_INVALID);
    }
    es_uuid b = new_id();
    expect_reject(account_cmd(f, &b, BANK_CMD_OPEN, -1), BANK_REJECT_INVALID);
    assert_int_equal(balance_of(f, &a), 10);
}

static void test_bank_overflow_rejected(void **state)
{
    fixture *f = *state;
    es_uuid a = open_account(f, INT64_MAX - 10);
    expect_reject(account_cmd(f, &a, BANK_CMD_DEPOSIT, 11),
                  BANK_REJECT_OVERFLOW);
    expect_reject(account_cmd(f, &a, BANK_CMD_CREDIT, INT64_MAX),
                  BANK_REJECT_OVERFLOW);
    expect_reject(account_cmd(f, &a, BANK_CMD_REFUND, 11),
                  BANK_REJECT_OVERFLOW);
    assert_int_equal(balance_of(f, &a), INT64_MAX - 10);
    outcome o = account_cmd(f, &a, BANK_CMD_DEPOSIT, 10);
    assert_int_equal(o.status, 0);
    assert_int_equal(o.balance, INT64_MAX);
    expect_reject(account_cmd(f, &a, BANK_CMD_DEPOSIT, 1),
                  BANK_REJECT_OVERFLOW);
    assert_int_equal(balance_of(f, &a), INT64_MAX);
}

static void test_bank_unknown_and_existing(void **state)
{
    fixture *f = *state;
    es_uuid ghost = new_id();
    expect_reject(account_cmd(f, &ghost, BANK_CMD_DEPOSIT, 1),
                  BANK_REJECT_NOT_FOUND);
    expect_reject(account_cmd(f, &ghost, BANK_CMD_WITHDRAW, 1),
                  BANK_REJECT_NOT_FOUND);
    expect_reject(account_cmd(f, &ghost, BANK_CMD_CREDIT, 1),
                  BANK_REJECT_NOT_FOUND);
    es_uuid a = open_account(f, 1);
    expect_reject(account_cmd(f, &a, BANK_CMD_OPEN, 5), BANK_REJECT_EXISTS);
    /* A transfer command sent to an account is refused. */
    expect_reject(account_cmd(f, &a, BANK_CMD_COMPLETE, 0),
                  BANK_REJECT_INVALID);
    assert_int_equal(balance_of(f, &a), 1);
}

static void test_bank_command_codec(void **state)
{
    (void)state;
    bank_command c, d;
    memset(&c, 0, sizeof c);
    c.kind = BANK_CMD_DEBIT;
    c.amount = INT64_MAX;
    c.transfer_id = new_id();
    c.other = new_id();
    snprintf(c.owner, sizeof c.owner, "Grace");
    snprintf(c.email, sizeof c.email, "grace@example.com");
    es_buf a = {0}, b = {0};
    assert_int_equal(bank_command_encode(&c, &a), 0);
    assert_int_equal(bank_command_encode(&c, &b), 0);
    /* Deterministic: a resent command compares equal. */
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.data, b.data, a.len);
    assert_int_equal(bank_command_decode(a.data, a.len, &d), 0);
    assert_int_equal(d.kind, c.kind);
    assert_int_equal(d.amount, c.amount);
    assert_true(es_uuid_equal(&d.transfer_id, &c.transfer_id));
    assert_true(es_uuid_equal(&d.other, &c.other));
    assert_string_equal(d.owner, "Grace");
    assert_string_equal(d.email, "grace@example.com");
    /* Every truncation is refused, never read past. */
    for (size_t n = 0; n < a.len; n++)
        assert_int_equal(bank_command_decode(a.data, n, &d), ES_EDECODE);
    es_buf_free(&a);
    es_buf_free(&b);
}

static void test_bank_derive_id(void **state)
{
    (void)state;
    es_uuid t = new_id(), t2 = new_id();
    es_uuid x = bank_derive_id(&t, "credit"), y = bank_derive_id(&t, "credit");
    assert_true(es_uuid_equal(&x, &y));
    es_uuid z = bank_derive_id(&t, "refund");
    assert_false(es_uuid_equal(&x, &z));
    es_uuid w = bank_derive_id(&t2, "credit");
    assert_false(es_uuid_equal(&x, &w));
}

static void test_bank_command_idempotent(void **state)
{
    fixture *f = *state;
    es_uuid a = open_account(f, 100);
    bank_command c;
    memset(&c, 0, sizeof c);
    c.kind = BANK_CMD_WITHDRAW;
    c.amount = 30;
    es_uuid cid = new_id();
    outcome o1 = call(f, &bank_account_type, &a, &cid, &c);
    outcome o2 = call(f, &bank_account_type, &a, &cid, &c);
    assert_int_equal(o1.status, 0);
    assert_int_equal(o2.status, 0);
    assert_false(o1.duplicate);
    assert_true(o2.duplicate);
    assert_int_equal(o2.version, o1.version);
    assert_int_equal(o2.balance, 70);
    assert_int_equal(balance_of(f, &a), 70);
    c.amount = 31;
    assert_int_equal(call(f, &bank_account_type, &a, &cid, &c).status,
                     ES_EIDEMPOTENCY);
    assert_int_equal(balance_of(f, &a), 70);
}

/* Start a transfer as bank-server does: the debit on the source. */
static es_uuid debit(fixture *f, const es_uuid *from, const es_uuid *to,
                     int64_t amount)
{
    es_uuid tid = new_id();
    bank_command c;
    memset(&c, 0, sizeof c);
    c.kind = BANK_CMD_DEBIT;
    c.amount = amount;
    c.transfer_id = tid;
    c.other = *to;
    es_uuid cid = bank_derive_id(&tid, "debit");
    assert_int_equal(call(f, &bank_account_type, from, &cid, &c).status, 0);
    return tid;
}

static void deliver_all(fixture *f)
{
    for (int i = 0; i < 100; i++) {
        size_t n = 0;
        es_error err = {0};
        int rc = es_outbox_run_once(f->outbox, &n, &err);
        if (rc != 0) fail_msg("run_once: %s: %s", es_status_name(rc),
                              err.message);
        if (n == 0) return;
    }
    fail_msg("the outbox never emptied");
}

/* Deliver the credit side effect once more, as at-least-once delivery
 * may. */
static es_outbox_verdict redeliver(fixture *f, const es_uuid *from,
                                   const es_uuid *tid, const es_uuid *to,
                                   int64_t amount)
{
    es_outbox_entry e;
    memset(&e, 0, sizeof e);
    e.side_effect.id = new_id();
    e.side_effect.aggregate_id = *from;
    e.side_effect.kind = BANK_FX_CREDIT;
    bank_effect fx;
    memset(&fx, 0, sizeof fx);
    fx.kind = BANK_FX_CREDIT;
    fx.id = e.side_effect.id;
    fx.account_id = *from;
    fx.transfer_id = *tid;
    fx.to = *to;
    fx.amount = amount;
    es_error reason = {0};
    return bank_effect_handler(f->host, &e, &fx, &reason);
}

static void test_bank_saga_completed(void **state)
{
    fixture *f = *state;
    es_uuid a = open_account(f, 100), b = open_account(f, 5);
    es_uuid tid = debit(f, &a, &b, 40);
    assert_int_equal(balance_of(f, &a), 60);
    deliver_all(f);
    assert_int_equal(transfer_status(f, &tid), BANK_TS_COMPLETED);
    assert_int_equal(balance_of(f, &a), 60);
    assert_int_equal(balance_of(f, &b), 45);
    for (int i = 0; i < 3; i++)
        assert_int_equal(redeliver(f, &a, &tid, &b, 40),
                         ES_OUTBOX_VERDICT_DONE);
    assert_int_equal(balance_of(f, &a), 60);
    assert_int_equal(balance_of(f, &b), 45);
    assert_int_equal(transfer_status(f, &tid), BANK_TS_COMPLETED);
}

static void test_bank_saga_refunded(void **state)
{
    fixture *f = *state;
    es_uuid a = open_account(f, 100), ghost = new_id();
    es_uuid tid = debit(f, &a, &ghost, 70);
    assert_int_equal(balance_of(f, &a), 30);
    deliver_all(f);
    assert_int_equal(transfer_status(f, &tid), BANK_TS_REFUNDED);
    assert_int_equal(balance_of(f, &a), 100);
    for (int i = 0; i < 3; i++)
        assert_int_equal(redeliver(f, &a, &tid, &ghost, 70),
                         ES_OUTBOX_VERDICT_DONE);
    assert_int_equal(balance_of(f, &a), 100);
    assert_int_equal(transfer_status(f, &tid), BANK_TS_REFUNDED);
}

static void test_bank_saga_overflow_refunded(void **state)
{
    fixture *f = *state;
    es_uuid a = open_account(f, 100), rich = open_account(f, INT64_MAX);
    es_uuid tid = debit(f, &a, &rich, 1);
    deliver_all(f);
    assert_int_equal(transfer_status(f, &tid), BANK_TS_REFUNDED);
    assert_int_equal(balance_of(f, &a), 100);
    assert_int_equal(balance_of(f, &rich), INT64_MAX);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bank_open_deposit_withdraw),
        cmocka_unit_test(test_bank_no_negative_balance),
        cmocka_unit_test(test_bank_amounts_positive),
        cmocka_unit_test(test_bank_overflow_rejected),
        cmocka_unit_test(test_bank_unknown_and_existing),
        cmocka_unit_test(test_bank_command_codec),
        cmocka_unit_test(test_bank_derive_id),
        cmocka_unit_test(test_bank_command_idempotent),
        cmocka_unit_test(test_bank_saga_completed),
        cmocka_unit_test(test_bank_saga_refunded),
        cmocka_unit_test(test_bank_saga_overflow_refunded),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
