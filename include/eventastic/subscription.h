/**
 * @file subscription.h
 * @brief The read side: every event of a store in one global order, with
 * a position a reader can checkpoint, and projections that follow it.
 *
 * The global order.  Every event a store holds has a position
 * (es_position).  Positions are totally ordered (es_position_compare),
 * every reader sees the same events in the same order, and a reader that
 * resumes after the position of the last event it handled:
 * - never misses an event that committed,
 * - never sees an event twice,
 * - never waits on a gap that nothing will fill (a rolled-back write
 *   leaves no hole that holds readers back).
 * An event becomes readable once no transaction that could still commit
 * an event ordered before it is running: on PostgreSQL a transaction that
 * stays open holds back the events committed after it began until it
 * ends (docs/read-side.md gives the argument); on the memory store an
 * event is readable as soon as its commit returns.
 *
 * Positions mean something only for the store that gave them.  The zero
 * position ({0, 0}) is before every event.
 *
 * Projections (es_projection) are handlers run over the global order on
 * a thread of their own, each with its own checkpoint stored in the
 * store under its name; see below.
 */
#ifndef EVENTASTIC_SUBSCRIPTION_H
#define EVENTASTIC_SUBSCRIPTION_H

#include <stdbool.h>
#include <stdint.h>

#include "aggregate.h"
#include "common.h"
#include "status.h"
#include "store.h"
#include "uuid.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * A place in a store's global order.  commit orders transactions (on
 * PostgreSQL the writing transaction's id, on the memory store its commit
 * number); seq orders events within and across them.  Compare with
 * es_position_compare; never do arithmetic on the fields.
 */
typedef struct es_position {
    uint64_t commit; /**< orders the transactions */
    uint64_t seq;    /**< orders events within a transaction */
} es_position;

/**
 * One event as the global order hands it over: a borrowed view, valid
 * until the callback that receives it returns.
 */
typedef struct es_recorded_event {
    es_position position;  /**< where it stands in the global order */
    const char *type_name; /**< its aggregate's type */
    es_uuid aggregate_id;  /**< its aggregate */
    es_event event;        /**< id, version, kind and payload */
    int64_t created_ms;    /**< when it was stored (Unix ms) */
    /** The aggregate was forgotten (es_pg_forget_aggregate): the payload
     *  can no longer be read; event.data is NULL and event.len 0.  The
     *  event keeps its place so that counts stay right. */
    bool forgotten;
} es_recorded_event;

/**
 * Compare two positions: negative when a is before b, 0 when equal,
 * positive after.  NULL is before everything.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_position_compare(const es_position *a,
                                                const es_position *b);

/**
 * Called with each event es_store_read_all reads, in order.  Return 0 to
 * go on; any other value stops the read, which then returns that value.
 */
typedef int (*es_read_fn)(void *ud, const es_recorded_event *event);

/**
 * Read up to max events after position *after (NULL or zero: from the
 * start) in the global order, calling fn with each, on the calling
 * thread, outside any transaction.  Only events that are readable (see
 * above) are read, so a later call after the last position seen gets
 * every event that follows, and none twice.  *count (optional) is the
 * number of events fn accepted; *last (optional) the position of the
 * last of them (*after when none).  max 0 reads nothing.
 * Returns 0, fn's nonzero value, or: ES_EINVAL (store or fn NULL),
 * ES_ENOMEM, ES_EDB, ES_EDECRYPT (a payload that does not open for
 * another reason than a forgotten aggregate), ES_ECLOSED.  A failed read
 * may have called fn for some events first (*count, *last say which).
 * Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_store_read_all(es_store *store,
                                              const es_position *after,
                                              size_t max, es_read_fn fn,
                                              void *ud, size_t *count,
                                              es_position *last,
                                              es_error *err);

/**
 * The position of the newest readable event (zero when there is none).
 * Thread: any.  Errors: ES_EINVAL, ES_EDB, ES_ECLOSED.
 */
ES_EXPORT ES_ANY_THREAD int es_store_head(es_store *store, es_position *out,
                                          es_error *err);

/* ---- projections ---- */

/** A projection: a handler kept up to date with the global order. */
typedef struct es_projection es_projection;
/** Its configuration (opaque). */
typedef struct es_projection_config es_projection_config;

