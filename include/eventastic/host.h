/**
 * @file host.h
 * @brief the aggregate host: aggregates served from a thread pool, one
 * command at a time per key, their events committed in batches.
 *
 * Each aggregate instance (key = aggregate id) is an actor with a bounded
 * mailbox.  Commands to one key are decided one at a time, in arrival
 * order, by a worker thread: decide(state, command) emits events or
 * rejects.  The events are applied to the actor's state at once, so the
 * next command sees them while their commit is still in flight
 * (pipelining), and are handed to the committer, which writes the events,
 * side effects and command ids of many aggregates in one transaction.  A
 * command is reported successful only after that transaction committed.
 * If a commit fails, the actor is rebuilt from the store and the commands
 * that depended on the lost events are decided again (or failed with
 * ES_ECONFLICT after a few attempts); they never report a success that did
 * not commit.
 *
 * Idempotency: a command id already used for the aggregate is answered
 * with the original outcome without deciding again: the same events and
 * version for an accepted command, ES_EREJECTED with the same reason for
 * a rejected one (es_emit_reject), even when deciding again would now
 * accept it.  The same id with other content (kind or payload bytes) is
 * answered ES_EIDEMPOTENCY.  Command ids are stored in the transaction of
 * their events (a rejection: a record with its reason and no events,
 * committed like any other), so this holds after passivation and after a
 * restart of the host on the same store.  A rejection is therefore
 * reported only once its record committed, after the commands decided
 * before it; if that write fails, the command completes with the store's
 * error (ES_EDB, ...), not ES_EREJECTED, and nothing is recorded: sent
 * again, it is decided again.  A decide that fails with an error (any
 * other non-zero return) or a failing apply is not an outcome and is not
 * recorded.  On a store without command-id records, ids are remembered
 * only while their command is in flight and rejections are answered at
 * once.  On a PostgreSQL store with keys a rejection's reason is sealed
 * with its aggregate's data key; once the aggregate is forgotten
 * (es_pg_forget_aggregate) a replay is answered ES_EFORGOTTEN, without
 * the reason, and so is a replay of an accepted command (its events are
 * gone with the key).
 *
 * Threads: the host runs `workers` worker threads; the commit loop, one
 * thread running an event_base of the host's own for every commit lane
 * (es_host_config_set_lanes; on PostgreSQL, non-blocking connections);
 * one snapshot writer; and an I/O thread running a libevent event_base
 * for the timers: its own, or the embedder's loop thread when
 * es_host_config_set_event_base handed it one.  The timer loop
 * carries the host's timers (idle passivation, the snapshot flush) and
 * passivates aggregates; other threads wake it with events, never by
 * polling.  Decide handlers, query functions and completion callbacks
 * run on worker threads (completions with ES_ECLOSED may also run on the thread closing
 * the host).  The aggregate type's callbacks run on worker threads too,
 * except state_encode for a snapshot on passivation (the I/O thread, or
 * the thread running es_host_shutdown).  All user code of one aggregate
 * runs on one thread at a time.  Queries (es_host_query) read an
 * aggregate's committed state through its mailbox, in order with its
 * commands.
 */
#ifndef EVENTASTIC_HOST_H
#define EVENTASTIC_HOST_H

#include <stdbool.h>

#include "aggregate.h"
#include "common.h"
#include "status.h"
#include "store.h"
#include "uuid.h"

