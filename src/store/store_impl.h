/*
 * The backend interface behind es_store and es_txn.  Each backend embeds
 * struct es_store / struct es_txn as its first member and fills an
 * es_store_ops table, which points at smaller tables by concern
 * (transactions, reads and writes, command ids, the batch writer, the
 * outbox, the read side).  The core (context.c) decides idempotency and
 * concurrency; a backend only inserts, skips conflicts and says what it
 * inserted.  The batch writer's items and lanes are in batch_ops.h, the
 * read side's table in read_ops.h.  Never installed.
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

/*
 * The backend's function table, grouped like SQLite's io_methods: a few
 * small tables by concern, each filled by the backend, the optional ones
 * left NULL when it has no such part.  Only store.c calls through them
 * (the read side, src/read/, calls through read).
 */

/* Transactions.  begin, commit, rollback and the savepoints are
 * required; the others are optional. */
typedef struct es__txn_ops {
    int (*begin)(es_store *store, es_txn **out, es_error *err);
    /* Optional: begin for a writer that must never wait for ever (the
     * host's fallback writer, on its commit loop): waiting for a pooled
     * connection and each round trip of the transaction end after the
     * backend's silence limit, as a lost connection (ES_EDB with a
     * SQLSTATE of class 08; in COMMIT, ES_EUNKNOWN), the connection
     * dropped.  NULL: begin. */
    int (*begin_bounded)(es_store *store, es_txn **out, es_error *err);
    /* Optional: a transaction for reads only, which may see each read at
     * its own point in time (PostgreSQL: no BEGIN until a read needs
     * one; commit and rollback then cost no round trip).  Events never
     * change once stored, so a stream read this way is still the
     * stream.  NULL: begin. */
    int (*begin_read)(es_store *store, es_txn **out, es_error *err);
    int (*commit)(es_txn *txn, es_error *err);
    void (*rollback)(es_txn *txn);
    /* A stack of savepoints: push, roll back to the newest (and pop it),
     * release the newest. */
    int (*savepoint)(es_txn *txn, es_error *err);
    int (*rollback_to)(es_txn *txn, es_error *err);
    int (*release)(es_txn *txn, es_error *err);
    /* Optional: a transaction on a connection of the caller's own, kept
     * in *slot between transactions (NULL at first; a broken one is
     * closed and replaced), never one of the pool's, for writes off the
     * command path that may be lost in a crash (snapshots, a cache): it
     * does not wait for the WAL flush.  background_close closes the
     * connection in a slot (NULL: no-op).  NULL: es_store_begin. */
    int (*begin_background)(es_store *store, void **slot, es_txn **out,
                            es_error *err);
    void (*background_close)(es_store *store, void *conn);
} es__txn_ops;

/* Reads and writes of aggregates inside a transaction; all required. */
typedef struct es__core_ops {
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
} es__core_ops;

/* Command-id records (the host's idempotency).  Optional: a backend may
 * have none (es_store_ops.commands NULL, or insert and get NULL), and the
 * host then remembers command ids only while they are in flight.  insert
 * skips ids that exist (ON CONFLICT DO NOTHING) and says which went in;
 * get finds a record by command id alone: unlike an event id, a command
 * id is unique across aggregates (the same id sent to another aggregate
 * is ES_EIDEMPOTENCY), so its table is keyed, and distributable, by
 * command id (*out: one allocation, es__free; ES_ENOTFOUND when
 * unknown). */
typedef struct es__command_ops {
    int (*insert)(es_txn *txn, const es__command_record *recs, size_t n,
                  bool *inserted, es_error *err);
    int (*get)(es_txn *txn, const es_uuid *command_id,
               es__command_record **out, es_error *err);
    /* Optional: delete at most limit records written before before_ms
     * (Unix ms), in one short transaction; *count says how many. */
    int (*purge)(es_store *store, int64_t before_ms, size_t limit,
                 size_t *count, es_error *err);
} es__command_ops;

/* The outbox (each call in a transaction of its own; see outbox.h).
 * claim: among pending messages matching a filter, due at now_ms,
 * unclaimed or with an expired claim, and with no earlier matching
 * pending message of the same aggregate, take up to max: attempts+1,
 * claimed by owner until now_ms + lease_ms.  A message whose expired
 * claims used up max_attempts becomes dead instead.  finish: only while
 * owner holds the claim (else ES_ECONFLICT). */
