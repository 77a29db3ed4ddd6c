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

/*
 * A command-id record: which command of the host produced which events.
 * Written in the same transaction as the events, so a command id survives
 * passivation and restarts.  The content (kind and payload bytes) is kept
 * so that a later command with the same id can be compared byte for byte.
 * event_count 0 means "accepted, no events"; version is then the
 * aggregate's version at the time (UINT64_MAX before its first event).
 */
typedef struct es__command_record {
    es_uuid command_id;
    es_uuid aggregate_id;
    int32_t kind;
    const uint8_t *payload; /* content, compared byte for byte */
    size_t len;
    uint64_t first_version; /* version of its first event */
    uint64_t event_count;
    uint64_t version; /* resulting version */
} es__command_record;

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
    /* Command-id records (the host's idempotency).  Optional: a backend
     * may leave both NULL, and the host then remembers command ids only
     * while they are in flight.  insert_commands skips ids that exist
     * (ON CONFLICT DO NOTHING) and says which went in; get_command finds a
     * record by command id alone (*out: one allocation, es__free;
     * ES_ENOTFOUND when unknown). */
    int (*insert_commands)(es_txn *txn, const es__command_record *recs,
                           size_t n, bool *inserted, es_error *err);
    int (*get_command)(es_txn *txn, const es_uuid *command_id,
                       es__command_record **out, es_error *err);
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

/* Command-id records; ES_EINVAL when the backend has none (see
 * es__store_has_commands). */
bool es__store_has_commands(const es_store *store);
int es__txn_insert_commands(es_txn *txn, const es__command_record *recs,
                            size_t n, bool *inserted, es_error *err);
int es__txn_get_command(es_txn *txn, const es_uuid *command_id,
                        es__command_record **out, es_error *err);
/* One allocation holding a command record and its payload. */
es__command_record *es__command_record_dup(const es__command_record *rec);

/* One allocation holding an event and a copy of its payload. */
es_event *es__event_dup(const es_event *ev);
/* Same for a snapshot. */
es_snapshot *es__snapshot_dup(const es_snapshot *snap);
/* Append a copy of a side effect to a list (payload copied). */
int es__side_effect_list_push(es_side_effect_list *list, size_t *cap,
                              const es_side_effect *se);

#endif