/** When the checkpoint is saved. */
typedef enum es_projection_mode {
    /** The handler's writes and the checkpoint in one transaction of the
     *  store (on PostgreSQL: es_pg_txn_conn gives the handler the
     *  transaction's connection).  Each event counts once in the read
     *  model, whatever crashes. */
    ES_PROJECTION_EXACTLY_ONCE = 0,
    /** The checkpoint is saved after the handler returned, in a
     *  transaction of its own; the handler gets no transaction.  After a
     *  crash the events since the last checkpoint are handed over again:
     *  for read models kept elsewhere, with idempotent writes. */
    ES_PROJECTION_AT_LEAST_ONCE = 1
} es_projection_mode;

/**
 * Apply one event to the read model.  txn: in exactly-once mode the
 * transaction that will also save the checkpoint (do not commit or roll
 * it back); NULL in at-least-once mode.  Return 0, or a negative
 * es_status with err filled: the batch is rolled back (exactly-once) or
 * not checkpointed (at-least-once) and handed over again after a backoff.
 * Runs on the projection's thread, never two calls at once.
 */
typedef int (*es_projection_apply_fn)(void *ud, es_txn *txn,
                                      const es_recorded_event *event,
                                      es_error *err);
/**
 * Optional: empty the read model, for a rebuild (es_projection_rebuild).
 * txn as for apply: in exactly-once mode the reset and the checkpoint's
 * return to the start commit together.
 */
typedef int (*es_projection_reset_fn)(void *ud, es_txn *txn, es_error *err);

/**
 * Optional: called once at the end of each batch, after its last apply
 * and before the checkpoint is saved, with the same txn (exactly-once):
 * write in bulk what apply gathered.  An error fails the batch as an
 * apply error does (gathered state is the handler's to drop: the batch
 * is handed over again).
 */
typedef int (*es_projection_flush_fn)(void *ud, es_txn *txn, es_error *err);

/** What a projection is doing (es_projection_stats.state). */
typedef enum es_projection_state {
    ES_PROJECTION_STARTING = 0, /**< reading its checkpoint */
    ES_PROJECTION_CATCHING_UP = 1, /**< full batches: behind the head */
    ES_PROJECTION_LIVE = 2,     /**< at the head, waiting for events */
    ES_PROJECTION_RETRYING = 3, /**< a batch failed; retrying (backoff) */
    ES_PROJECTION_FAILED = 4,   /**< gave up after max attempts: stopped
                                 *   at the event that failed, error kept */
    ES_PROJECTION_STOPPED = 5   /**< es_projection_stop was called */
} es_projection_state;

/** A projection's progress (a caller-allocated result). */
typedef struct es_projection_stats {
    es_projection_state state; /**< what it is doing */
    es_position position;  /**< checkpoint: last event applied */
    uint64_t applied;      /**< events applied since start */
    uint64_t batches;      /**< batches committed since start */
    uint64_t failures;     /**< failed attempts since start */
    /** Events readable after the checkpoint when last looked (exact on
     *  the memory store; on PostgreSQL an upper bound: identity values
     *  taken by rolled-back writes count). */
    uint64_t lag_events;
    /** How long ago the oldest event not yet applied was stored (0 when
     *  at the head). */
    int64_t lag_ms;
    es_error last_error;   /**< the last failure (code 0: none) */
} es_projection_stats;

/**
 * Make a configuration: at-least-once, 500 events per batch, retry after
 * 100 ms doubling to 10 s, failed after 10 attempts of one batch, polling
 * every 100 ms besides being woken by this process's commits.
 * *out is the caller's (es_projection_config_free).
 * Errors: ES_EINVAL, ES_ENOMEM.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_projection_config_new(
    es_projection_config **out, es_error *err);
/** Free a configuration.  NULL is a no-op.  Thread: the owner. */
ES_EXPORT ES_OWNER_THREAD void es_projection_config_free(
    es_projection_config *cfg);
/**
 * The projection's name: its checkpoint's key in the store.  1 to 63
 * bytes of [A-Za-z0-9_.-].  Required.  Errors: ES_EINVAL (the message
 * says which rule failed).  Thread: the owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_projection_config_set_name(
    es_projection_config *cfg, const char *name, es_error *err);
/**
 * The handler (apply required, reset optional) and its user data, which
 * must outlive the projection.  Errors: ES_EINVAL.  Thread: the owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_projection_config_set_handler(
    es_projection_config *cfg, es_projection_apply_fn apply,
    es_projection_reset_fn reset, void *ud, es_error *err);
/** The batch-end hook (NULL: none).  Errors: ES_EINVAL (cfg NULL). */
ES_EXPORT ES_OWNER_THREAD int es_projection_config_set_flush(
    es_projection_config *cfg, es_projection_flush_fn flush, es_error *err);
