/**
 * @file context.h
 * @brief the context: one aggregate's state, its version,
 * and the events and side effects recorded but not yet saved.
 *
 * record_new / record apply an event at once and collect its side effects;
 * save writes the uncommitted events, a snapshot and the side effects in the
 * caller's transaction; load rebuilds a context from the snapshot of the
 * type's current snapshot version and the events after it, or by replaying
 * the stream from version 0.
 *
 * Threads: a context belongs to one thread at a time.
 */
#ifndef EVENTASTIC_CONTEXT_H
#define EVENTASTIC_CONTEXT_H

#include "aggregate.h"
#include "store.h"

#ifdef __cplusplus
extern "C" {
#endif

/** One aggregate's unit of work (opaque). */
typedef struct es_context es_context;

/**
 * Start a new aggregate from its creation event: apply_new, version 0, the
 * event uncommitted, its side effects collected.  The event value is
 * borrowed (it is encoded at once).  Errors: ES_EINVAL (NULL, nil id, bad
 * type), ES_ENOMEM, the codec's error, or ES_EAPPLY with the event id when
 * apply_new failed (err->message says why).  Nothing is returned on error.
 * Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_context_record_new(
    const es_aggregate_type *type, const es_uuid *aggregate_id,
    const void *event, es_context **out, es_error *err);

/**
 * Record a later event: apply it to the state, give it the next version,
 * collect its side effects.
 *
 * An event whose id is already among the uncommitted events is a no-op when
 * its content is equal (nothing applied, no version used, no side effect
 * queued twice) and ES_EIDEMPOTENCY when it differs.  An id already stored
 * is found at save (see es_context_save).
 * On any error the context is as it was: state, version and lists.
 * Errors: ES_EINVAL, ES_ENOMEM, codec errors, ES_EAPPLY, ES_EIDEMPOTENCY.
 * Thread: the context's thread.
 */
ES_EXPORT ES_OWNER_THREAD int es_context_record(es_context *ctx,
                                                const void *event,
                                                es_error *err);

/**
 * Save the uncommitted events, a snapshot of the state and the collected
 * side effects in txn.  With no uncommitted events nothing is written.
 *
 * Idempotency and concurrency are decided here:
 * - an event id already stored for this aggregate with equal content is
 *   not written again and its side effects are not queued again; the
 *   context is rebuilt from the store with the remaining events applied
 *   after it, so state and versions stay exact (no double apply, no gap);
 * - the same id with other content gives ES_EIDEMPOTENCY;
 *   es_context_idempotency_clash shows both events;
 * - event ids are unique per aggregate (the stores' keys include the
 *   aggregate id, so that the PostgreSQL tables can be distributed by
 *   it): the same id under another aggregate is that aggregate's own
 *   event.  Ids from es_uuid_v7 never meet; an application that brings
 *   its own event ids and derives side-effect ids from them must keep
 *   them unique across aggregates, or the outbox skips the second side
 *   effect as a duplicate of the first;
 * - a version already taken gives ES_ECONFLICT with the aggregate id and
 *   the version in err;
 * - an aggregate stored under another type gives ES_EWRONGTYPE: a key
 *   belongs to the type of its creation event for ever.
 * On success the uncommitted lists are empty.  On failure the transaction
 * is as it was before this call and the context keeps its uncommitted
 * events and side effects, so the caller may retry in another transaction
 * or discard the context.
 * Thread: the context's and the transaction's thread.
 */
ES_EXPORT ES_OWNER_THREAD int es_context_save(es_txn *txn, es_context *ctx,
                                              es_error *err);

/**
 * Load an aggregate: the snapshot of the type's snapshot version, then the
 * events after it; without a usable snapshot (missing, other snapshot
 * version, undecodable, or at a version the stream does not have) the
 * stream is replayed from version 0.  A load never writes.  *out is the
 * caller's (es_context_free).
 * Errors: ES_ENOTFOUND (no events), ES_EWRONGTYPE (the aggregate is
 * stored under another type; none of its bytes is decoded; aggregate id
 * in err), ES_EAPPLY (with the event id), ES_EDECODE (an event could not
 * be decoded: unknown kind, bad bytes), ES_EINVAL (NULL argument, nil id,
 * invalid type), ES_ENOMEM, store errors.
 * Thread: the transaction's thread.
 */
ES_EXPORT ES_OWNER_THREAD int es_context_load(es_txn *txn,
                                              const es_aggregate_type *type,
                                              const es_uuid *aggregate_id,
                                              es_context **out,
                                              es_error *err);

/**
 * es_context_load in a short read-only transaction of its own.
 * Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_store_load(es_store *store,
                                          const es_aggregate_type *type,
                                          const es_uuid *aggregate_id,
                                          es_context **out, es_error *err);

/**
 * The side effects that an event produced: replay the aggregate's stream
 * from version 0 (snapshots are not used) up to and including the event,
 * then call side_effects for it.  Nothing is written.  *out is the
 * caller's (es_side_effect_list_free); it is NULL when the aggregate or the
 * event is unknown or the event had no side effects (return value 0).
 * Errors: ES_EINVAL (NULL argument, nil id), ES_EWRONGTYPE (aggregate of
 * another type), ES_ENOMEM, ES_EAPPLY, ES_EDECODE, store errors.
 * Thread: the transaction's thread.
 */
ES_EXPORT ES_OWNER_THREAD int es_context_regenerate_side_effects(
    es_txn *txn, const es_aggregate_type *type, const es_uuid *aggregate_id,
    const es_uuid *event_id, es_side_effect_list **out, es_error *err);

/** Deep copy of a context, uncommitted lists included.  *out is the
 *  caller's.  Errors: ES_EINVAL, ES_ENOMEM, state_copy's.  Thread: the
 *  context's thread. */
ES_EXPORT ES_OWNER_THREAD int es_context_clone(const es_context *ctx,
                                               es_context **out,
                                               es_error *err);

/** Free a context and its state.  NULL is a no-op. */
ES_EXPORT ES_OWNER_THREAD void es_context_free(es_context *ctx);

/** Version of the last applied event (0 after the creation event). */
ES_EXPORT ES_OWNER_THREAD uint64_t es_context_version(const es_context *ctx);

/** The state, borrowed until the next call that changes the context. */
ES_EXPORT ES_OWNER_THREAD const void *es_context_state(
    const es_context *ctx);

/** The aggregate type (borrowed; NULL for a NULL context). */
ES_EXPORT ES_OWNER_THREAD const es_aggregate_type *es_context_type(
    const es_context *ctx);
/** The aggregate id (borrowed from the context; NULL for NULL). */
ES_EXPORT ES_OWNER_THREAD const es_uuid *es_context_aggregate_id(
    const es_context *ctx);

/** The type's snapshot version. */
ES_EXPORT ES_OWNER_THREAD uint64_t es_context_snapshot_version(
    const es_context *ctx);

/** Number of uncommitted events. */
ES_EXPORT ES_OWNER_THREAD size_t es_context_uncommitted_count(
    const es_context *ctx);
/** The i-th uncommitted event, borrowed until the next call that changes
 *  the context; NULL past the end. */
ES_EXPORT ES_OWNER_THREAD const es_event *es_context_uncommitted(
    const es_context *ctx, size_t i);

/** Number of side effects collected and not yet saved. */
ES_EXPORT ES_OWNER_THREAD size_t es_context_side_effect_count(
    const es_context *ctx);
/** The i-th collected side effect (borrowed, like es_context_uncommitted);
 *  NULL past the end. */
ES_EXPORT ES_OWNER_THREAD const es_side_effect *es_context_side_effect(
    const es_context *ctx, size_t i);

/**
 * After ES_EIDEMPOTENCY: the stored event and the one that clashed with it
 * (borrowed until the next record or save).  Returns 0, or ES_ENOTFOUND
 * when the last call had no clash.
 */
ES_EXPORT ES_OWNER_THREAD int es_context_idempotency_clash(
    const es_context *ctx, const es_event **saved,
    const es_event **attempted);

#ifdef __cplusplus
}
#endif
#endif
