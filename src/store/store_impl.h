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
#include <pthread.h>
#include <stdbool.h>

#include "eventastic/outbox.h"
#include "eventastic/store.h"

/*
 * A command-id record: which command of the host produced which events.
 * Written in the same transaction as the events, so a command id survives
 * passivation and restarts.  The content (kind and payload bytes) is kept
 * so that a later command with the same id can be compared byte for byte.
 * event_count 0 means "accepted, no events"; version is then the
 * aggregate's version at the time (UINT64_MAX before its first event).
 * A rejected command (decide called es_emit_reject) has a record too, with
 * no events and its rejection reason, so that a replay answers the same
 * rejection instead of deciding again on a newer state.
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
    bool hashed;      /* payload holds a digest of the content (below) */
    bool rejected;    /* the outcome was a rejection (no events) */
    const char *reason; /* rejected: the reason text (NUL-terminated) */
    bool forgotten; /* read back: rejected, but the reason was sealed with
                     * a data key since destroyed (reason NULL) */
} es__command_record;

/* Size of a content digest: BLAKE2b over the kind and the payload.  A
 * store may keep the digest instead of the payload (the PostgreSQL store
 * does, so that command payloads are not stored twice and in clear). */
#define ES__COMMAND_DIGEST 32

/* Fill digest with the content digest of (kind, payload). */
void es__command_digest(int32_t kind, const void *payload, size_t len,
                        uint8_t digest[ES__COMMAND_DIGEST]);

/* True when a stored record has the content (kind, payload). */
bool es__command_matches(const es__command_record *rec, int32_t kind,
                         const void *payload, size_t len);

/* A commit lane of a backend's asynchronous batch writer (lane_open). */
typedef struct es__batch_lane es__batch_lane;
struct event_base;
/* A lane_write has set every item's status; committed: transactions. */
typedef void (*es__batch_done)(void *ud, size_t committed);

/* Status of an item not written yet. */
#define ES__COMMIT_PENDING 1
/* Not committed: the database could not be reached (connection refused,
 * or lost before COMMIT was sent).  The caller hands the same items to
 * the batch writer again later (the writer takes them as pending). */
#define ES__COMMIT_RETRY 2
/* The answer to COMMIT was lost and reading the batch back did not
 * answer either: the transaction may or may not have committed.  Handed
 * to the batch writer again, the items are read back before anything is
 * written; never written again unread. */
#define ES__COMMIT_UNKNOWN 3

/* One command's writes: its events, their side effects and its command-id
 * record.  Items of one group (one actor) depend on the earlier items of
 * the group in the same batch: when one fails, the later ones fail with
 * ES_ECONFLICT unwritten. */
typedef struct es__commit_item {
    const char *type_name;
    es_uuid aggregate_id;
    const void *group;
    es_event *events; /* payloads owned by the item's owner */
    size_t n_events;
    es_side_effect *side_effects;
    size_t n_side_effects;
    es__command_record record; /* written when the store keeps them */
    int status; /* out: 0, or why the item was not committed */
    const char *why; /* out: a static message for a failed status, or NULL
                      * (the status name says it all) */
} es__commit_item;

/* A dispatcher's verdict on one claimed message (outbox_finish_many). */
typedef struct es__outbox_outcome {
    es_uuid id;
    es_outbox_status status; /* done, dead, or pending again */
    int64_t next_attempt_ms; /* when pending */
    char error[256];         /* "" when there is none */
} es__outbox_outcome;

/* Which messages a dispatcher handles: a type and a kind
 * (ES_OUTBOX_ANY_KIND for all its kinds). */
typedef struct es__outbox_filter {
    const char *type_name;
    int32_t kind;
} es__outbox_filter;

/* True if the message matches one of the filters. */
bool es__outbox_filter_match(const es__outbox_filter *filters, size_t n,
                             const char *type_name, int32_t kind);

/* Called when side effects were committed (wakes dispatchers). */
typedef void (*es__commit_listener)(void *ud);

/* A watch on the outbox of a store shared by several processes: a
 * connection of its own that hears of commits made by anyone (the
 * PostgreSQL store: LISTEN/NOTIFY).  The callback runs on the watch's own
 * thread: notified true for a notification, false after the watch
 * (re)connected, when notifications may have been missed. */
