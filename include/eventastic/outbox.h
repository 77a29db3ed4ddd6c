/**
 * @file outbox.h
 * @brief The transactional outbox: delivering side effects at least once.
 *
 * Side effects are stored in the same transaction as the events that made
 * them (es_context_save).  A dispatcher (es_outbox) claims them from the
 * store and hands them to the handlers registered for their aggregate type
 * (and optionally kind), outside any database transaction:
 *
 * - A claim is a lease with an owner and an expiry: two dispatchers never
 *   work on one message at once, and the claims of a dispatcher that died
 *   expire and are taken by another.
 * - A handler answers ES_OUTBOX_DONE (the message is marked done),
 *   ES_OUTBOX_RETRY (next attempt after an exponential backoff with
 *   jitter) or ES_OUTBOX_GIVE_UP (dead letter, with the reason kept).
 *   After max_attempts attempts a message becomes a dead letter by itself;
 *   an attempt whose claim expired (the dispatcher died) counts as one.
 * - A message that cannot be decoded or decrypted becomes a dead letter
 *   with the reason; it never blocks the others.  Messages for which no
 *   handler is registered are left alone.
 * - Messages of one aggregate are delivered one at a time, in the order
 *   their events were stored (a later one waits while an earlier one is
 *   pending or being retried; a dead letter no longer holds the others
 *   back); messages of different aggregates are delivered in parallel.
 *
 * Delivery is at least once: a handler may see a message again (after a
 * crash, or a lease that expired while it ran).  Each message has a stable
 * id (the side effect's id): a handler makes its effect happen once by
 * using that id as the idempotency key of what it does.
 *
 * The same semantics hold on every store (memory and PostgreSQL).
 */
#ifndef EVENTASTIC_OUTBOX_H
#define EVENTASTIC_OUTBOX_H

#include <stdbool.h>

#include "aggregate.h"
#include "common.h"
#include "status.h"
#include "store.h"

