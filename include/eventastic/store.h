/**
 * @file store.h
 * @brief the repository interface shared by every store, and
 * transactions.
 *
 * Every write happens inside a transaction: es_store_begin, then
 * es_context_save (eventastic/context.h) as often as needed, then
 * es_txn_commit or es_txn_rollback.  A store is opened by its backend
 * (eventastic/memory.h, eventastic/postgres.h) and used through these
 * functions whatever the backend.
 *
 * Threads: a store may be used from any number of threads at once; one
 * transaction belongs to one thread at a time.
 */
#ifndef EVENTASTIC_STORE_H
#define EVENTASTIC_STORE_H

#include <stdbool.h>

#include "aggregate.h"
#include "common.h"
#include "status.h"
#include "uuid.h"

#ifdef __cplusplus
extern "C" {
#endif

/** A store (opaque).  Opened by a backend, closed with es_store_close. */
typedef struct es_store es_store;
/** A transaction on a store (opaque). */
typedef struct es_txn es_txn;

/**
 * A snapshot as stored: the encoded state of an aggregate at a version.
 */
typedef struct es_snapshot {
    es_uuid aggregate_id;      /**< the aggregate */
    uint64_t version;          /**< version of the last event folded in */
    uint64_t snapshot_version; /**< the type's snapshot_version */
    const uint8_t *data;       /**< encoded state */
    size_t len;                /**< its length in bytes */
} es_snapshot;

/** A list of side effects owned by the caller; free with
 *  es_side_effect_list_free. */
typedef struct es_side_effect_list {
    size_t count;          /**< number of items */
    es_side_effect *items; /**< the side effects, oldest first */
} es_side_effect_list;

/** Free a list and everything it holds.  NULL is a no-op.  Thread: any. */
ES_EXPORT ES_ANY_THREAD void es_side_effect_list_free(
    es_side_effect_list *list);

/**
 * Begin a transaction (READ COMMITTED where the backend has levels).
 * On success *out is a new transaction that must be ended with
 * es_txn_commit or es_txn_rollback.  Errors: ES_EINVAL (NULL argument),
 * ES_ENOMEM, ES_ECLOSED (store closing), ES_EDB (backend).
 * Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_store_begin(es_store *store, es_txn **out,
                                           es_error *err);

/**
 * Commit and free the transaction, whatever the outcome.
 * Returns 0 when everything written in it is durable and visible; on
 * ES_ECONFLICT (a concurrent transaction took a version or an event id
 * first), ES_EDB or ES_ENOMEM nothing of it was committed; ES_EUNKNOWN when
 * the connection was lost during COMMIT and the outcome could not be read
 * back.  NULL gives ES_EINVAL.  Thread: the transaction's thread.
 */
ES_EXPORT ES_OWNER_THREAD int es_txn_commit(es_txn *txn, es_error *err);

/**
 * Roll back and free the transaction: nothing written in it stays.
 * NULL is a no-op.  Thread: the transaction's thread.
 */
ES_EXPORT ES_OWNER_THREAD void es_txn_rollback(es_txn *txn);

/**
 * Call fn for each event of an aggregate with version >= from_version, in
 * version order, as the transaction sees them, whatever the aggregate's
 * type: for tools that print rows.  Code that decodes the events uses
 * es_txn_stream_of, which checks the type.  The event is borrowed until
 * fn returns.  fn returns 0 to go on; any other value stops the stream and
 * is returned as is.  Memory use is bounded by the backend's chunk size,
 * not by the stream.  Errors: ES_EINVAL (NULL argument, nil id), ES_EDB,
 * ES_EDECRYPT, ES_EFORGOTTEN.  An aggregate without events is not an
 * error (fn is never called).
 * Thread: the transaction's thread; fn runs on it.
 */
ES_EXPORT ES_OWNER_THREAD int es_txn_stream(
    es_txn *txn, const es_uuid *aggregate_id, uint64_t from_version,
    int (*fn)(void *ud, const es_event *event), void *ud, es_error *err);

/**
 * es_txn_stream for an aggregate of a known type.  An aggregate stored
 * under another type (its creation event names another type name)
 * answers ES_EWRONGTYPE, with the aggregate id in err, before fn sees any
 * of its events: one type's bytes are never handed over as another's.
 * Otherwise as es_txn_stream; ES_EINVAL also for a type that fails
 * es_aggregate_type_check.  Thread: the transaction's thread; fn runs on
 * it.
 */
ES_EXPORT ES_OWNER_THREAD int es_txn_stream_of(
    es_txn *txn, const es_aggregate_type *type, const es_uuid *aggregate_id,
    uint64_t from_version, int (*fn)(void *ud, const es_event *event),
    void *ud, es_error *err);

/**
 * Read one event of an aggregate by its id.  On success *out is one
 * allocation holding the event and its payload; free it with es_free.
 * Errors: ES_ENOTFOUND, ES_EINVAL (NULL argument, nil id), ES_ENOMEM,
 * ES_EDB.  Thread: the transaction's thread.
 */
ES_EXPORT ES_OWNER_THREAD int es_txn_get_event(es_txn *txn,
                                               const es_uuid *aggregate_id,
                                               const es_uuid *event_id,
                                               es_event **out,
                                               es_error *err);

/**
 * Read the snapshot of an aggregate for one snapshot version, whatever the
 * aggregate's type (for tools; code that decodes it uses
 * es_txn_get_snapshot_of).  *out is one allocation (free with es_free).
 * Errors: ES_ENOTFOUND, ES_EINVAL (NULL argument, nil id), ES_ENOMEM,
 * ES_EDB.  Thread: the transaction's thread.
 */
ES_EXPORT ES_OWNER_THREAD int es_txn_get_snapshot(
    es_txn *txn, const es_uuid *aggregate_id, uint64_t snapshot_version,
    es_snapshot **out, es_error *err);

/**
 * Read the snapshot of an aggregate of a known type, for the type's
 * snapshot_version.  An aggregate stored under another type answers
 * ES_EWRONGTYPE (aggregate id in err) and returns no bytes.  A snapshot
 * of an aggregate without events is returned as stored.  *out is one
 * allocation (free with es_free), NULL on failure.  Errors: as
 * es_txn_get_snapshot, and ES_EINVAL for a type that fails
 * es_aggregate_type_check.  Thread: the transaction's thread.
 */
ES_EXPORT ES_OWNER_THREAD int es_txn_get_snapshot_of(
    es_txn *txn, const es_aggregate_type *type, const es_uuid *aggregate_id,
    es_snapshot **out, es_error *err);

/**
 * Store a snapshot (upsert keyed by aggregate and snapshot version).  A
 * snapshot older than the stored one for the same key is ignored, so a late
 * writer never moves it backwards.  The snapshot is copied.  Errors:
 * ES_EINVAL, ES_ENOMEM, ES_EDB.  Thread: the transaction's thread.
 */
ES_EXPORT ES_OWNER_THREAD int es_txn_store_snapshot(es_txn *txn,
                                                    const es_snapshot *snap,
                                                    es_error *err);

/**
 * Delete every snapshot of an aggregate (all snapshot versions).  Missing
 * snapshots are not an error.  ES_EINVAL for a NULL argument or a nil
 * id.  Thread: the transaction's thread.
 */
ES_EXPORT ES_OWNER_THREAD int es_txn_delete_snapshots(
    es_txn *txn, const es_uuid *aggregate_id, es_error *err);

/**
 * List the side effects stored and not yet delivered, oldest first, as the
 * transaction sees them (aggregate_id NULL: of every aggregate).  *out is
 * the caller's (es_side_effect_list_free).  Errors: ES_EINVAL (NULL
 * txn or out, nil aggregate id), ES_ENOMEM, ES_EDB.  Thread: the transaction's thread.
 */
ES_EXPORT ES_OWNER_THREAD int es_txn_list_side_effects(
    es_txn *txn, const es_uuid *aggregate_id, es_side_effect_list **out,
    es_error *err);

/**
 * Retention of the host's command-id records: delete those written before
 * @p before_ms (Unix ms).  A command whose record is gone is no longer
 * recognised when it is sent again: a replay after that is decided again
 * as a new command (it may be applied twice).  So keep records at least as
 * long as any client may retry.  Deletes in batches of 1,000 records, each
 * in a short transaction of its own, so commands are never held up for
 * long.  *count (may be NULL) is how many went.  A store that keeps no
 * records does nothing.  Errors: ES_EINVAL (NULL store), ES_ECLOSED,
 * store errors (*count then says how many went before).  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_store_purge_commands(es_store *store,
                                                    int64_t before_ms,
                                                    size_t *count,
                                                    es_error *err);

/**
 * Close the store and free it.  Every transaction must have ended; a store
 * with open transactions is not closed and ES_EMISUSE is returned.  NULL is
 * a no-op returning 0.  Thread: any, once no other thread uses the store.
 */
ES_EXPORT ES_ANY_THREAD int es_store_close(es_store *store);

#ifdef __cplusplus
}
#endif
#endif
