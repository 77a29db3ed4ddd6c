/*
 * The host's private header: struct es_host and the contract between the
 * files of src/host/.  Never installed.
 *
 * The host: actors with bounded mailboxes on a worker pool, commit lanes
 * that write many actors' events per transaction, all on the commit loop
 * (a libevent event_base on a thread of the host's; on PostgreSQL each
 * lane is a non-blocking connection), an I/O thread running a libevent
 * event_base (the host's own thread, or the embedder's loop) for the
 * timers and passivation, and one snapshot writer on a connection of its
 * own (never a lane's, never the pool's on PostgreSQL), which writes only
 * the latest of several snapshots of one aggregate.
 * An actor's items always go to the same lane (by a hash of its key), so
 * a lane commits them in the order they were decided, and lanes never
 * share an aggregate.  A lane waits out a database that cannot be
 * reached (it keeps its batch and tries again with backoff) until the
 * host ends; meanwhile commands queue up to the host bound.
 *
 * An actor (one aggregate) is "scheduled" while it sits in the run queue or
 * a worker runs it; only that worker touches its state, so commands of one
 * key are decided one at a time, in arrival order.  Decided commands are
 * pipelined: their events are applied at once and their commit items are
 * queued to their commit lane, which posts every item back to its actor as
 * a result; the actor completes the command there (on a worker), or, when
 * the commit failed, waits for its other items in flight, drops its state
 * (the next command loads it again from the store) and decides the
 * returned commands again, in their order, before its mailbox.  The lane
 * fails, unwritten, every item of an actor decided on a state that lost
 * events (epoch <= broken_epoch).
 *
 * The files:
 *   config.c     es_host_config_*, the registered types
 *   shard.c      the shards: hash table of resident actors, LRU of idle ones
 *   send.c       es_host_send: accept a command into a mailbox
 *   query.c      es_host_query: a read of the state, queued like a command
 *   complete.c   completions: a command's outcome to its callback
 *   actor.c      an actor's state: load, compact, expand, drop
 *   emit.c       the emitter (es_emit) and applying what decide emitted
 *   worker.c     the run queue and the worker threads: deciding, results
 *   lanes.c      the commit lanes on the commit loop
 *   snapshots.c  snapshot jobs and the snapshot writer thread
 *   loop.c       the I/O loop: timers, parked actors, passivation
 *   call.c       es_host_call, es_host_query_call and their
 *                process-wide waiter pool
 *   host.c       life cycle (open, shutdown, close) and metrics
 *
 * Locks (none is ever held while taking another, except where said, and
 * no user code runs under any of them):
 *   shard->lock       the shard's hash table and LRU list; each actor's
 *                     mailbox, results, inflight count, scheduled flag,
 *                     LRU links
 *   host->rq.lock     the run queue
 *   lane->lock        one commit lane's queue and its kicked flag (the
 *                     rest of a lane is the commit loop's thread's alone)
 *   host->hk.lock     actors evicted by es_host_send, parked actors, the
 *                     retry timer; then libevent's lock of the I/O base
 *                     (event_add under hk.lock)
 *   host->sw.lock     snapshot jobs for the snapshot writer, its flags
 *   host->drain_lock  only to wait for the last completion at close
 *   waiters_lock      (call.c) the process-wide free list of waiters
 */
#ifndef ES_HOST_HOST_INT_H
#define ES_HOST_HOST_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "core/context_internal.h"
#include "core/internal.h"
#include "eventastic/host.h"
#include "host/committer.h"
#include "host/metrics.h"
#include "store/store_impl.h"

struct event;
struct event_base;

#define MAX_TYPES 64
#define N_SHARDS 64
#define MAX_NESTED 16 /* actors run by one thread inside blocking calls */

typedef struct htype {
    const es_aggregate_type *type;
    es_decide_fn decide;
    void *user;
} htype;

struct es_host_config {
    unsigned workers;
    size_t mailbox_bound, host_bound, resident_bound, batch_rows;
    unsigned lanes; /* 0: chosen by the store */
    uint64_t idle_ms, snap_every, resident_bytes, snap_slow_load_us;
    int64_t command_retention_ms; /* 0: command ids kept for ever */
    bool snap_on_passivation;
    struct event_base *base; /* the embedder's, or NULL: our own */
    size_t n_types;
    htype types[MAX_TYPES];
};

typedef struct actor actor;
typedef struct hcmd hcmd;
typedef struct shard shard;

/* A query's callbacks, in the payload of its hcmd. */
typedef struct hquery {
    es_query_fn fn;
    void *ud;
    es_query_done_fn done;
    void *done_ud;
} hquery;