#ifdef __cplusplus
extern "C" {
#endif

/** State of an outbox message. */
typedef enum es_outbox_status {
    ES_OUTBOX_PENDING = 0, /**< waiting for (another) delivery attempt */
    ES_OUTBOX_DONE = 1,    /**< delivered */
    ES_OUTBOX_DEAD = 2     /**< dead letter: failed for good, kept */
} es_outbox_status;

/** What a handler says of one delivery attempt. */
typedef enum es_outbox_verdict {
    ES_OUTBOX_VERDICT_DONE = 0,    /**< the effect happened */
    ES_OUTBOX_VERDICT_RETRY = 1,   /**< try again later (backoff) */
    ES_OUTBOX_VERDICT_GIVE_UP = 2  /**< never retry: dead letter */
} es_outbox_verdict;

/** Kind wildcard for es_outbox_config_add_handler. */
#define ES_OUTBOX_ANY_KIND INT32_MIN

/** One outbox message as stored (a borrowed view or an owned copy, as the
 *  function that gives it says). */
typedef struct es_outbox_entry {
    es_side_effect side_effect; /**< id, aggregate, event, kind, payload */
    char aggregate_type[64];    /**< type that produced it */
    es_outbox_status status;    /**< where it stands */
    uint32_t attempts;          /**< attempts started so far */
    int64_t created_ms;         /**< when stored (Unix ms) */
    int64_t next_attempt_ms;    /**< earliest next attempt (Unix ms) */
    char last_error[256];       /**< reason of the last failure, or "" */
} es_outbox_entry;

/** A list of entries owned by the caller (es_outbox_entry_list_free). */
typedef struct es_outbox_entry_list {
    size_t count;           /**< number of entries */
    es_outbox_entry *items; /**< the entries, oldest first */
} es_outbox_entry_list;

/** Free a list.  NULL is a no-op.  Thread: any. */
ES_EXPORT ES_ANY_THREAD void es_outbox_entry_list_free(
    es_outbox_entry_list *list);

/**
 * A handler: deliver one message.  @p entry and @p side_effect (the
 * payload decoded with the aggregate type's side-effect codec: a value of
 * the application's side-effect type) are borrowed until it returns;
 * entry->attempts counts this attempt.  On RETRY or GIVE_UP it may write
 * the reason into reason->message (kept as the message's last error); any
 * other return value is a failed attempt that makes a dead letter.
 * Runs on one of the dispatcher's worker threads (or the thread calling
 * es_outbox_run_once), never inside a database transaction; two calls for
 * messages of one aggregate never overlap.
 */
typedef es_outbox_verdict (*es_outbox_handler)(void *ud,
                                               const es_outbox_entry *entry,
                                               const void *side_effect,
                                               es_error *reason);

/** A clock in Unix milliseconds (injectable for tests). */
typedef int64_t (*es_clock_fn)(void *ud);

/** Configuration of a dispatcher (opaque). */
typedef struct es_outbox_config es_outbox_config;

/**
 * Make a configuration: the store to deliver from, and defaults (owner
 * name made unique per dispatcher, 4 worker threads, batch of 64, lease
 * 30 s, poll every 1000 ms, 10 attempts, backoff from 100 ms doubling up
 * to 60 s with full jitter, the system clock).  The store is borrowed: it
 * must outlive every dispatcher made from the config.  *out is the
 * caller's (es_outbox_config_free).  Errors: ES_EINVAL, ES_ENOMEM.
 * Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_outbox_config_new(es_store *store,
                                                 es_outbox_config **out,
                                                 es_error *err);

/** Free a configuration.  NULL is a no-op.  Thread: the owner. */
ES_EXPORT ES_OWNER_THREAD void es_outbox_config_free(es_outbox_config *cfg);

/**
 * Register a handler for side effects of an aggregate type, of one kind or
 * of every kind (ES_OUTBOX_ANY_KIND).  A kind-specific handler wins over
 * the wildcard.  @p type is borrowed: it must outlive the dispatcher (it
 * decodes nothing; it names the messages and is handed to nobody).
 * Errors: ES_EINVAL (NULL, a name the type check refuses, the same
 * (type, kind) twice), ES_ENOMEM.  Thread: the owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_outbox_config_add_handler(
    es_outbox_config *cfg, const es_aggregate_type *type, int32_t kind,
    es_outbox_handler handler, void *ud, es_error *err);

/** Worker threads delivering at once (1 to 256).  Errors: ES_EINVAL.
 *  Thread: the owner. */
ES_EXPORT ES_OWNER_THREAD int es_outbox_config_set_concurrency(
    es_outbox_config *cfg, size_t workers, es_error *err);

/** Messages claimed per round (1 to 10,000).  Errors: ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_outbox_config_set_batch_size(
    es_outbox_config *cfg, size_t batch, es_error *err);

/** Claim lease in ms (10 ms to 1 day): a claim not finished by then is
 *  taken by another dispatcher.  Errors: ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_outbox_config_set_lease_ms(
    es_outbox_config *cfg, int64_t lease_ms, es_error *err);

/** Poll interval in ms (1 ms to 1 hour), the fallback when wake-ups are
 *  lost.  A started dispatcher wakes at once on commits of its own
 *  process, and, on PostgreSQL, of any process: the commit sends NOTIFY
 *  on the outbox table's channel and the dispatcher LISTENs on a
 *  connection of its own (one more than the pool).  When that connection
 *  is lost it reconnects (after 100 ms, doubling up to this interval)
 *  and polls meanwhile.  Errors: ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_outbox_config_set_poll_ms(
    es_outbox_config *cfg, int64_t poll_ms, es_error *err);

/** Attempts before a message becomes a dead letter (1 to 1,000,000), and
 *  the backoff: the n-th retry waits a random time in
 *  [0, min(max_ms, base_ms * 2^(n-1))].  Errors: ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_outbox_config_set_retry(
    es_outbox_config *cfg, uint32_t max_attempts, int64_t base_ms,
    int64_t max_ms, es_error *err);

/**
 * Retention of delivered messages: the dispatcher deletes done messages
 * finished more than @p done_ms ago, a batch of at most 1,000 a second
 * (more while batches come back full), each batch in a short transaction
 * of its own, between claim rounds.  0 (the default) keeps them until
 * es_outbox_purge_done or `eventastic outbox purge`.  Dead letters are
 * never deleted.  Errors: ES_EINVAL (NULL, negative).  Thread: the
 * config's owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_outbox_config_set_retention(
    es_outbox_config *cfg, int64_t done_ms, es_error *err);

/** Owner name stored with claims (1 to 63 characters; default: made
 *  unique).  Errors: ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_outbox_config_set_owner(
    es_outbox_config *cfg, const char *owner, es_error *err);

/** Replace the clock (tests).  NULL restores the system clock. */
ES_EXPORT ES_OWNER_THREAD int es_outbox_config_set_clock(
    es_outbox_config *cfg, es_clock_fn clock, void *ud, es_error *err);

/** A dispatcher (opaque). */
typedef struct es_outbox es_outbox;

/**
 * Make a dispatcher from a configuration (copied).  With @p start true it
 * starts its threads and delivers until es_outbox_close; with false it
 * delivers only when es_outbox_run_once is called (tests, or a caller with
 * its own scheduling).  *out is the caller's.  Errors: ES_EINVAL (no
 * handler registered), ES_ENOMEM, ES_EIO (a thread could not start).
 * Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_outbox_open(const es_outbox_config *cfg,
                                           bool start, es_outbox **out,
                                           es_error *err);

/**
 * One round on the calling thread: claim up to a batch, deliver each
 * message (one after another), record the verdicts.  *delivered (may be
 * NULL) is the number of messages handled this round.  Errors: store
 * errors (ES_EDB...).  Thread: any, but not concurrently with itself.
 */
ES_EXPORT ES_ANY_THREAD int es_outbox_run_once(es_outbox *outbox,
                                               size_t *delivered,
                                               es_error *err);

/** Wake a started dispatcher now (a commit happened).  Thread: any. */
ES_EXPORT ES_ANY_THREAD void es_outbox_wake(es_outbox *outbox);

/**
 * Stop: no new claims; wait for handlers running now; their verdicts are
 * recorded; then free.  NULL is a no-op.  Thread: any but a handler's.
 */
ES_EXPORT ES_ANY_THREAD void es_outbox_close(es_outbox *outbox);

/** Counters of one dispatcher since it was opened. */
typedef struct es_outbox_metrics {
    uint64_t deliveries;   /**< handler calls */
    uint64_t done;         /**< verdict DONE */
    uint64_t retries;      /**< verdict RETRY (or a failed attempt) */
    uint64_t dead_letters; /**< messages this dispatcher made dead */
    uint64_t rounds;       /**< claim rounds */
    uint64_t notifications; /**< wake-ups by commits of any process heard
                                 through the store (PostgreSQL: NOTIFY) */
} es_outbox_metrics;

/** Copy the dispatcher's counters.  Thread: any. */
ES_EXPORT ES_ANY_THREAD void es_outbox_metrics_get(es_outbox *outbox,
                                                   es_outbox_metrics *out);

/** Figures of an outbox table (all dispatchers). */
typedef struct es_outbox_stats {
    uint64_t pending;           /**< messages waiting */
    uint64_t dead;              /**< dead letters */
    uint64_t done;              /**< delivered, not purged */
    int64_t oldest_pending_age_ms; /**< lag: now - oldest pending (0 if none) */
} es_outbox_stats;

/** Read the outbox figures at time @p now_ms (Unix ms; 0: now).
 *  Errors: ES_EINVAL, store errors.  Thread: any. */
ES_EXPORT ES_ANY_THREAD int es_outbox_stats_get(es_store *store,
                                                int64_t now_ms,
                                                es_outbox_stats *out,
                                                es_error *err);

/**
 * List messages in one status, oldest first, at most @p limit (0: 1000).
 * *out is the caller's.  Errors: ES_EINVAL, ES_ENOMEM, store errors.
 * Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_outbox_list(es_store *store,
                                           es_outbox_status status,
                                           size_t limit,
                                           es_outbox_entry_list **out,
                                           es_error *err);

/** Read one message by id.  *out is one allocation (es_free).  Errors:
 *  ES_ENOTFOUND, ES_EINVAL, ES_ENOMEM, store errors.  Thread: any. */
ES_EXPORT ES_ANY_THREAD int es_outbox_show(es_store *store,
                                           const es_uuid *id,
                                           es_outbox_entry **out,
                                           es_error *err);

/**
 * Requeue dead letters: one by id (@p id not NULL), or all of an aggregate
 * type (@p type_name) and kind (ES_OUTBOX_ANY_KIND for all).  They become
 * pending with their attempts reset, due now.  *count (may be NULL) is how
 * many changed.  Errors: ES_ENOTFOUND (the id is not a dead letter),
 * ES_EINVAL, store errors.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_outbox_requeue(es_store *store,
                                              const es_uuid *id,
                                              const char *type_name,
                                              int32_t kind, size_t *count,
                                              es_error *err);

/** Delete done messages finished before @p before_ms (Unix ms), in
 *  batches of 1,000, each in a short transaction of its own (dispatchers
 *  and commands go on meanwhile).  *count (may be NULL) is how many.
 *  Errors: ES_EINVAL, store errors (*count then says how many went
 *  before).  Thread: any. */
ES_EXPORT ES_ANY_THREAD int es_outbox_purge_done(es_store *store,
                                                 int64_t before_ms,
                                                 size_t *count,
                                                 es_error *err);

/** The system clock in Unix milliseconds.  Thread: any. */
ES_EXPORT ES_ANY_THREAD int64_t es_clock_now_ms(void);

#ifdef __cplusplus
}
#endif
#endif
