/*
 * The bank's domain: accounts and transfers, their events, commands, side
 * effects and command handlers, shared by bank-server and its tests.
 *
 * Money is int64 cents.  Balances never go negative; amounts are positive;
 * sums that would overflow are rejected, never wrapped.
 *
 * A transfer is a saga through the outbox: the debit on the source account
 * commits with a side effect "credit the destination"; its handler records
 * the transfer, credits the destination with a command id derived from the
 * transfer id, and on rejection refunds the source, each step idempotent,
 * so at-least-once delivery moves the money exactly once.
 */
#ifndef BANK_H
#define BANK_H

#include <stdbool.h>

#include "eventastic.h"
#include "eventastic/host.h"
#include "eventastic/outbox.h"

#define BANK_NAME_MAX 128

/* ---- the account aggregate ---- */

typedef struct bank_account {
    char owner[BANK_NAME_MAX];
    char email[BANK_NAME_MAX];
    int64_t balance;
} bank_account;

typedef enum bank_account_event_kind {
    BANK_OPENED = 1,
    BANK_DEPOSITED = 2,
    BANK_WITHDRAWN = 3,
    BANK_TRANSFER_DEBITED = 4,
    BANK_TRANSFER_CREDITED = 5,
    BANK_TRANSFER_REFUNDED = 6,
} bank_account_event_kind;

typedef struct bank_account_event {
    bank_account_event_kind kind;
    es_uuid id;
    int64_t amount;              /* initial balance for BANK_OPENED */
    int64_t balance;             /* the balance after this event */
    es_uuid transfer_id;         /* transfer events */
    es_uuid other;               /* the other account of a transfer */
    char owner[BANK_NAME_MAX];   /* BANK_OPENED */
    char email[BANK_NAME_MAX];   /* BANK_OPENED */
} bank_account_event;

typedef enum bank_effect_kind {
    BANK_FX_WELCOME_EMAIL = 1,   /* log an e-mail to the new owner */
    BANK_FX_CREDIT = 2,          /* credit the destination of a transfer */
} bank_effect_kind;

typedef struct bank_effect {
    bank_effect_kind kind;
    es_uuid id;
    es_uuid account_id;          /* the account that produced it */
    es_uuid transfer_id;
    es_uuid to;
    int64_t amount;
    char email[BANK_NAME_MAX];
} bank_effect;

extern const es_aggregate_type bank_account_type;

/* ---- the transfer aggregate (status of a transfer) ---- */

typedef enum bank_transfer_status {
    BANK_TS_PENDING = 0,
    BANK_TS_COMPLETED = 1,
    BANK_TS_REFUNDED = 2,
} bank_transfer_status;

typedef struct bank_transfer {
    es_uuid from, to;
    int64_t amount;
    bank_transfer_status status;
} bank_transfer;

typedef enum bank_transfer_event_kind {
    BANK_TRANSFER_INITIATED = 1,
    BANK_TRANSFER_COMPLETED_EV = 2,
    BANK_TRANSFER_REFUNDED_EV = 3,
} bank_transfer_event_kind;

typedef struct bank_transfer_event {
    bank_transfer_event_kind kind;
    es_uuid id;
    es_uuid from, to;
    int64_t amount;
} bank_transfer_event;

extern const es_aggregate_type bank_transfer_type;

/* ---- commands ---- */

typedef enum bank_command_kind {
    BANK_CMD_OPEN = 1,
    BANK_CMD_DEPOSIT = 2,
    BANK_CMD_WITHDRAW = 3,
    BANK_CMD_DEBIT = 4,       /* start a transfer on the source */
    BANK_CMD_CREDIT = 5,      /* transfer step on the destination */
    BANK_CMD_REFUND = 6,      /* transfer step back on the source */
    BANK_CMD_INITIATE = 7,    /* transfer aggregate */
    BANK_CMD_COMPLETE = 8,    /* transfer aggregate */
    BANK_CMD_MARK_REFUNDED = 9, /* transfer aggregate */
} bank_command_kind;

/* The fields a command uses; the rest stay zero.  Encoded
 * deterministically, so that a resent command compares equal. */
typedef struct bank_command {
    bank_command_kind kind;
    int64_t amount;
    es_uuid transfer_id;
    es_uuid other;
    char owner[BANK_NAME_MAX];
    char email[BANK_NAME_MAX];
} bank_command;

/* Reasons a command is rejected with (es_host_result.reason). */
#define BANK_REJECT_NOT_FOUND "not_found"
#define BANK_REJECT_EXISTS "already_exists"
#define BANK_REJECT_INSUFFICIENT "insufficient_funds"
#define BANK_REJECT_OVERFLOW "overflow"
#define BANK_REJECT_INVALID "invalid"

/* Encode a command into buf (appended).  Returns 0 or ES_ENOMEM. */
int bank_command_encode(const bank_command *cmd, es_buf *buf);
/* Decode; ES_EDECODE on bad bytes. */
int bank_command_decode(const uint8_t *p, size_t len, bank_command *cmd);

/* The command handlers, for es_host_config_add_type. */
int bank_account_decide(void *user, const void *state,
                        const es_command *command, es_emitter *em);
int bank_transfer_decide(void *user, const void *state,
                         const es_command *command, es_emitter *em);

/* A stable id derived from another id and a label (name-based: the same
 * inputs give the same id), for the saga's command ids. */
es_uuid bank_derive_id(const es_uuid *base, const char *label);

/* Register both aggregate types with their handlers. */
int bank_register(es_host_config *cfg, es_error *err);

/* Send a command and wait for the outcome (es_host_call). */
int bank_call(es_host *host, const es_aggregate_type *type,
              const es_uuid *key, const es_uuid *command_id,
              const bank_command *cmd, es_host_reply **reply, es_error *err);

/* The outbox handler of the account type's side effects: ud is the
 * es_host.  Welcome e-mails are logged; credits run the transfer saga. */
es_outbox_verdict bank_effect_handler(void *ud, const es_outbox_entry *entry,
                                      const void *side_effect,
                                      es_error *reason);

#endif