/* An accepted command, from es_host_send to its completion; or a query
 * (query set, its hquery in the payload), from es_host_query to its
 * completion, which only ever sits in a mailbox. */
struct hcmd {
    hcmd *next;  /* mailbox, pending, bounced or dups list */
    hcmd *qnext; /* a worker's submit list, lane queue, results */
    hcmd *dups;  /* same id and content, waiting for this one's outcome */
    actor *actor;
    es_host_done_fn done;
    void *ud;
    es__commit_item item;
    uint64_t epoch;
    uint64_t t_accept, t_handoff;
    uint8_t *snap; /* encoded state to store once the item commits */
    char *reason;  /* a rejection waiting for its record to commit */
    size_t snap_len;
    uint64_t snap_at;
    int attempts;
    bool maybe_own; /* a commit of it had an unknown outcome */
    bool query;     /* a query, not a command */
    es_uuid id;
    int32_t kind;
    size_t len;
    uint8_t payload[]; /* len bytes */
};

/* Kept small: one per resident aggregate (bench: resident_memory). */
struct actor {
    es_uuid id;
    const htype *ht;
    shard *sh;
    /* shard lock */
    actor *hnext; /* the shard's hash chain */
    hcmd *mb_head, *mb_tail;
    hcmd *res_head, *res_tail;
    /* LRU list (shard lock) while idle; next links the run queue (its
     * lock) while scheduled, and the evicted list after eviction. */
    actor *prev, *next;
    uint64_t last_used;
    uint32_t mb_n;
    uint32_t inflight; /* items at its lane or in results */
    bool scheduled, in_lru;
    /* the worker running the actor */
    bool loaded, broken;
    /* the worker running the actor: parked (its load could not reach
     * the database; this turn ends, the loop schedules it again) and the
     * backoff of its next load (0: its last load reached the database).
     * In the padding before broken_epoch: the actor does not grow. */
    bool parked;
    /* the worker running the actor (host_end once the workers are
     * gone): a failed commit dropped the state (actor_rebuild), no load
     * since; the passivation snapshot may be owed (see load_owed).  Also
     * in the padding. */
    bool snap_owed;
    uint16_t park_ms;
    /* written by the commit loop (lane_post), read by the worker */
    atomic_uint_least64_t broken_epoch;
    /* the worker running the actor: the state is either in ctx (while
     * running) or compacted in state and version (idle) */
    es_context *ctx;
    void *state;
    uint64_t version;
    uint64_t epoch;
    uint64_t folded_at_snapshot; /* events folded into the last snapshot */
    hcmd *pend_head, *pend_tail; /* decided, outcome not processed yet */
    hcmd *bnc_head, *bnc_tail;   /* to decide again after the rebuild */
};

/* A shard of the key space: a chained hash table of its actors (a
 * tsearch tree cost 32 bytes and a log(n) memcmp walk per lookup; see the
 * commit) and the LRU list of its idle ones. */
struct shard {
    pthread_mutex_t lock;
    actor **buckets;
    size_t n_buckets; /* 0 or a power of two */
    actor *lru_head, *lru_tail;
    size_t resident;
};

/* A commit lane: a queue of items, written a batch at a time on the
 * host's commit loop. */
typedef struct lane {
    es_host *host;
    pthread_mutex_t lock;
    hcmd *head, *tail; /* queued by workers */
    bool kicked;       /* kick_ev activated, not yet found the queue empty */
    /* the commit loop's thread only: */
    bool busy;      /* a batch is being written */
    bool waiting;   /* ... and waits for retry_ev */
    bool last_try;  /* ... for the last time: the host ends */
    hcmd *batch;    /* its commands */
    es__commit_item **live; /* its items to write */
    size_t k, cap;
    unsigned delay; /* the next backoff, ms */
    uint64_t seed;  /* the lane's: jitter of its backoff */
    struct event *kick_ev, *retry_ev;
    es__batch_lane *bl; /* the store's asynchronous writer, or NULL */
    void *conn;     /* the synchronous writer's connection */
} lane;

typedef struct snap_job {
    struct snap_job *next;
    es_snapshot snap; /* data points behind the job */
} snap_job;

/* Items decided by one turn of an actor, not yet handed to its lane. */
typedef struct submit {
    hcmd *head, *tail;
    uint32_t n;
} submit;

struct es_host {
    /* Set at open, read-only after: any thread. */
    es_store *store;
    es_host_config cfg;
    bool has_commands;
    /* Look command ids up only when the commit finds them taken (a store
     * whose batch writer checks them in the batch), not before deciding:
     * the lookup was three round trips per command on a worker. */
    bool lazy_ids;
    size_t shard_bound;
    /* Each under its own lock (shard.c). */
    shard shards[N_SHARDS];

