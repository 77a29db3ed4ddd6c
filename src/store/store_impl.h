/*
 * The backend interface behind es_store and es_txn.  Each backend embeds
 * struct es_store / struct es_txn as its first member and fills an
 * es_store_ops table.  The core (context.c) decides idempotency and
 * concurrency; a backend only inserts, skips conflicts and says what it
 * inserted.  Never installed.
 */
#ifndef ES_STORE_IMPL_H
#define ES_STORE_IMPL_H

#include <stdatomic.h>
#include <stdbool.h>

#include "eventastic/store.h"

typedef struct es_store_ops {
    const char *name;
    int (*begin)(es_store *store, es_txn **out, es_error *err);
    int (*commit)(es_txn *txn, es_error *err);
    void (*rollback)(es_txn *txn);
    /* A stack of savepoints: push, roll back to the newest (and pop it),
     * release the newest. */
    int (*savepoint)(es_txn *txn, es_error *err);
    int (*rollback_to)(es_txn *txn, es_error *err);
    int (*release)(es_txn *txn, es_error *err);
    int (*stream)(es_txn *txn, const es_uuid *aggregate_id,
                  uint64_t from_version,
                  int (*fn)(void *ud, const es_event *event), void *ud,
                  es_error *err);
    /* aggregate_id NULL: find the event id under any aggregate; the owner
     * goes to *owner (may be NULL).  *out: one allocation, es__free. */
    int (*get_event)(es_txn *txn, const es_uuid *aggregate_id,
                     const es_uuid *event_id, es_event **out, es_uuid *owner,
                     es_error *err);
    /* Insert events, skipping any whose event id or (aggregate, version)
     * exists; inserted[i] says which went in. */
    int (*insert_events)(es_txn *txn, const char *type_name,
                         const es_uuid *aggregate_id, const es_event *events,
                         size_t n, bool *inserted, es_error *err);
    /* Insert side effects, skipping ids that exist (never reset one). */
    int (*insert_side_effects)(es_txn *txn, const es_side_effect *items,
                               size_t n, es_error *err);
    int (*get_snapshot)(es_txn *txn, const es_uuid *aggregate_id,
                        uint64_t snapshot_version, es_snapshot **out,
                        es_error *err);
    int (*store_snapshot)(es_txn *txn, const es_snapshot *snap,
                          es_error *err);
    int (*delete_snapshots)(es_txn *txn, const es_uuid *aggregate_id,
                            es_error *err);
    int (*list_side_effects)(es_txn *txn, const es_uuid *aggregate_id,
                             es_side_effect_list **out, es_error *err);
    /* Free the backend; called when no transaction is open. */
    void (*close)(es_store *store);
} es_store_ops;

struct es_store {
    const es_store_ops *ops;
    atomic_long open_txns;
    atomic_bool closing;
};

struct es_txn {
    es_store *store;
};

/* Called by backends from begin and when a transaction ends. */
void es__store_txn_started(es_store *store);
void es__store_txn_ended(es_store *store);

/* Savepoint helpers used by the core. */
int es__txn_savepoint(es_txn *txn, es_error *err);
int es__txn_rollback_to(es_txn *txn, es_error *err);
int es__txn_release(es_txn *txn, es_error *err);
int es__txn_get_event_any(es_txn *txn, const es_uuid *event_id,
                          es_event **out, es_uuid *owner, es_error *err);
int es__txn_insert_events(es_txn *txn, const char *type_name,
                          const es_uuid *aggregate_id, const es_event *events,
                          size_t n, bool *inserted, es_error *err);
int es__txn_insert_side_effects(es_txn *txn, const es_side_effect *items,
                                size_t n, es_error *err);

/* One allocation holding an event and a copy of its payload. */
es_event *es__event_dup(const es_event *ev);
/* Same for a snapshot. */
es_snapshot *es__snapshot_dup(const es_snapshot *snap);
/* Append a copy of a side effect to a list (payload copied). */
int es__side_effect_list_push(es_side_effect_list *list, size_t *cap,
                              const es_side_effect *se);

#endif