#ifdef __cplusplus
extern "C" {
#endif

/* libevent's loop, declared only: this header does not include libevent. */
struct event_base;

/** The host (opaque).  es_host_open; es_host_shutdown or es_host_close. */
typedef struct es_host es_host;
/** The configuration builder (opaque). */
typedef struct es_host_config es_host_config;
/** Where a decide handler puts its events or its rejection (opaque). */
typedef struct es_emitter es_emitter;

/** Version reported when the aggregate has no event yet. */
#define ES_HOST_NO_VERSION UINT64_MAX

/**
 * A command: a borrowed view.  The host copies it when it accepts it.
 * Two commands have the same content when kind and payload bytes are
 * equal; encode payloads deterministically.
 */
typedef struct es_command {
    es_uuid id;            /**< command id (idempotency key), not nil */
    int32_t kind;          /**< the application's command kind */
    const void *payload;   /**< encoded payload (may be NULL if len 0) */
    size_t len;            /**< payload length in bytes */
} es_command;

/**
 * The command handler of an aggregate type.  state is the aggregate's
 * state (NULL before its first event), borrowed for the call; it includes
 * the events of every command accepted before this one.  Emit events with
 * es_emit; they are applied in order after decide returns.  Return 0 to
 * accept (also with no event), or reject with
 * `return es_emit_reject(em, "why")`.  Any other non-zero return rejects
 * the command too (ES_EREJECTED), as does a failing apply (ES_EAPPLY); the
 * actor keeps serving.  Must not keep state or em after returning.
 * Thread: a worker thread; never concurrently for one aggregate.  It may
 * send commands to other keys (es_host_send, es_host_call).
 */
typedef int (*es_decide_fn)(void *user, const void *state,
                            const es_command *command, es_emitter *em);

/**
 * Emit one event from decide.  The event value is borrowed: it is encoded
 * at once with the type's codec.  Returns 0, ES_EINVAL (NULL, nil event
 * id), ES_ENOMEM or the codec's error; decide should return that status.
 * Thread: the thread running decide, only during the call.
 */
ES_EXPORT ES_OWNER_THREAD int es_emit(es_emitter *em, const void *event);

/**
 * Reject the command from decide with a reason (printf format, kept up to
 * 255 bytes).  Events emitted before are dropped.  Returns ES_EREJECTED,
 * so decide can `return es_emit_reject(em, ...)`.  Thread: as es_emit.
 */
ES_EXPORT ES_OWNER_THREAD int es_emit_reject(es_emitter *em, const char *fmt,
                                             ...)
    __attribute__((format(printf, 2, 3)));

/**
 * The aggregate id the running decide is for (borrowed; valid during the
 * call).  NULL if em is NULL.  Thread: as es_emit.
 */
ES_EXPORT ES_OWNER_THREAD const es_uuid *es_emit_aggregate_id(
    const es_emitter *em);

/**
 * The outcome of one command, handed to its completion callback.  A
 * borrowed view, valid until the callback returns.
 */
typedef struct es_host_result {
    /** 0 (committed), ES_EREJECTED (decide rejected), ES_EAPPLY (an event
     *  could not be applied), ES_EIDEMPOTENCY (id used with other content
     *  or by another aggregate), ES_ECONFLICT (commits kept conflicting:
     *  retry), ES_ECLOSED (host closed before the outcome was known or
     *  before the command ran, or closed while the database could not be
     *  reached: not committed), ES_EUNKNOWN (host closed before a COMMIT
     *  whose answer was lost could be read back: it may have committed),
     *  ES_EWRONGTYPE (the key is stored under another aggregate type;
     *  nothing of it was decoded), or a store error (ES_EDB, ES_ENOMEM,
     *  ES_EDECODE while loading;
     *  ES_EFORGOTTEN, ES_EDECRYPT with encryption at rest, also for a
     *  replayed rejection whose reason is sealed).
     *  While the host runs, commits wait for a database that cannot be
     *  reached instead of failing. */
    int status;
    /** True when answered from an earlier command with this id (also for
     *  a rejection answered again). */
    bool duplicate;
    /** The aggregate's version after the command (its last event's
     *  version, or the version it saw when it emitted none);
     *  ES_HOST_NO_VERSION when the aggregate has no event. */
    uint64_t version;
    /** The command's events (status 0), in version order. */
    const es_event *events;
    size_t n_events; /**< number of events */
    /** Why it failed: the rejection reason or an error message; "" on
     *  success.  Never NULL. */
    const char *reason;
    es_uuid aggregate_id; /**< the aggregate the command was sent to */
    es_uuid command_id;   /**< the command's id */
} es_host_result;

/**
 * Completion callback: called exactly once for each command es_host_send
 * accepted.  Thread: a worker thread of the host, or the thread running
 * es_host_close / es_host_shutdown for ES_ECLOSED.  It may send commands
 * (also es_host_call to another key).
 */
typedef void (*es_host_done_fn)(void *ud, const es_host_result *result);

/* ---- configuration ---- */

/**
 * Make a configuration with defaults: 2 workers, mailbox bound 1024,
 * 1,000,000 commands in the host, 100,000 resident aggregates, passivation
 * after 60 s idle, a snapshot every 100 events, on passivation and after a
 * load slower than 10 ms, batches of up to 1024 rows.  *out is the caller's (es_host_config_free).
 * Errors: ES_EINVAL, ES_ENOMEM.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_host_config_new(es_host_config **out,
                                               es_error *err);

/** Free a configuration.  NULL is a no-op.  Thread: the config's owner. */
ES_EXPORT ES_OWNER_THREAD void es_host_config_free(es_host_config *cfg);

/** Number of worker threads (1..256).  Returns 0 or ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_host_config_set_workers(es_host_config *cfg,
                                                         unsigned n);

/** Commands and queries waiting in one aggregate's mailbox before
 *  es_host_send and es_host_query answer ES_EBUSY (>= 1).  Returns 0 or
 *  ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_host_config_set_mailbox_bound(
    es_host_config *cfg, size_t n);

/** Commands and queries accepted and not yet completed, over all
 *  aggregates, before es_host_send and es_host_query answer ES_EBUSY
 *  (>= 1).  Returns 0 or ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_host_config_set_host_bound(
    es_host_config *cfg, size_t n);

/** Resident aggregates (>= 1).  At the bound the least recently used idle
 *  aggregate is passivated to make room; when none is idle, a command or
 *  query for a new key gets ES_EBUSY.  The bound is kept per shard of the key space
 *  (64 shards), so the LRU order is approximate.  Returns 0 or ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_host_config_set_resident_bound(
    es_host_config *cfg, size_t n);

/** Resident aggregates by memory: the count bound becomes at most
 *  bytes / (the host's bytes per aggregate + the type's state_size,
 *  rounded to malloc chunks), for the largest registered state_size.  An
 *  estimate: memory a state owns beyond state_size is not seen.  0: no
 *  bytes bound (the default).  Returns 0 or ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_host_config_set_resident_bytes(
    es_host_config *cfg, uint64_t bytes);

/** Retention of command ids: the host deletes the records of commands
 *  older than @p ms (its snapshot writer, one batch of at most 1,000 a
 *  second, each in a short transaction of its own).  0 (the default)
 *  keeps them for ever.  What a shorter age gives up: a command sent
 *  again after its record is gone is not recognised as a replay; it is
 *  decided again as a new command (and may be applied twice).  Keep them
 *  longer than any client retries.  Also es_store_purge_commands and
 *  `eventastic commands purge`.  Returns 0 or ES_EINVAL (NULL, negative).
 *  Thread: the config's owner. */
ES_EXPORT ES_OWNER_THREAD int es_host_config_set_command_retention(
    es_host_config *cfg, int64_t ms);

/** Passivate aggregates idle for this many milliseconds (0: never).
 *  Returns 0. */
ES_EXPORT ES_OWNER_THREAD int es_host_config_set_idle_ms(es_host_config *cfg,
                                                         uint64_t ms);

/** Snapshot policy: a snapshot after every `every_events` events of an
 *  aggregate (0: never by count), and one on passivation when events came
 *  since the last.  An aggregate whose state a failed commit dropped (a
 *  conflict, a duplicate found by the store) and no command loaded since
 *  is loaded again for that snapshot at shutdown; an idle passivation
 *  skips it (the I/O loop never reads the store).  Snapshots are
 *  written off the command path by the snapshot writer, a thread with a
 *  database connection of its own (on
 *  PostgreSQL outside the pool, so never a commit lane's; its commits do
 *  not wait for the WAL flush, as a snapshot is a cache), woken by the
 *  I/O loop's flush timer 100 ms after the first snapshot was queued; of
 *  several snapshots of one aggregate queued meanwhile only the latest is
 *  written.  A command's acknowledgement never waits for a snapshot.
 *  Returns 0. */
ES_EXPORT ES_OWNER_THREAD int es_host_config_set_snapshots(
    es_host_config *cfg, uint64_t every_events, bool on_passivation);

/** Snapshot after a slow load: when loading an aggregate (its snapshot
 *  and the events after it) took longer than `micros`, the loaded state
 *  is snapshotted at once, so the next load replays less.  0: never.
 *  Default 10,000 (10 ms).  Returns 0. */
ES_EXPORT ES_OWNER_THREAD int es_host_config_set_snapshot_slow_load(
    es_host_config *cfg, uint64_t micros);

/** Commit lanes (0..64): each commits one batch at a time, in parallel
 *  with the others, all on the host's commit loop (one thread; on
 *  PostgreSQL each lane is a non-blocking connection of its own, outside
 *  the pool, whose round trips overlap the other lanes').  An aggregate's
 *  items always go to the same lane (by a hash of its key), so they
 *  commit in the order they were decided.  0 (the default): 2 on
 *  PostgreSQL, whose batches wait for round trips (measured in
 *  bench/bench_pg.c), else 1 (the memory store's writes hold one lock:
 *  more lanes only contend, bench/bench_host.c).  Returns 0 or
 *  ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_host_config_set_lanes(es_host_config *cfg,
                                                       unsigned n);

/** Rows (events plus command ids) in one commit batch (>= 1).  A batch
 *  closes at this limit or when the committer is free: there is no
 *  linger.  Returns 0 or ES_EINVAL. */
ES_EXPORT ES_OWNER_THREAD int es_host_config_set_batch_rows(
    es_host_config *cfg, size_t rows);

/**
 * Run the host's timers on the embedder's libevent loop instead of a
 * thread of the host's own.  base must be a libevent 2.1 event_base made
 * after evthread_use_pthreads() was called (so that the host's threads may
 * activate events on it), and must outlive the host.  The embedder runs
 * it (event_base_dispatch or event_base_loop, on one thread of their
 * choosing); the host only adds events to it: an idle-passivation timer
 * (when idle_ms > 0), a snapshot flush timer, and an event that worker
 * threads activate when an aggregate was evicted for room.  Their
 * callbacks run on the thread running the loop, are short and never wait
 * for the store (snapshots are written by the host's writer thread); they
 * call the aggregate type's state_encode for passivation snapshots.  While
 * the loop does not run, idle aggregates are not passivated, aggregates
 * evicted for room keep their memory and snapshots are not written, until
 * the loop runs again or es_host_shutdown.  es_host_shutdown and
 * es_host_close delete the host's events from the base (waiting for a
 * callback of theirs running on the loop to return) and never run, break
 * or free the base; they may be called on the loop's thread.  NULL (the
 * default): the host makes its own base, calling evthread_use_pthreads()
 * once, and runs it on a thread of its own.  The commit lanes never run
 * on this base: they have the host's commit loop (a base and thread of
 * its own), so that a shutdown called on the embedder's loop thread can
 * wait for their last commits.  Returns 0 or ES_EINVAL.
 * Thread: the config's owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_host_config_set_event_base(
    es_host_config *cfg, struct event_base *base);

/**
 * Register an aggregate type with its command handler.  The type is
 * checked (es_aggregate_type_check) and must stay valid while any host
 * made from this configuration lives (a static constant); user is passed
 * to decide.  Up to 64 types.  Errors: ES_EINVAL (bad or already
 * registered type, NULL decide), ES_ENOMEM.  Thread: the config's owner.
 */
ES_EXPORT ES_OWNER_THREAD int es_host_config_add_type(
    es_host_config *cfg, const es_aggregate_type *type, es_decide_fn decide,
    void *user, es_error *err);

/* ---- life cycle ---- */

/**
 * Start a host: its threads run at once.  The configuration is copied
 * (free it when you like).  The store is borrowed and must outlive the
 * host.  *out is the caller's: end it with es_host_shutdown or
 * es_host_close.  Errors: ES_EINVAL (no type registered, NULL argument),
 * ES_ENOMEM, ES_EIO (a thread could not start; sys_errno set).
 * Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_host_open(const es_host_config *cfg,
                                         es_store *store, es_host **out,
                                         es_error *err);

/**
 * Stop accepting commands and queries: from now on es_host_send,
 * es_host_call, es_host_query and es_host_query_call answer ES_ECLOSED.
 * Commands and queries already accepted go on as before.  Does
 * not wait.  Use it to stop producers safely before es_host_shutdown or
 * es_host_close free the host: a call on a freed host is undefined.
 * NULL is a no-op.  Thread: any, also the host's own.
 */
ES_EXPORT ES_ANY_THREAD void es_host_stop(es_host *host);

/**
 * Graceful shutdown, then free: stop accepting (es_host_send and
 * es_host_query answer ES_ECLOSED), decide every command and run every
 * query already accepted, wait for their commits and completions, passivate every aggregate (writing the
 * snapshots the policy asks for), stop the threads and free the host.
 * Returns 0, or the first error writing a snapshot (the host is freed
 * anyway).  NULL is a no-op returning 0.  Thread: any thread that is not
 * the host's own (not from decide or a completion callback: ES_EMISUSE,
 * nothing done); once per host.
 */
ES_EXPORT ES_ANY_THREAD int es_host_shutdown(es_host *host, es_error *err);

/**
 * Immediate close, then free: stop accepting; commands not yet decided
 * and queries not yet run are completed with ES_ECLOSED; a commit already running finishes and its
 * commands get their real outcome, queued commits are dropped and their
 * commands completed with ES_ECLOSED.  No snapshot is written.  Every
 * accepted command still gets exactly one completion before this returns.
 * NULL is a no-op.  Returns 0, or ES_EMISUSE from a host thread (nothing
 * done).  Thread: as es_host_shutdown.
 */
ES_EXPORT ES_ANY_THREAD int es_host_close(es_host *host);

/* ---- commands ---- */

/**
 * Send a command to the aggregate `aggregate_id` of `type`, asynchronously.
 * On success (0) the command was accepted and `done` will be called exactly
 * once with its outcome.  On failure done is never called: ES_EBUSY (the
 * mailbox, the host or the resident bound is full: try later), ES_ECLOSED
 * (host shutting down), ES_EINVAL (NULL argument, nil aggregate or
 * command id, type not registered), ES_ENOMEM.  A key stored under
 * another type is accepted and completed with ES_EWRONGTYPE (its load
 * finds the other type); the actor of a failed load is not kept, so it
 * never stands in the way of commands of the key's real type.  The command is
 * copied.  Never blocks on a full queue.  Thread: any, also from decide
 * and from completion callbacks.
 */
ES_EXPORT ES_ANY_THREAD int es_host_send(es_host *host,
                                         const es_aggregate_type *type,
                                         const es_uuid *aggregate_id,
                                         const es_command *command,
                                         es_host_done_fn done, void *ud,
                                         es_error *err);

/**
 * The outcome of es_host_call, owned by the caller (es_host_reply_free).
 * Same fields as es_host_result, with copies of the events.
 */
typedef struct es_host_reply {
    int status;        /**< as es_host_result.status */
    bool duplicate;    /**< as es_host_result.duplicate */
    uint64_t version;  /**< as es_host_result.version */
    es_event *events;  /**< copies; payloads owned by the reply */
    size_t n_events;   /**< number of events */
    char reason[256];  /**< as es_host_result.reason, truncated */
} es_host_reply;

/** Free a reply.  NULL is a no-op.  Thread: any. */
ES_EXPORT ES_ANY_THREAD void es_host_reply_free(es_host_reply *reply);

/**
 * Send a command and wait for its outcome.  Returns the outcome's status
 * (as es_host_result.status) or es_host_send's error; *out (may be NULL if
 * not wanted) receives the reply whenever the command was accepted, else
 * NULL (also when copying the reply ran out of memory: ES_ENOMEM).  Thread: any, also from decide and completion callbacks (the
 * worker then runs other aggregates while it waits), except to the very
 * aggregate whose decide or callback is running: ES_EMISUSE.  A cycle of
 * blocking calls between aggregates deadlocks; use es_host_send there.
 */
ES_EXPORT ES_ANY_THREAD int es_host_call(es_host *host,
                                         const es_aggregate_type *type,
                                         const es_uuid *aggregate_id,
                                         const es_command *command,
                                         es_host_reply **out, es_error *err);

/* ---- queries ---- */

/**
 * A query function: reads the aggregate's state on the worker running
 * the aggregate.  state is the aggregate's state (never NULL: a key
 * without events is answered ES_ENOTFOUND without calling it) and version
 * its last event's version, both borrowed for the call: copy out what
 * you need, keep no pointer into state, never modify it.  Its return
 * value becomes the completion's status: return 0, or a negative
 * es_status of your choice (say ES_ENOMEM when a copy failed).  Thread:
 * a worker thread, never concurrently with the aggregate's decide or its
 * other queries.  It may send commands and queries to other keys (also
 * blocking, es_host_call and es_host_query_call), never a blocking one
 * to its own key (ES_EMISUSE).
 */
typedef int (*es_query_fn)(void *ud, const void *state, uint64_t version);

/** The outcome of one query, handed to its completion.  A borrowed view,
 *  valid until the completion returns. */
typedef struct es_query_result {
    /** The query function's return (0 when it returned 0), or:
     *  ES_ENOTFOUND (the key has no event), ES_EWRONGTYPE (the key is
     *  stored under another aggregate type), ES_EFORGOTTEN (the aggregate
     *  was forgotten, es_pg_forget_aggregate, and the query loaded it: an
     *  aggregate resident when it was forgotten is answered from memory
     *  until it is loaded again), ES_ECLOSED (the host was
     *  closed before the query ran, or ended while the database could not
     *  be reached), or a store error loading it (ES_EDB, ES_ENOMEM,
     *  ES_EDECODE, ES_EDECRYPT).  The query function ran only when
     *  version is not ES_HOST_NO_VERSION. */
    int status;
    /** The version the query function saw; ES_HOST_NO_VERSION when it
     *  did not run. */
    uint64_t version;
    /** Why it failed (an error message); "" on success.  Never NULL. */
    const char *reason;
    es_uuid aggregate_id; /**< the aggregate queried */
} es_query_result;

/**
 * Query completion: called exactly once for each query es_host_query
 * accepted, after the query function returned (or instead of it).
 * Thread: a worker thread of the host, or the thread running
 * es_host_close / es_host_shutdown for ES_ECLOSED.  It may send commands
 * and queries, as a command's completion may.
 */
typedef void (*es_query_done_fn)(void *ud, const es_query_result *result);

/**
 * Query the aggregate `aggregate_id` of `type`, asynchronously: `fn` runs
 * on the aggregate's state on the worker running the aggregate, then
 * `done` is called with the status.  A query is an item of the
 * aggregate's mailbox like a command, in the same order: it runs after
 * every command sent to the key before it has been decided and its
 * outcome is known (committed or failed: while commands decided before it
 * are being committed, the query waits for their outcome, and the
 * commands sent after the query wait for it).  So the query sees exactly
 * the committed effects of the commands sent before it, never an
 * uncommitted event, and in particular every command whose completion
 * was called before es_host_query was (read-your-writes); it sees none
 * of the commands sent after it.  A resident aggregate is answered
 * without reading the store; one that is not is loaded (snapshot and
 * events) and stays resident as for a command.  A query never writes,
 * never produces events and is not a command: no command id, no
 * idempotency, nothing recorded; a key without events is not kept
 * resident by it.
 *
 * On success (0) `done` will be called exactly once (it may be NULL).  On
 * failure neither fn nor done is called: ES_EBUSY (the mailbox, the host
 * or the resident bound is full, counted with the commands: try later),
 * ES_ECLOSED (host stopping or ending), ES_EINVAL (NULL host, id or fn,
 * nil aggregate id, type not registered), ES_ENOMEM.  ES_ENOTFOUND,
 * ES_EWRONGTYPE, ES_EFORGOTTEN and store errors come in the completion.
 * ud and done_ud are the caller's and must stay valid until done returns.
 * Never blocks.  Thread: any, also from decide, query functions and
 * completion callbacks.
 */
ES_EXPORT ES_ANY_THREAD int es_host_query(es_host *host,
                                          const es_aggregate_type *type,
                                          const es_uuid *aggregate_id,
                                          es_query_fn fn, void *ud,
                                          es_query_done_fn done,
                                          void *done_ud, es_error *err);

/**
 * Query and wait: es_host_query, then wait for its completion.  Returns
 * its status (as es_query_result.status: fn's return, ES_ENOTFOUND, ...)
 * or es_host_query's error; err (may be NULL) gets the reason of a
 * failure.  fn runs on a worker thread while the caller waits, so it may
 * write into memory the caller passed in ud without a lock.  Thread: any,
 * also from decide, query functions and completion callbacks (the worker
 * then runs other aggregates while it waits), except to the very
 * aggregate whose decide, query function or callback is running:
 * ES_EMISUSE.  A cycle of blocking calls between aggregates deadlocks.
 */
ES_EXPORT ES_ANY_THREAD int es_host_query_call(es_host *host,
                                               const es_aggregate_type *type,
                                               const es_uuid *aggregate_id,
                                               es_query_fn fn, void *ud,
                                               es_error *err);

/* ---- metrics ---- */

/** Latency of one stage, in microseconds (from a histogram with about 3%
 *  resolution). */
typedef struct es_host_latency {
    uint64_t count;  /**< values recorded */
    double p50_us;   /**< median */
    double p99_us;   /**< 99th percentile */
    double p999_us;  /**< 99.9th percentile */
    double max_us;   /**< largest value */
} es_host_latency;

/** A snapshot of the host's counters (since es_host_open). */
typedef struct es_host_metrics {
    uint64_t accepted;     /**< es_host_send returned 0 */
    uint64_t completed;    /**< completions called (any status) */
    uint64_t rejected;     /**< completions with ES_EREJECTED or ES_EAPPLY */
    uint64_t duplicate;    /**< answered from an earlier command id */
    uint64_t conflicts;    /**< command commits that conflicted */
    uint64_t busy;         /**< sends and queries answered ES_EBUSY */
    uint64_t resident;     /**< aggregates in memory now */
    uint64_t loads;        /**< aggregates loaded from the store */
    uint64_t passivations; /**< aggregates passivated */
    uint64_t mailbox_depth; /**< commands and queries accepted, not yet
                                 taken by a worker */
    uint64_t batches;      /**< commit transactions */
    uint64_t snapshots;    /**< snapshots written */
    es_host_latency queue_wait;  /**< accepted -> taken by a worker */
    es_host_latency load;        /**< one aggregate load */
    es_host_latency decide;      /**< decide and apply */
    es_host_latency commit_wait; /**< handed to the committer -> outcome */
    es_host_latency total;       /**< accepted -> completion called */
    /* Added with es_host_query, at the end.  The caller allocates this
     * struct, so its size changed: by the ABI rule (README.md) a change
     * for the major version (still 0); code built with the older header
     * must be rebuilt.  The fields above keep their offsets. */
    uint64_t queries;      /**< es_host_query returned 0 */
    es_host_latency query; /**< query accepted -> completion called */
} es_host_metrics;

/** Fill *out with the current metrics.  Returns 0 or ES_EINVAL.
 *  Thread: any. */
ES_EXPORT ES_ANY_THREAD int es_host_metrics_get(es_host *host,
                                                es_host_metrics *out);

#ifdef __cplusplus
}
#endif
#endif