typedef struct es__outbox_ops {
    int (*claim)(es_store *store, const char *owner, int64_t now_ms,
                 int64_t lease_ms, uint32_t max_attempts,
                 const struct es__outbox_filter *filters, size_t n_filters,
                 size_t max, es_outbox_entry_list **out, es_error *err);
    int (*finish)(es_store *store, const es_uuid *id, const char *owner,
                  es_outbox_status status, int64_t now_ms,
                  int64_t next_attempt_ms, const char *error, es_error *err);
    /* Optional (NULL: finish one by one): n verdicts in one write, each
     * only while owner holds its claim; *lost counts the others. */
    int (*finish_many)(es_store *store, const char *owner, int64_t now_ms,
                       const es__outbox_outcome *v, size_t n, size_t *lost,
                       es_error *err);
    int (*list)(es_store *store, es_outbox_status status, size_t limit,
                es_outbox_entry_list **out, es_error *err);
    int (*get)(es_store *store, const es_uuid *id, es_outbox_entry **out,
               es_error *err);
    int (*requeue)(es_store *store, const es_uuid *id, const char *type_name,
                   int32_t kind, int64_t now_ms, size_t *count,
                   es_error *err);
    /* Delete at most limit done messages finished before before_ms, the
     * oldest first, in one short transaction; *count says how many. */
    int (*purge)(es_store *store, int64_t before_ms, size_t limit,
                 size_t *count, es_error *err);
    int (*stats)(es_store *store, int64_t now_ms, es_outbox_stats *out,
                 es_error *err);
    /* Optional (NULL: commits of this process only, through the commit
     * listeners).  watch starts a watch that calls fn for commits of
     * side effects by any process, reconnecting after a loss (first after
     * 100 ms, doubling up to retry_max_ms, each wait jittered); it
     * succeeds even while the database is unreachable.  unwatch stops it:
     * fn is not running and is never called again when it returns.  NULL
     * is a no-op. */
    int (*watch)(es_store *store, int64_t retry_max_ms, es__watch_fn fn,
                 void *ud, es__outbox_watch **out, es_error *err);
    void (*unwatch)(es__outbox_watch *watch);
} es__outbox_ops;

/* The layout of es_store_ops this library reads.  A member added later
 * comes with a higher version, and store.c reads it only from a table
 * whose version says it is there. */
#define ES__STORE_OPS_VERSION 1

struct es__batch_ops; /* store/batch_ops.h */
struct es__read_ops;  /* store/read_ops.h */

typedef struct es_store_ops {
    const char *name;
    unsigned version; /* ES__STORE_OPS_VERSION */
    const es__txn_ops *txn;
    const es__core_ops *core;
    const es__command_ops *commands; /* optional */
    /* Optional: the batch writer and its commit lanes on a libevent loop
     * (store/batch_ops.h), for the host. */
    const struct es__batch_ops *batch;
    const es__outbox_ops *outbox; /* optional: NULL, no outbox */
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

/* es_store_begin with the backend's begin_bounded, when it has one. */
int es__store_begin_bounded(es_store *store, es_txn **out, es_error *err);
/* es_store_begin with the backend's begin_read, when it has one: for
 * reads only (the host's fresh queries). */
int es__store_begin_read(es_store *store, es_txn **out, es_error *err);
/* A transaction for a background writer on a connection of its own (the
 * begin_background op), or es_store_begin when the backend has none.
 * *slot starts NULL; es__store_background_close(store, slot) ends it. */
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
/* core->store_snapshot, without es_txn_store_snapshot's checks. */
int es__txn_store_snapshot(es_txn *txn, const es_snapshot *snap,
                           es_error *err);
/* True when the backend has an outbox (es_store_ops.outbox). */
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
/* outbox->watch; only when es__store_has_outbox_watch. */
int es__store_outbox_watch(es_store *store, int64_t retry_max_ms,
                           es__watch_fn fn, void *ud, es__outbox_watch **out,
                           es_error *err);
/* outbox->unwatch; NULL is a no-op. */
void es__store_outbox_unwatch(es_store *store, es__outbox_watch *watch);

#endif
