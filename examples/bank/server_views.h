/*
 * The read model's private header, between server_views.c (the
 * projection "bank.views", the model in memory, the routes) and
 * server_views_pg.c (the same model in PostgreSQL tables).
 */
#ifndef BANK_SERVER_VIEWS_H
#define BANK_SERVER_VIEWS_H

#include "eventastic/subscription.h"
#include "server.h"

typedef enum mv_kind {
    MV_OPENED,
    MV_DEPOSIT,
    MV_WITHDRAWAL,
    MV_TRANSFER_OUT,
    MV_TRANSFER_IN,
    MV_REFUND,
} mv_kind;

/* The kinds' names in the answers and in bank_statement.kind. */
extern const char *const srv_mv_names[6];
/* The kinds that carry transfer_id and other. */
bool srv_mv_transfer(mv_kind kind);

/* One line of a statement. */
typedef struct movement {
    uint64_t version;
    int64_t amount, balance, at_ms;
    es_uuid transfer_id, other; /* transfer kinds */
    mv_kind kind;
} movement;

/* What one event changes. */
typedef struct change {
    es_position pos;
    es_uuid account;
    int64_t accounts, balance; /* deltas of the totals */
    bool row;                  /* m is a movement of account */
    movement m;
} change;

/* Fill err (when not NULL) and return code. */
int srv_views_fail(es_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- server_views_pg.c: the projection's side (its thread) ---- */

/* Make the tables when missing, and their rows. */
int srv_pg_views_create(es_store *store, es_error *err);
/* Write the changes after the stored position, in txn (the batch's):
 * one INSERT of the statement rows, one UPDATE of the totals. */
int srv_pg_views_flush(es_txn *txn, const change *ch, size_t n,
                       es_error *err);
/* Empty the tables, in txn. */
int srv_pg_views_reset(es_txn *txn, es_error *err);

/* ---- server_views_pg.c: reads (reader threads) ---- */

/* The totals (accounts, total_balance, events): 0, or j holds the
 * answer (503, 500). */
int srv_pg_stats(job *j, int64_t out[3]);
/* j->id's movements, newest first, up to j->limit: 0, or j holds the
 * answer. */
int srv_pg_statement(job *j, movement *out, int *n);

#endif