    /* The run queue (worker.c): actors scheduled to run, linked by next.
     * All of it under rq.lock; workers wait on rq.cond. */
    struct {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        actor *head, *tail;
        bool stop;
    } rq;

    /* The commit loop (lanes.c): the lanes' events, on its own thread.
     * Made at open and freed at close by the opening/closing thread;
     * between, the loop's thread alone runs its events (others only
     * activate them). */
    struct {
        lane *lanes;
        unsigned n_lanes;
        struct event_base *base;
        struct event *stop_ev; /* activated: stop the commit loop */
        struct event *end_ev;  /* activated: the host ends */
        pthread_t thread;
        bool started;
    } commit;

    /* Housekeeping for the I/O loop (loop.c), all under hk.lock: actors
     * evicted by es_host_send, passivated on the loop; parked actors
     * (linked by next, due time in last_used) and when the retry timer is
     * due (0: not armed).  Lock order: hk.lock, then libevent's lock of
     * the base (event_add under hk.lock). */
    struct {
        pthread_mutex_t lock;
        actor *evicted;
        actor *parked;
        uint64_t retry_due;
    } hk;

    /* The I/O loop (loop.c): its events are made at open and deleted at
     * close; with our own base, the io thread runs it.  The events are
     * run on the loop's thread; other threads only add or activate them
     * (libevent's pthread locks). */
    struct {
        struct event_base *base;
        bool own_base;
        struct event *sweep_ev; /* persistent: idle passivation (idle_ms) */
        struct event *flush_ev; /* one-shot: snapshots queued, write them */
        struct event *wake_ev;  /* activated: es_host_send evicted an actor */
        struct event *stop_ev;  /* activated: our own loop, stop it */
        struct event *retry_ev; /* one-shot: parked actors due, run them */
        pthread_t thread;
        bool started;
    } io;

    /* The snapshot writer (snapshots.c).  Under sw.lock: the jobs;
     * flush_armed (the loop's flush timer is pending), flush (it fired:
     * the writer, waiting on sw.cond, takes the jobs), stop.  conn is the
     * writer's connection (its thread's; the closing thread's once it has
     * stopped); thread and started belong to the opening/closing
     * thread. */
    struct {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        snap_job *head, *tail;
        size_t n;
        bool flush_armed, flush, stop;
        void *conn;
        pthread_t thread;
        bool started;
    } sw;

    /* Life cycle (host.c): atomics read by any thread. */
    pthread_mutex_t drain_lock;
    pthread_cond_t drain_cond;
    atomic_bool closing, closing_now;
    /* es_host_shutdown or es_host_close has begun: lanes stop waiting
     * for a database that cannot be reached (es_host_stop does not) */
    atomic_bool ending;
    atomic_size_t pending;

    /* The worker threads: the opening/closing thread's. */
    pthread_t *workers;
    unsigned n_workers;

    /* Metrics: relaxed atomics, any thread. */
    atomic_uint_least64_t accepted, completed, rejected, duplicate, conflicts,
        busy, resident, loads, passivations, mailbox_depth, batches,
        snapshots, queries;
    es__hist h_queue, h_load, h_decide, h_commit, h_total, h_query;
};

struct es_emitter {
    const es_aggregate_type *type;
    const es_uuid *aggregate_id;
    bool active, rejected;
    int failed; /* first es_emit error */
    struct enc_event {
        es_uuid id;
        int32_t kind;
        es_buf buf;
    } *ev; /* first `one`, then an allocation when more are emitted */
    size_t n, cap;
    struct enc_event one[2]; /* most commands emit one or two events */
    char reason[256];
};

/* ---- threads (worker.c) ---- */

/* Which host this thread serves, and the actors it runs (nested when a
 * blocking call helps while it waits).  Set by each of the host's
 * threads for itself. */
extern _Thread_local es_host *es__host_tls;
extern _Thread_local const actor *es__host_tls_stack[MAX_NESTED];
extern _Thread_local int es__host_tls_depth;