/** The mode (see es_projection_mode).  Errors: ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_projection_config_set_mode(
    es_projection_config *cfg, es_projection_mode mode, es_error *err);
/** Events per batch (one transaction, one checkpoint): 1 to 100,000.
 *  Errors: ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_projection_config_set_batch(
    es_projection_config *cfg, size_t events, es_error *err);
/**
 * Retries of a failed batch: first after initial_ms, doubling (with
 * jitter) up to max_ms; after max_attempts failed attempts of one batch
 * the projection stops in ES_PROJECTION_FAILED (0: never).
 * Errors: ES_EINVAL (initial_ms < 1, max_ms < initial_ms).
 */
ES_EXPORT ES_OWNER_THREAD int es_projection_config_set_retry(
    es_projection_config *cfg, int64_t initial_ms, int64_t max_ms,
    uint32_t max_attempts, es_error *err);
/**
 * How often to look for new events when nothing woke the projection
 * (events written by other processes): 1 ms to 60 s.  Commits of this
 * process wake it at once.  Errors: ES_EINVAL.
 */
ES_EXPORT ES_OWNER_THREAD int es_projection_config_set_poll_ms(
    es_projection_config *cfg, int64_t poll_ms, es_error *err);

/**
 * Start a projection on store: read its checkpoint (the start when it has
 * none), catch up, then follow new events, on a thread of its own.  The
 * configuration is copied.  Two projections of one name must not run at
 * once (they would share a checkpoint).  *out is the caller's
 * (es_projection_stop).  Errors: ES_EINVAL (no name or handler; the
 * store's backend cannot keep checkpoints), ES_ENOMEM, ES_ECLOSED;
 * nothing started on error.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_projection_start(
    es_store *store, const es_projection_config *cfg, es_projection **out,
    es_error *err);

/**
 * Stop a projection and free it: the batch in hand is finished or rolled
 * back, the handler is not running and is never called again when this
 * returns.  NULL is a no-op.  Must not be called from the handler.
 * Thread: the owner.
 */
ES_EXPORT ES_OWNER_THREAD void es_projection_stop(es_projection *proj);

/** Its progress now.  Thread: any.  Errors: ES_EINVAL. */
ES_EXPORT ES_ANY_THREAD int es_projection_stats_get(
    es_projection *proj, es_projection_stats *out);

/**
 * Wait until the projection has applied every event up to *pos (for a
 * read model that must reflect a write: take es_store_head after it), or
 * it failed, or timeout_ms passed.  Returns 0, ES_ETIMEDOUT, or the
 * failure's status (the projection is FAILED).  Thread: any but the
 * handler's.
 */
ES_EXPORT ES_ANY_THREAD int es_projection_wait(es_projection *proj,
                                               const es_position *pos,
                                               int64_t timeout_ms);

/**
 * Rebuild: call reset, move the checkpoint back to the start (together,
 * in exactly-once mode), then apply every event again.  A FAILED
 * projection starts again too.  Returns once the reset is committed.
 * Errors: ES_EINVAL (no reset handler), the reset's error.
 * Thread: any but the handler's.
 */
ES_EXPORT ES_ANY_THREAD int es_projection_rebuild(es_projection *proj,
                                                  es_error *err);

/** A stored checkpoint, as the tool lists them. */
typedef struct es_checkpoint {
    char name[64];        /**< the projection's name */
    es_position position; /**< last event applied */
    int64_t updated_ms;   /**< when it was saved (Unix ms) */
} es_checkpoint;

/**
 * The checkpoints stored in store, by name.  *out and *n are the
 * caller's (es_free(*out)).  Errors: ES_EINVAL, ES_ENOMEM, ES_EDB.
 * Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_checkpoint_list(es_store *store,
                                               es_checkpoint **out,
                                               size_t *n, es_error *err);

/**
 * Delete a projection's checkpoint, so it starts from the beginning the
 * next time it starts (its read model is the caller's to empty).  Stop
 * the projection first.  Errors: ES_EINVAL (bad name), ES_ENOTFOUND,
 * ES_EDB.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_checkpoint_reset(es_store *store,
                                                const char *name,
                                                es_error *err);

#ifdef __cplusplus
}
#endif

#endif