typedef struct es__outbox_watch es__outbox_watch;
typedef void (*es__watch_fn)(void *ud, bool notified);

typedef struct es_store_ops {
    const char *name;
    int (*begin)(es_store *store, es_txn **out, es_error *err);
    /* Optional: begin for a writer that must never wait for ever (the
     * host's fallback writer, on its commit loop): waiting for a pooled
     * connection and each round trip of the transaction end after the
     * backend's silence limit, as a lost connection (ES_EDB with a
     * SQLSTATE of class 08; in COMMIT, ES_EUNKNOWN), the connection
     * dropped.  NULL: begin. */
    int (*begin_bounded)(es_store *store, es_txn **out, es_error *err);
    int (*commit)(es_txn *txn, es_error *err);
    void (*rollback)(es_txn *txn);
    /* A stack of savepoints: push, roll back to the newest (and pop it),
     * release the newest. */
    int (*savepoint)(es_txn *txn, es_error *err);
    int (*rollback_to)(es_txn *txn, es_error *err);
    int (*release)(es_txn *txn, es_error *err);
    /* Reads of one aggregate name the type the caller will decode its
     * rows as (type_name; NULL: any type, for tools that only print
     * them).  An aggregate stored under another type answers
     * ES_EWRONGTYPE before fn sees any of its rows: one type's bytes are
     * never handed over as another's. */
    int (*stream)(es_txn *txn, const char *type_name,
                  const es_uuid *aggregate_id, uint64_t from_version,
                  int (*fn)(void *ud, const es_event *event), void *ud,
                  es_error *err);
    /* An event id is unique per aggregate (so that a store's tables can
     * be distributed by aggregate id): both ids are required.  *out: one
     * allocation, es__free. */
    int (*get_event)(es_txn *txn, const es_uuid *aggregate_id,
                     const es_uuid *event_id, es_event **out, es_error *err);
    /* Insert events, skipping any whose (aggregate, event id) or
     * (aggregate, version) exists; inserted[i] says which went in. */
    int (*insert_events)(es_txn *txn, const char *type_name,
                         const es_uuid *aggregate_id, const es_event *events,
                         size_t n, bool *inserted, es_error *err);
    /* Insert side effects as pending outbox messages, skipping ids that
     * exist (never reset one). */
    int (*insert_side_effects)(es_txn *txn, const char *type_name,
                               const es_side_effect *items, size_t n,
                               es_error *err);
    /* The type of a snapshot is its aggregate's: the type of its
     * creation event (version 0).  A snapshot of an aggregate without
     * events is returned as is (a load then finds no stream under it). */
    int (*get_snapshot)(es_txn *txn, const char *type_name,
                        const es_uuid *aggregate_id,
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
     * record by command id alone: unlike an event id, a command id is
     * unique across aggregates (the same id sent to another aggregate is
     * ES_EIDEMPOTENCY), so its table is keyed, and distributable, by
     * command id (*out: one allocation, es__free; ES_ENOTFOUND when
     * unknown). */
    int (*insert_commands)(es_txn *txn, const es__command_record *recs,
                           size_t n, bool *inserted, es_error *err);
    int (*get_command)(es_txn *txn, const es_uuid *command_id,
                       es__command_record **out, es_error *err);
    /* Optional, with the two above: delete at most limit command-id
     * records written before before_ms (Unix ms), in one short
     * transaction; *count says how many. */
    int (*purge_commands)(es_store *store, int64_t before_ms, size_t limit,
                          size_t *count, es_error *err);
    /* Optional: write many aggregates' items in as few transactions as
     * it can, with a constant number of statements each; the contract of
     * es__commit_batch (host/committer.h).  Items it could not place on
     * an aggregate are left ES__COMMIT_PENDING, and the caller writes them
     * the generic way.  One try, no waiting: when the database cannot be
     * reached the items come back ES__COMMIT_RETRY or ES__COMMIT_UNKNOWN
     * (above), and the caller decides when to hand them in again.  Items
     * ES__COMMIT_UNKNOWN on entry (all from one transaction) are read
     * back first.  *slot is the caller's own connection, kept between
     * calls (NULL at first; a broken one is closed and replaced; closed
     * with background_close), never one of the pool's; a backend without
     * connections ignores it.  Returns the number of transactions
     * committed. */
    size_t (*write_batch)(es_store *store, void **slot,
                          es__commit_item **items, size_t n);
    /* Optional: write_batch on a libevent loop, without blocking it
     * (non-blocking libpq on the PostgreSQL store).  lane_open makes a
     * commit lane of the backend's on base (no I/O yet: it connects on
     * its first batch).  lane_write starts one write_batch of items (same
     * contract, same statuses; items stay the caller's and untouched by
     * anyone else until done) and returns at once; done(ud, committed)
     * runs on the loop's thread when every item has its status, possibly
     * before lane_write returns.  One batch at a time per lane.
     * lane_close frees an idle lane and closes its connection, from any
     * thread once the loop no longer runs its events.  Called only on the
     * loop's thread, except lane_close. */
    int (*lane_open)(es_store *store, struct event_base *base,
                     es__batch_lane **out, es_error *err);
    void (*lane_write)(es__batch_lane *lane, es__commit_item **items,
                       size_t n, es__batch_done done, void *ud);
    void (*lane_close)(es__batch_lane *lane);
    /* Commit lanes the host uses by default with write_batch; 0: the
     * host's default for a database (several lanes overlap round trips).
     * The memory store says 1: its writes hold one lock, and more lane
     * threads only contend for it (bench/bench_host.c). */
    unsigned batch_lanes;
    /* Optional: a transaction on a connection of the caller's own, kept
     * in *slot between transactions (NULL at first; a broken one is
     * closed and replaced), never one of the pool's, for writes off the
     * command path that may be lost in a crash (snapshots, a cache): it
     * does not wait for the WAL flush.  background_close closes the
     * connection in a slot (NULL: no-op).  NULL: es_store_begin. */
    int (*begin_background)(es_store *store, void **slot, es_txn **out,
                            es_error *err);
    void (*background_close)(es_store *store, void *conn);
    /* The outbox (each in a transaction of its own; see outbox.h).
     * claim: among pending messages matching a filter, due at now_ms,
     * unclaimed or with an expired claim, and with no earlier matching
     * pending message of the same aggregate, take up to max: attempts+1,
     * claimed by owner until now_ms + lease_ms.  A message whose expired
     * claims used up max_attempts becomes dead instead.
     * finish: only while owner holds the claim (else ES_ECONFLICT). */
    int (*outbox_claim)(es_store *store, const char *owner, int64_t now_ms,
                        int64_t lease_ms, uint32_t max_attempts,
                        const struct es__outbox_filter *filters,
                        size_t n_filters, size_t max,
                        es_outbox_entry_list **out, es_error *err);
    int (*outbox_finish)(es_store *store, const es_uuid *id,
                         const char *owner, es_outbox_status status,
                         int64_t now_ms, int64_t next_attempt_ms,
                         const char *error, es_error *err);
    /* Optional (NULL: outbox_finish one by one): n verdicts in one write,
     * each only while owner holds its claim; *lost counts the others. */
    int (*outbox_finish_many)(es_store *store, const char *owner,
                              int64_t now_ms, const es__outbox_outcome *v,
                              size_t n, size_t *lost, es_error *err);
    int (*outbox_list)(es_store *store, es_outbox_status status, size_t limit,
                       es_outbox_entry_list **out, es_error *err);
    int (*outbox_get)(es_store *store, const es_uuid *id,
                      es_outbox_entry **out, es_error *err);
    int (*outbox_requeue)(es_store *store, const es_uuid *id,
                          const char *type_name, int32_t kind, int64_t now_ms,
                          size_t *count, es_error *err);
    /* Delete at most limit done messages finished before before_ms, the
     * oldest first, in one short transaction; *count says how many. */
    int (*outbox_purge)(es_store *store, int64_t before_ms, size_t limit,
                        size_t *count, es_error *err);
    int (*outbox_stats)(es_store *store, int64_t now_ms,
                        es_outbox_stats *out, es_error *err);
    /* Optional (NULL: commits of this process only, through the commit
     * listeners).  outbox_watch starts a watch that calls fn for commits
     * of side effects by any process, reconnecting after a loss (first
     * after 100 ms, doubling up to retry_max_ms); it succeeds even while
     * the database is unreachable.  outbox_unwatch stops it: fn is not
     * running and is never called again when it returns.  NULL is a
     * no-op. */
    int (*outbox_watch)(es_store *store, int64_t retry_max_ms,
                        es__watch_fn fn, void *ud, es__outbox_watch **out,
                        es_error *err);
    void (*outbox_unwatch)(es__outbox_watch *watch);
    /* Optional: the read side (store/read_ops.h); NULL: the backend has
     * no global order, and es_store_read_all answers ES_EINVAL. */
    const struct es__read_ops *read;
    /* Free the backend; called when no transaction is open. */
    void (*close)(es_store *store);
} es_store_ops;

#define ES__MAX_LISTENERS 16

struct es_store {
    const es_store_ops *ops;
    atomic_long open_txns;
    atomic_bool closing;
    /* Commit listeners; listeners_lock guards the array.  It is never held
     * while another lock of the library is taken, and listeners must not
     * call back into the store. */
    pthread_mutex_t listeners_lock;
    struct {
        es__commit_listener fn;
        void *ud;
    } listeners[ES__MAX_LISTENERS];
    /* Event listeners (store/read_ops.h), under listeners_lock too;
     * n_event_listeners lets a commit skip the lock when there are none. */
    atomic_int n_event_listeners;
    struct {
        void (*fn)(void *ud);
        void *ud;
    } event_listeners[ES__MAX_LISTENERS];
};

/* Set up / tear down the shared part of a store (backends call these). */
void es__store_init(es_store *store, const es_store_ops *ops);
void es__store_destroy(es_store *store);
/* Register / remove a commit listener.  add: ES_EBUSY when full. */
int es__store_listen(es_store *store, es__commit_listener fn, void *ud);
void es__store_unlisten(es_store *store, es__commit_listener fn, void *ud);
/* Backends call this after a commit that stored side effects. */
void es__store_notify(es_store *store);

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
int es__txn_insert_events(es_txn *txn, const char *type_name,
                          const es_uuid *aggregate_id, const es_event *events,
                          size_t n, bool *inserted, es_error *err);
int es__txn_insert_side_effects(es_txn *txn, const char *type_name,
                                const es_side_effect *items, size_t n,
                                es_error *err);

/* A transaction for a background writer on a connection of its own (the
 * begin_background op), or es_store_begin when the backend has none.
 * *slot starts NULL; es__store_background_close(store, slot) ends it. */
/* es_store_begin with the backend's begin_bounded, when it has one. */
int es__store_begin_bounded(es_store *store, es_txn **out, es_error *err);
int es__store_begin_background(es_store *store, void **slot, es_txn **out,
                               es_error *err);
void es__store_background_close(es_store *store, void **slot);

/* Typed reads for the core and the host (store.h's es_txn_stream_of and
 * es_txn_get_snapshot_of, by type name). */
int es__txn_stream(es_txn *txn, const char *type_name,
                   const es_uuid *aggregate_id, uint64_t from_version,
                   int (*fn)(void *ud, const es_event *event), void *ud,
                   es_error *err);
int es__txn_get_snapshot(es_txn *txn, const char *type_name,
                         const es_uuid *aggregate_id,
                         uint64_t snapshot_version, es_snapshot **out,
                         es_error *err);
/* The answer to a read or write of an aggregate stored under another
 * type (ES_EWRONGTYPE), with the aggregate in err. */
int es__wrong_type(es_error *err, const es_uuid *aggregate_id,
                   const char *stored, const char *wanted);

/* Retention deletes in batches of this many rows, each in a transaction
 * of its own: no lock is held long enough to stall a command. */
#define ES__PURGE_BATCH 1000

/* One batch of es_store_purge_commands (the host's retention). */
int es__store_purge_commands(es_store *store, int64_t before_ms,
                             size_t limit, size_t *count, es_error *err);

/* Command-id records; ES_EINVAL when the backend has none (see
 * es__store_has_commands). */
bool es__store_has_commands(const es_store *store);
int es__txn_insert_commands(es_txn *txn, const es__command_record *recs,
                            size_t n, bool *inserted, es_error *err);
int es__txn_get_command(es_txn *txn, const es_uuid *command_id,
                        es__command_record **out, es_error *err);
/* One allocation holding a command record, its payload and its reason. */
es__command_record *es__command_record_dup(const es__command_record *rec);

/* One allocation holding an event and a copy of its payload. */
es_event *es__event_dup(const es_event *ev);
/* Same for a snapshot. */
es_snapshot *es__snapshot_dup(const es_snapshot *snap);
/* Append a copy of a side effect to a list (payload copied). */
int es__side_effect_list_push(es_side_effect_list *list, size_t *cap,
                              const es_side_effect *se);

/* ---- the backend's function table, for the rest of the library ----
 * Only store.c calls through ops; the host, the committer, the outbox and
 * the context use these.  No argument checks beyond the backend's: the
 * callers are internal. */

/* The backend's name ("memory", "postgres"). */
const char *es__store_name(const es_store *store);
/* ops->store_snapshot, without es_txn_store_snapshot's checks. */
int es__txn_store_snapshot(es_txn *txn, const es_snapshot *snap,
                           es_error *err);
/* True when the backend has a batch writer (write_batch). */
bool es__store_has_batch_writer(const es_store *store);
/* write_batch (see es_store_ops); only when es__store_has_batch_writer. */
size_t es__store_write_batch(es_store *store, void **slot,
                             es__commit_item **items, size_t n);
/* The backend's default number of commit lanes (0: the host's). */
unsigned es__store_batch_lanes(const es_store *store);
/* lane_open; *out = NULL and 0 on a backend without asynchronous lanes. */
int es__store_lane_open(es_store *store, struct event_base *base,
                        es__batch_lane **out, es_error *err);
/* lane_write and lane_close of a lane es__store_lane_open made. */
void es__store_lane_write(es_store *store, es__batch_lane *lane,
                          es__commit_item **items, size_t n,
                          es__batch_done done, void *ud);
void es__store_lane_close(es_store *store, es__batch_lane *lane);
/* True when the backend has an outbox (outbox_claim and the others). */
bool es__store_has_outbox(const es_store *store);
int es__store_outbox_claim(es_store *store, const char *owner,
                           int64_t now_ms, int64_t lease_ms,
                           uint32_t max_attempts,
                           const es__outbox_filter *filters,
                           size_t n_filters, size_t max,
                           es_outbox_entry_list **out, es_error *err);
int es__store_outbox_finish(es_store *store, const es_uuid *id,
                            const char *owner, es_outbox_status status,
                            int64_t now_ms, int64_t next_attempt_ms,
                            const char *error, es_error *err);
/* True when the backend records many verdicts in one write. */
bool es__store_has_outbox_finish_many(const es_store *store);
int es__store_outbox_finish_many(es_store *store, const char *owner,
                                 int64_t now_ms, const es__outbox_outcome *v,
                                 size_t n, size_t *lost, es_error *err);
int es__store_outbox_list(es_store *store, es_outbox_status status,
                          size_t limit, es_outbox_entry_list **out,
                          es_error *err);
int es__store_outbox_get(es_store *store, const es_uuid *id,
                         es_outbox_entry **out, es_error *err);
int es__store_outbox_requeue(es_store *store, const es_uuid *id,
                             const char *type_name, int32_t kind,
                             int64_t now_ms, size_t *count, es_error *err);
int es__store_outbox_purge(es_store *store, int64_t before_ms, size_t limit,
                           size_t *count, es_error *err);
int es__store_outbox_stats(es_store *store, int64_t now_ms,
                           es_outbox_stats *out, es_error *err);
/* True when the backend can watch for other processes' commits (else
 * commits of this process only, through the commit listeners). */
bool es__store_has_outbox_watch(const es_store *store);
/* outbox_watch; only when es__store_has_outbox_watch. */
int es__store_outbox_watch(es_store *store, int64_t retry_max_ms,
                           es__watch_fn fn, void *ud, es__outbox_watch **out,
                           es_error *err);
/* outbox_unwatch; NULL is a no-op. */
void es__store_outbox_unwatch(es_store *store, es__outbox_watch *watch);

#endif