static inline void metric_add(atomic_uint_least64_t *c, uint64_t n)
{
    atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

static inline void metric_sub(atomic_uint_least64_t *c, uint64_t n)
{
    atomic_fetch_sub_explicit(c, n, memory_order_relaxed);
}

/* An absolute CLOCK_REALTIME deadline ns from now, for timed waits. */
static inline void deadline_in(struct timespec *ts, uint64_t ns)
{
    clock_gettime(CLOCK_REALTIME, ts);
    uint64_t t = (uint64_t)ts->tv_nsec + ns;
    ts->tv_sec += (time_t)(t / 1000000000u);
    ts->tv_nsec = (long)(t % 1000000000u);
}

/* ---- config.c ---- */

/* The registration of type, or NULL.  Any thread. */
const htype *es__host_find_type(const es_host *host,
                                const es_aggregate_type *type);

/* ---- shard.c: every function with sh->lock held ---- */

uint64_t es__host_key_hash(const es_uuid *id);
shard *es__host_shard_of(es_host *host, const es_uuid *id);
actor *es__host_shard_find(shard *sh, const es_uuid *id, const htype *ht);
int es__host_shard_insert(shard *sh, actor *a);
void es__host_lru_append(shard *sh, actor *a);
bool es__host_schedule_locked(shard *sh, actor *a);
void es__host_unlink_actor(es_host *host, shard *sh, actor *a);

/* ---- send.c ---- */

/* Count one more item in the host (closing, host bound): 0, or
 * ES_ECLOSED / ES_EBUSY with err set and nothing counted. */
int es__host_admit(es_host *host, es_error *err);
/* Put the admitted item h (its aggregate_id set) into the mailbox of its
 * actor, made if need be.  On failure h is freed and the admission
 * undone: ES_EBUSY, ES_ENOMEM with err set.  Any thread. */
int es__host_enqueue(es_host *host, const htype *ht, hcmd *h, es_error *err);

/* ---- query.c: the worker running the actor ---- */

/* Run the query h (taken from a's mailbox, nothing pending: the state
 * is committed) and complete it, or park it with a. */
void es__host_run_query(es_host *host, actor *a, hcmd *h);
/* Complete the query h with status, then free it. */
void es__host_query_complete(es_host *host, hcmd *h, int status,
                             uint64_t version, const char *reason);

/* ---- worker.c ---- */

/* h (command or query) back to the head of a's mailbox and a parked:
 * its load could not reach the database.  A host ending completes h
 * with ES_ECLOSED instead. */
void es__host_park_item(es_host *host, actor *a, hcmd *h);

void es__host_runq_push(es_host *host, actor *a);
void es__host_runq_push_list(es_host *host, actor *head, actor *tail,
                             size_t n);
actor *es__host_runq_pop(es_host *host, bool wait);
/* Run a scheduled actor for one turn.  Thread: a worker (or a thread
 * helping inside es_host_call). */
void es__host_run_actor(es_host *host, actor *a);
void *es__host_worker_main(void *arg);

/* ---- complete.c: a worker, or the closing thread ---- */

void es__host_free_item_data(hcmd *h);
void es__host_pending_done(es_host *host);
void es__host_complete(es_host *host, hcmd *h, int status, uint64_t version,
                       const es_event *events, size_t n, const char *reason,
                       bool duplicate);
void es__host_complete_error(es_host *host, hcmd *h, int status,
                             uint64_t version, const char *reason);

/* ---- actor.c: the worker running the actor ---- */

uint64_t es__host_actor_version(const actor *a);
const void *es__host_actor_state(const actor *a);
void es__host_actor_compact(actor *a);
int es__host_actor_expand(actor *a);
void es__host_actor_drop_state(actor *a);
int es__host_actor_load(es_host *host, actor *a, es_error *err);

/* ---- emit.c: the worker running the actor ---- */

void es__host_emitter_free(es_emitter *em);
int es__host_apply_emitted(actor *a, es_emitter *em, es_error *err);

/* ---- snapshots.c ---- */

void es__host_snap_enqueue(es_host *host, snap_job *j);
snap_job *es__host_snap_of(const actor *a);
int es__host_snap_write(es_host *host, snap_job *list, es_error *err);
void es__host_snap_free(snap_job *jobs);
void *es__host_snap_writer_main(void *arg);

/* ---- lanes.c ---- */

void es__host_lane_push(es_host *host, actor *a, submit *sub);
int es__host_commit_setup(es_host *host, es_error *err);
void es__host_commit_teardown(es_host *host);
void *es__host_commit_main(void *arg);

/* ---- loop.c ---- */

/* libevent's pthread locks, set up once per process: 0 or -1. */
int es__host_evthread(void);
void es__host_passivate(es_host *host, actor *a, bool snapshot,
                        snap_job **jobs);
void es__host_park(es_host *host, actor *a);
actor *es__host_unpark_locked(es_host *host, uint64_t now, bool all,
                              actor **tail, size_t *n);
int es__host_io_setup(es_host *host);
void es__host_io_teardown(es_host *host);
void *es__host_io_main(void *arg);

#endif
