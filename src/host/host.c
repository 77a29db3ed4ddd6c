/*
 * The aggregate host: actors with bounded mailboxes on a worker pool,
 * commit lanes that write many actors' events per transaction, all on the
 * commit loop (a libevent event_base on a thread of the host's; on
 * PostgreSQL each lane is a non-blocking connection), an I/O thread
 * running a libevent event_base (the host's own thread, or the embedder's
 * loop) for the timers and passivation, and one
 * snapshot writer on a connection of its own (never a lane's, never the
 * pool's on PostgreSQL), which writes only the latest of several
 * snapshots of one aggregate.
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
 * queued to the committer, which posts every item back to its actor as a
 * result; the actor completes the command there (on a worker), or, when
 * the commit failed, waits for its other items in flight, drops its state
 * (the next command loads it again from the store) and decides the
 * returned commands again, in their order, before its mailbox.  The
 * committer fails, unwritten, every item of an actor decided on a state
 * that lost events (epoch <= broken_epoch).
 *
 * Locks (none is ever held while taking another, and no user code runs
 * under any of them):
 *   shard->lock    the shard's hash table and LRU list; each actor's
 *                  mailbox, results, inflight count, scheduled flag, LRU
 *                  links
 *   host->rq_lock  the run queue
 *   lane->lock     one commit lane's queue and its kicked flag (the rest
 *                  of a lane is the commit loop's thread's alone)
 *   host->hk_lock  actors evicted by es_host_send, for the loop
 *   host->sw_lock  snapshot jobs for the snapshot writer, its flags
 *   host->drain_lock  only to wait for the last completion at close
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>
#include <event2/thread.h>

#include "core/backoff.h"
#include "core/context_internal.h"
#include "core/internal.h"
#include "eventastic/host.h"
#include "host/committer.h"
#include "host/metrics.h"
#include "store/store_impl.h"

#define MAX_TYPES 64
#define N_SHARDS 64
#define RUN_BUDGET 64   /* commands per turn of an actor, for fairness */
#define MAX_ATTEMPTS 4  /* decisions of one command whose commit failed */
#define MAX_NESTED 16   /* actors run by one thread inside blocking calls */
#define MAX_SNAP_JOBS 65536
#define LANES_DEFAULT 2 /* commit lanes on a store with a batch writer */
/* The snapshot writer's pace: the loop's flush timer fires this long
 * after the first snapshot was queued, so that several snapshots of one
 * aggregate coalesce into one write. */
#define FLUSH_MS 100
/* A load cut off from the database: the actor is parked and its load
 * tried again after this backoff (doubling, jittered, capped). */
#define LOAD_BACKOFF_MIN_MS 10
#define LOAD_BACKOFF_MAX_MS 1000
/* A parked actor due within this of now is run: the retry timer may fire
 * a little early by es__now_ns (libevent adds a timeout to the loop's
 * cached time), and without it the loop would arm again for a few us. */
#define RETRY_SLACK_NS 1000000u

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

/* An accepted command, from es_host_send to its completion. */
struct hcmd {
    hcmd *next;  /* mailbox, pending, bounced or dups list */
    hcmd *qnext; /* a worker's submit list, committer queue, results */
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
    uint32_t inflight; /* items at the committer or in results */
    bool scheduled, in_lru;
    /* the worker running the actor */
    bool loaded, broken;
    /* the worker running the actor: parked (its load could not reach
     * the database; this turn ends, the loop schedules it again) and the
     * backoff of its next load (0: its last load reached the database).
     * In the padding before broken_epoch: the actor does not grow. */
    bool parked;
    /* the worker running the actor (host_end once the workers are
     * gone): a failed commit dropped the state (rebuild), no load since;
     * the passivation snapshot may be owed (see load_owed).  Also in
     * the padding. */
    bool snap_owed;
    uint16_t park_ms;
    /* written by the committer, read by the worker */
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

struct es_host {
    es_store *store;
    es_host_config cfg;
    bool has_commands;
    /* Look command ids up only when the commit finds them taken (a store
     * whose batch writer checks them in the batch), not before deciding:
     * the lookup was three round trips per command on a worker. */
    bool lazy_ids;
    size_t shard_bound;
    shard shards[N_SHARDS];

    pthread_mutex_t rq_lock;
    pthread_cond_t rq_cond;
    actor *rq_head, *rq_tail;
    bool rq_stop;

    struct lane *lanes;
    unsigned n_lanes;
    /* The commit loop: the lanes' events, on its own thread. */
    struct event_base *cbase;
    struct event *cstop_ev;     /* activated: stop the commit loop */
    struct event *lanes_end_ev; /* activated: the host ends */
    pthread_t commit_thread;
    bool commit_started;

    /* hk_lock: actors evicted by es_host_send, passivated on the loop;
     * parked actors (linked by next, due time in last_used) and when the
     * retry timer is due (0: not armed).  Lock order: hk_lock, then
     * libevent's lock of the base (event_add under hk_lock). */
    pthread_mutex_t hk_lock;
    actor *evicted;
    actor *parked;
    uint64_t retry_due;

    /* The I/O loop: its events are made at open and deleted at close;
     * with our own base, the io thread runs it. */
    struct event_base *base;
    bool own_base;
    struct event *sweep_ev; /* persistent: idle passivation (idle_ms) */
    struct event *flush_ev; /* one-shot: snapshots queued, write them */
    struct event *wake_ev;  /* activated: es_host_send evicted an actor */
    struct event *stop_ev;  /* activated: our own loop, stop it */
    struct event *retry_ev; /* one-shot: parked actors due, run them */
    pthread_t io_thread;
    bool io_started;

    /* sw_lock: the snapshot jobs; flush_armed (the loop's flush timer is
     * pending), sw_flush (it fired: the writer, waiting on sw_cond, takes
     * the jobs), sw_stop. */
    pthread_mutex_t sw_lock;
    pthread_cond_t sw_cond;
    snap_job *sj_head, *sj_tail;
    size_t sj_n;
    bool flush_armed, sw_flush, sw_stop;
    /* the snapshot writer's connection (its thread's; the closing thread's
     * once it has stopped) */
    void *snap_conn;

    pthread_mutex_t drain_lock;
    pthread_cond_t drain_cond;
    atomic_bool closing, closing_now;
    /* es_host_shutdown or es_host_close has begun: lanes stop waiting
     * for a database that cannot be reached (es_host_stop does not) */
    atomic_bool ending;
    atomic_size_t pending;

    pthread_t *workers;
    unsigned n_workers;
    pthread_t snap_writer;
    bool snap_writer_started;

    atomic_uint_least64_t accepted, completed, rejected, duplicate, conflicts,
        busy, resident, loads, passivations, mailbox_depth, batches,
        snapshots;
    es__hist h_queue, h_load, h_decide, h_commit, h_total;
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

/* Which host this thread serves, and the actors it runs (nested when a
 * blocking call helps while it waits). */
static _Thread_local es_host *tls_host;
static _Thread_local const actor *tls_stack[MAX_NESTED];
static _Thread_local int tls_depth;

static void count(atomic_uint_least64_t *c, uint64_t n)
{
    atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

static void uncount(atomic_uint_least64_t *c, uint64_t n)
{
    atomic_fetch_sub_explicit(c, n, memory_order_relaxed);
}

/* ---- configuration ---- */

int es_host_config_new(es_host_config **out, es_error *err)
{
    if (out == NULL) return es__error_set(err, ES_EINVAL, "out is NULL");
    es_host_config *c = es__calloc(1, sizeof *c);
    if (c == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    c->workers = 2;
    c->mailbox_bound = 1024;
    c->host_bound = 1000000;
    c->resident_bound = 100000;
    c->batch_rows = 1024;
    c->idle_ms = 60000;
    c->snap_every = 100;
    c->snap_on_passivation = true;
    c->snap_slow_load_us = 10000;
    *out = c;
    return 0;
}

void es_host_config_free(es_host_config *cfg) { es__free(cfg); }

int es_host_config_set_workers(es_host_config *cfg, unsigned n)
{
    if (cfg == NULL || n < 1 || n > 256) return ES_EINVAL;
    cfg->workers = n;
    return 0;
}

int es_host_config_set_mailbox_bound(es_host_config *cfg, size_t n)
{
    if (cfg == NULL || n < 1) return ES_EINVAL;
    cfg->mailbox_bound = n;
    return 0;
}

int es_host_config_set_host_bound(es_host_config *cfg, size_t n)
{
    if (cfg == NULL || n < 1) return ES_EINVAL;
    cfg->host_bound = n;
    return 0;
}

int es_host_config_set_resident_bound(es_host_config *cfg, size_t n)
{
    if (cfg == NULL || n < 1) return ES_EINVAL;
    cfg->resident_bound = n;
    return 0;
}

int es_host_config_set_resident_bytes(es_host_config *cfg, uint64_t bytes)
{
    if (cfg == NULL) return ES_EINVAL;
    cfg->resident_bytes = bytes;
    return 0;
}

int es_host_config_set_idle_ms(es_host_config *cfg, uint64_t ms)
{
    if (cfg == NULL) return ES_EINVAL;
    cfg->idle_ms = ms;
    return 0;
}

int es_host_config_set_command_retention(es_host_config *cfg, int64_t ms)
{
    if (cfg == NULL || ms < 0 || ms > INT64_MAX / 2) return ES_EINVAL;
    cfg->command_retention_ms = ms;
    return 0;
}

int es_host_config_set_snapshots(es_host_config *cfg, uint64_t every_events,
                                 bool on_passivation)
{
    if (cfg == NULL) return ES_EINVAL;
    cfg->snap_every = every_events;
    cfg->snap_on_passivation = on_passivation;
    return 0;
}

int es_host_config_set_snapshot_slow_load(es_host_config *cfg,
                                          uint64_t micros)
{
    if (cfg == NULL) return ES_EINVAL;
    cfg->snap_slow_load_us = micros;
    return 0;
}

int es_host_config_set_lanes(es_host_config *cfg, unsigned n)
{
    if (cfg == NULL || n > 64) return ES_EINVAL;
    cfg->lanes = n;
    return 0;
}

int es_host_config_set_batch_rows(es_host_config *cfg, size_t rows)
{
    if (cfg == NULL || rows < 1) return ES_EINVAL;
    cfg->batch_rows = rows;
    return 0;
}

int es_host_config_set_event_base(es_host_config *cfg,
                                  struct event_base *base)
{
    if (cfg == NULL) return ES_EINVAL;
    cfg->base = base;
    return 0;
}

int es_host_config_add_type(es_host_config *cfg,
                            const es_aggregate_type *type,
                            es_decide_fn decide, void *user, es_error *err)
{
    if (cfg == NULL || decide == NULL)
        return es__error_set(err, ES_EINVAL, "config and decide are "
                                             "required");
    int rc = es_aggregate_type_check(type, err);
    if (rc != 0) return rc;
    for (size_t i = 0; i < cfg->n_types; i++)
        if (cfg->types[i].type == type ||
            strcmp(cfg->types[i].type->name, type->name) == 0)
            return es__error_set(err, ES_EINVAL, "type '%s' is already "
                                 "registered", type->name);
    if (cfg->n_types == MAX_TYPES)
        return es__error_set(err, ES_EINVAL, "at most %d types",
                             MAX_TYPES);
    cfg->types[cfg->n_types++] = (htype){type, decide, user};
    return 0;
}

static const htype *find_type(const es_host *host,
                              const es_aggregate_type *type)
{
    for (size_t i = 0; i < host->cfg.n_types; i++)
        if (host->cfg.types[i].type == type) return &host->cfg.types[i];
    return NULL;
}

/* ---- small lists ---- */

static uint64_t key_hash(const es_uuid *id)
{
    uint64_t a, b;
    memcpy(&a, id->bytes, 8);
    memcpy(&b, id->bytes + 8, 8);
    uint64_t h = (a ^ (b * 0x9e3779b97f4a7c15u)) * 0xff51afd7ed558ccdu;
    return h ^ (h >> 29);
}

static shard *shard_of(es_host *host, const es_uuid *id)
{
    return &host->shards[(key_hash(id) >> 40) % N_SHARDS];
}

/* Shard lock held.  An actor is found by key and type: a command of
 * another type never joins the mailbox of a resident actor (nor is it
 * refused because of one); its own actor's load answers ES_EWRONGTYPE
 * when the store holds the key under the first type. */
static actor *shard_find(shard *sh, const es_uuid *id, const htype *ht)
{
    if (sh->n_buckets == 0) return NULL;
    actor *a = sh->buckets[key_hash(id) & (sh->n_buckets - 1)];
    while (a && (a->ht != ht || !es_uuid_equal(&a->id, id))) a = a->hnext;
    return a;
}

/* Shard lock held.  Grows the table to keep chains short; a failed
 * growth only makes chains longer. */
static int shard_insert(shard *sh, actor *a)
{
    if (sh->resident + 1 > sh->n_buckets) {
        size_t n = sh->n_buckets ? sh->n_buckets * 2 : 16;
        actor **b = es__calloc(n, sizeof *b);
        if (b == NULL && sh->n_buckets == 0) return ES_ENOMEM;
        if (b != NULL) {
            for (size_t i = 0; i < sh->n_buckets; i++) {
                actor *x = sh->buckets[i];
                while (x) {
                    actor *next = x->hnext;
                    size_t j = key_hash(&x->id) & (n - 1);
                    x->hnext = b[j];
                    b[j] = x;
                    x = next;
                }
            }
            es__free(sh->buckets);
            sh->buckets = b;
            sh->n_buckets = n;
        }
    }
    size_t j = key_hash(&a->id) & (sh->n_buckets - 1);
    a->hnext = sh->buckets[j];
    sh->buckets[j] = a;
    return 0;
}

/* Shard lock held. */
static void shard_remove(shard *sh, actor *a)
{
    actor **p = &sh->buckets[key_hash(&a->id) & (sh->n_buckets - 1)];
    while (*p != a) p = &(*p)->hnext;
    *p = a->hnext;
    a->hnext = NULL;
}

static void lru_unlink(shard *sh, actor *a)
{
    if (!a->in_lru) return;
    if (a->prev) a->prev->next = a->next;
    else sh->lru_head = a->next;
    if (a->next) a->next->prev = a->prev;
    else sh->lru_tail = a->prev;
    a->prev = a->next = NULL;
    a->in_lru = false;
}

static void lru_append(shard *sh, actor *a)
{
    a->prev = sh->lru_tail;
    a->next = NULL;
    if (sh->lru_tail) sh->lru_tail->next = a;
    else sh->lru_head = a;
    sh->lru_tail = a;
    a->in_lru = true;
}

/* Shard lock held.  True when the caller must push a to the run queue. */
static bool schedule_locked(shard *sh, actor *a)
{
    if (a->scheduled) return false;
    a->scheduled = true;
    lru_unlink(sh, a);
    return true;
}

/* Shard lock held: take a resident, idle actor out of the shard. */
static void unlink_actor(es_host *host, shard *sh, actor *a)
{
    lru_unlink(sh, a);
    shard_remove(sh, a);
    sh->resident--;
    uncount(&host->resident, 1);
}

static void runq_push(es_host *host, actor *a)
{
    pthread_mutex_lock(&host->rq_lock);
    a->next = NULL;
    if (host->rq_tail) host->rq_tail->next = a;
    else host->rq_head = a;
    host->rq_tail = a;
    pthread_cond_signal(&host->rq_cond);
    pthread_mutex_unlock(&host->rq_lock);
}

/* Push a list of actors (linked by next) with one lock. */
static void runq_push_list(es_host *host, actor *head, actor *tail, size_t n)
{
    pthread_mutex_lock(&host->rq_lock);
    if (host->rq_tail) host->rq_tail->next = head;
    else host->rq_head = head;
    host->rq_tail = tail;
    if (n == 1) pthread_cond_signal(&host->rq_cond);
    else pthread_cond_broadcast(&host->rq_cond);
    pthread_mutex_unlock(&host->rq_lock);
}

/* Next actor to run; with wait, blocks until one or the stop. */
static actor *runq_pop(es_host *host, bool wait)
{
    pthread_mutex_lock(&host->rq_lock);
    while (wait && host->rq_head == NULL && !host->rq_stop)
        pthread_cond_wait(&host->rq_cond, &host->rq_lock);
    actor *a = host->rq_head;
    if (a) {
        host->rq_head = a->next;
        if (host->rq_head == NULL) host->rq_tail = NULL;
    }
    pthread_mutex_unlock(&host->rq_lock);
    return a;
}

static void deadline_in(struct timespec *ts, uint64_t ns)
{
    clock_gettime(CLOCK_REALTIME, ts);
    uint64_t t = (uint64_t)ts->tv_nsec + ns;
    ts->tv_sec += (time_t)(t / 1000000000u);
    ts->tv_nsec = (long)(t % 1000000000u);
}

/* ---- completions ---- */

static void free_item_data(hcmd *h)
{
    for (size_t i = 0; i < h->item.n_events; i++)
        es__free((void *)h->item.events[i].data);
    es__free(h->item.events);
    for (size_t i = 0; i < h->item.n_side_effects; i++)
        es__free((void *)h->item.side_effects[i].data);
    es__free(h->item.side_effects);
    es__free(h->snap);
    es__free(h->reason);
    h->reason = NULL;
    h->item.record.reason = NULL;
    h->item.record.rejected = false;
    h->item.events = NULL;
    h->item.side_effects = NULL;
    h->item.n_events = h->item.n_side_effects = 0;
    h->snap = NULL;
}

static void pending_done(es_host *host)
{
    if (atomic_fetch_sub(&host->pending, 1) == 1 &&
        atomic_load(&host->closing)) {
        pthread_mutex_lock(&host->drain_lock);
        pthread_cond_broadcast(&host->drain_cond);
        pthread_mutex_unlock(&host->drain_lock);
    }
}

/* Counted before the callback, so a caller woken by it sees the counts. */
static void finish(es_host *host, hcmd *h, const es_host_result *r)
{
    count(&host->completed, 1);
    if (r->status == ES_EREJECTED || r->status == ES_EAPPLY)
        count(&host->rejected, 1);
    if (r->duplicate) count(&host->duplicate, 1);
    es__hist_record(&host->h_total, es__now_ns() - h->t_accept);
    if (h->done) h->done(h->ud, r);
}

/* Call the completion of h and of its duplicates, then free them all. */
static void complete(es_host *host, hcmd *h, int status, uint64_t version,
                     const es_event *events, size_t n, const char *reason,
                     bool duplicate)
{
    es_host_result r;
    memset(&r, 0, sizeof r);
    r.status = status;
    r.duplicate = duplicate;
    r.version = version;
    r.events = status == 0 ? events : NULL;
    r.n_events = status == 0 ? n : 0;
    r.reason = reason ? reason : "";
    r.aggregate_id = h->item.aggregate_id;
    r.command_id = h->id;
    finish(host, h, &r);
    hcmd *d = h->dups;
    r.duplicate = true;
    size_t done = 1;
    while (d) {
        hcmd *next = d->next;
        finish(host, d, &r);
        es__free(d);
        d = next;
        done++;
    }
    free_item_data(h);
    es__free(h);
    while (done-- > 0) pending_done(host);
}

static void complete_error(es_host *host, hcmd *h, int status,
                           uint64_t version, const char *reason)
{
    complete(host, h, status, version, NULL, 0,
             reason && reason[0] ? reason : es_strerror(status), false);
}

static uint64_t actor_version(const actor *a)
{
    if (a->ctx) return es_context_version(a->ctx);
    return a->state ? a->version : ES_HOST_NO_VERSION;
}

static const void *actor_state(const actor *a)
{
    return a->ctx ? es_context_state(a->ctx) : a->state;
}

/* Idle: keep the state without its context. */
static void actor_compact(actor *a)
{
    if (a->ctx == NULL) return;
    a->state = es__context_release(a->ctx, &a->version);
    a->ctx = NULL;
}

/* Running: a context around the state (none before the first event). */
static int actor_expand(actor *a)
{
    if (a->ctx != NULL || a->state == NULL) return 0;
    a->ctx = es__context_adopt(a->ht->type, &a->id, a->version, a->state);
    if (a->ctx == NULL) return ES_ENOMEM;
    a->state = NULL;
    return 0;
}

static void actor_drop_state(actor *a)
{
    es_context_free(a->ctx);
    a->ctx = NULL;
    if (a->state) {
        if (a->ht->type->state_free) a->ht->type->state_free(a->state);
        es__free(a->state);
        a->state = NULL;
    }
}

/* ---- the emitter ---- */

int es_emit(es_emitter *em, const void *event)
{
    if (em == NULL || event == NULL || !em->active) return ES_EINVAL;
    const es_aggregate_type *t = em->type;
    int rc = 0;
    es_uuid id = t->event_id(event);
    if (es_uuid_is_nil(&id)) rc = ES_EINVAL;
    if (em->ev == NULL) { /* a malloc per command saved */
        em->ev = em->one;
        em->cap = sizeof em->one / sizeof em->one[0];
    }
    if (rc == 0 && em->n == em->cap) {
        size_t cap = em->cap * 2;
        struct enc_event *more =
            em->cap > SIZE_MAX / 2 / sizeof *more
                ? NULL
                : es__malloc(cap * sizeof *more);
        if (more == NULL) {
            rc = ES_ENOMEM;
        } else {
            memcpy(more, em->ev, em->n * sizeof *more);
            if (em->ev != em->one) es__free(em->ev);
            em->ev = more;
            em->cap = cap;
        }
    }
    if (rc == 0) {
        struct enc_event *e = &em->ev[em->n];
        memset(e, 0, sizeof *e);
        e->id = id;
        e->kind = t->event_kind(event);
        es_error inner = {0};
        rc = t->event_encode(event, &e->buf, &inner);
        if (rc != 0) {
            es_buf_free(&e->buf);
            rc = rc < 0 ? rc : ES_EINVAL;
        } else {
            em->n++;
        }
    }
    if (rc != 0 && em->failed == 0) em->failed = rc;
    return rc;
}

int es_emit_reject(es_emitter *em, const char *fmt, ...)
{
    if (em == NULL || !em->active) return ES_EREJECTED;
    em->rejected = true;
    if (fmt != NULL) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(em->reason, sizeof em->reason, fmt, ap);
        va_end(ap);
    }
    return ES_EREJECTED;
}

const es_uuid *es_emit_aggregate_id(const es_emitter *em)
{
    return em ? em->aggregate_id : NULL;
}

static void emitter_free(es_emitter *em)
{
    for (size_t i = 0; i < em->n; i++) es_buf_free(&em->ev[i].buf);
    if (em->ev != em->one) es__free(em->ev);
}

/* Apply what decide emitted to the actor's context; all or nothing. */
static int apply_emitted(actor *a, es_emitter *em, es_error *err)
{
    if (em->n == 0) return 0;
    const es_aggregate_type *t = a->ht->type;
    int rc = actor_expand(a);
    if (rc != 0) return es__error_set(err, rc, "out of memory");
    bool had = a->ctx != NULL;
    es_context *backup = NULL;
    if (em->n > 1 && had && (rc = es_context_clone(a->ctx, &backup, err)))
        return rc;
    /* small event values on the stack: a malloc per command saved */
    _Alignas(max_align_t) unsigned char small[256];
    void *value = t->event_size <= sizeof small
                      ? memset(small, 0, t->event_size)
                      : es__calloc(1, t->event_size);
    if (value == NULL) rc = es__error_set(err, ES_ENOMEM, "out of memory");
    for (size_t i = 0; rc == 0 && i < em->n; i++) {
        const struct enc_event *e = &em->ev[i];
        es_event view = {e->id, 0, e->kind, e->buf.data, e->buf.len};
        rc = es_event_decode(t, &view, value, err);
        if (rc != 0) break;
        if (a->ctx == NULL)
            rc = es_context_record_new(t, &a->id, value, &a->ctx, err);
        else
            rc = es_context_record(a->ctx, value, err);
        es_event_value_free(t, value);
        memset(value, 0, t->event_size);
    }
    if (value != small) es__free(value);
    if (rc != 0 && (em->n > 1 || !had)) {
        es_context_free(a->ctx);
        a->ctx = backup;
        backup = NULL;
    }
    es_context_free(backup);
    return rc;
}

/* ---- snapshots ---- */

static snap_job *snap_job_new(const es_uuid *id, uint64_t version,
                              uint64_t snapshot_version, const uint8_t *data,
                              size_t len)
{
    snap_job *j = es__malloc(sizeof *j + len);
    if (j == NULL) return NULL;
    uint8_t *copy = (uint8_t *)(j + 1);
    if (len > 0) memcpy(copy, data, len);
    j->next = NULL;
    j->snap = (es_snapshot){*id, version, snapshot_version, copy, len};
    return j;
}

/* Queue a list of jobs for the snapshot writer.  It is not woken: the
 * first job arms the loop's flush timer, which wakes it FLUSH_MS later,
 * so that several snapshots of one aggregate coalesce and a worker
 * completing a command never waits on it.  event_add is thread-safe on a
 * base with libevent's pthread locks. */
static void snap_enqueue(es_host *host, snap_job *j)
{
    bool arm = false;
    while (j) {
        snap_job *next = j->next;
        j->next = NULL;
        pthread_mutex_lock(&host->sw_lock);
        bool full = host->sj_n >= MAX_SNAP_JOBS;
        if (!full) {
            if (host->sj_tail) host->sj_tail->next = j;
            else host->sj_head = j;
            host->sj_tail = j;
            host->sj_n++;
            if (!host->flush_armed) arm = host->flush_armed = true;
        }
        pthread_mutex_unlock(&host->sw_lock);
        if (full) es__free(j); /* a cache: drop rather than grow */
        j = next;
    }
    if (arm && host->flush_ev != NULL) {
        struct timeval tv = {FLUSH_MS / 1000, FLUSH_MS % 1000 * 1000};
        event_add(host->flush_ev, &tv);
    }
}

typedef struct snap_ref {
    snap_job *j;
    size_t seq; /* queue order */
} snap_ref;

static int snap_ref_cmp(const void *pa, const void *pb)
{
    const snap_ref *a = pa, *b = pb;
    int c = memcmp(a->j->snap.aggregate_id.bytes, b->j->snap.aggregate_id.bytes,
                   16);
    if (c != 0) return c;
    if (a->j->snap.version != b->j->snap.version)
        return a->j->snap.version < b->j->snap.version ? -1 : 1;
    return a->seq < b->seq ? -1 : a->seq > b->seq;
}

/* Keep only the latest snapshot of each aggregate (highest version, then
 * the last queued), in aggregate id order: one row write per aggregate,
 * and hosts sharing a database update the rows in the same order.  Out
 * of memory: the list as it is. */
static snap_job *snap_coalesce(snap_job *list)
{
    size_t n = 0;
    for (snap_job *j = list; j; j = j->next) n++;
    if (n < 2) return list;
    snap_ref *refs = es__calloc(n, sizeof *refs);
    if (refs == NULL) return list;
    n = 0;
    for (snap_job *j = list; j; j = j->next, n++) refs[n] = (snap_ref){j, n};
    qsort(refs, n, sizeof *refs, snap_ref_cmp);
    snap_job *head = NULL, **tail = &head;
    for (size_t i = 0; i < n; i++) {
        if (i + 1 < n && es_uuid_equal(&refs[i].j->snap.aggregate_id,
                                       &refs[i + 1].j->snap.aggregate_id)) {
            es__free(refs[i].j); /* a later one follows */
            continue;
        }
        *tail = refs[i].j;
        tail = &refs[i].j->next;
    }
    *tail = NULL;
    es__free(refs);
    return head;
}

/* Encode the actor's state; NULL when it cannot. */
static snap_job *snap_of(const actor *a)
{
    const es_aggregate_type *t = a->ht->type;
    es_buf buf = {0};
    es_error inner = {0};
    if (t->state_encode(actor_state(a), &buf, &inner) != 0) {
        es_buf_free(&buf);
        return NULL;
    }
    snap_job *j = snap_job_new(&a->id, actor_version(a),
                               t->snapshot_version, buf.data, buf.len);
    es_buf_free(&buf);
    return j;
}

/* Write and free a list of snapshots in one transaction.  Returns 0 or
 * the store's error. */
static int write_snapshots(es_host *host, snap_job *list, es_error *err)
{
    if (list == NULL) return 0;
    int rc = 0;
    uint64_t n = 0;
    list = snap_coalesce(list);
    /* The connection may have died meanwhile (the store then drops it):
     * one more try on a fresh one before giving up. */
    for (int attempt = 0; attempt < 2; attempt++) {
        es_txn *txn = NULL;
        n = 0;
        rc = es__store_begin_background(host->store, &host->snap_conn, &txn,
                                        err);
        for (snap_job *j = list; rc == 0 && j; j = j->next, n++)
            rc = es_txn_store_snapshot(txn, &j->snap, err);
        if (txn) {
            if (rc == 0) rc = es_txn_commit(txn, err);
            else es_txn_rollback(txn);
        }
        if (rc != ES_EDB) break;
    }
    if (rc == 0) count(&host->snapshots, n);
    while (list) {
        snap_job *next = list->next;
        es__free(list);
        list = next;
    }
    return rc;
}

/* Free an actor nobody can reach any more; with a snapshot job on the
 * list when the policy wants one. */
static void passivate(es_host *host, actor *a, bool snapshot,
                      snap_job **jobs)
{
    if (snapshot && host->cfg.snap_on_passivation &&
        actor_version(a) != ES_HOST_NO_VERSION &&
        actor_version(a) + 1 > a->folded_at_snapshot) {
        snap_job *j = snap_of(a);
        if (j) {
            j->next = *jobs;
            *jobs = j;
        }
    }
    actor_drop_state(a);
    es__free(a);
    count(&host->passivations, 1);
}

/* ---- the worker side of an actor ---- */

static int load_actor(es_host *host, actor *a, es_error *err)
{
    uint64_t t0 = es__now_ns();
    es_context *ctx = NULL;
    int rc = 0;
    /* A load only reads: one cut by a lost connection is tried again on
     * a fresh connection (twice), instead of failing the command. */
    for (int attempt = 0; attempt < 3; attempt++) {
        memset(err, 0, sizeof *err);
        rc = es_store_load(host->store, a->ht->type, &a->id, &ctx, err);
        if (rc != ES_EDB || !es__unreachable(err)) break;
    }
    uint64_t took = es__now_ns() - t0;
    count(&host->loads, 1);
    es__hist_record(&host->h_load, took);
    if (rc == ES_ENOTFOUND) rc = 0;
    if (rc != ES_EDB || !es__unreachable(err)) a->park_ms = 0;
    if (rc != 0) return rc;
    a->ctx = ctx;
    a->loaded = true;
    a->snap_owed = false;
    a->folded_at_snapshot = ctx ? es_context_version(ctx) + 1 : 0;
    /* A slow load replayed many events: snapshot the (committed) state. */
    uint64_t slow = host->cfg.snap_slow_load_us;
    if (ctx && slow > 0 && took / 1000u >= slow) {
        snap_job *j = snap_of(a);
        if (j) snap_enqueue(host, j);
    }
    return 0;
}

typedef struct collect {
    es_event *ev;
    size_t n, want;
} collect;

static int collect_event(void *ud, const es_event *ev)
{
    collect *c = ud;
    uint8_t *data = es__memdup(ev->data, ev->len);
    if (data == NULL) return ES_ENOMEM;
    c->ev[c->n] = *ev;
    c->ev[c->n++].data = data;
    return c->n == c->want ? 1 : 0;
}

/* A command id the store knows: answer the original outcome or
 * ES_EIDEMPOTENCY.  Returns true when h was completed. */
/* A command whose commit had an unknown outcome and whose read-back
 * failed too is still unknown: never report it failed (promise 1). */
static int truth(const hcmd *h, int rc)
{
    return h->maybe_own && rc != ES_EIDEMPOTENCY ? ES_EUNKNOWN : rc;
}

/* The database could not be reached to load a or to look h up before
 * deciding it: wait the outage out without holding this worker.  h goes
 * back to the head of the mailbox (per-key order) and the actor is
 * parked (run_actor ends its turn; the loop's retry timer runs it again
 * after the backoff).  A host ending completes h instead: ES_ECLOSED. */
static void park_command(es_host *host, actor *a, hcmd *h)
{
    a->park_ms = (uint16_t)es__backoff_grow(a->park_ms, LOAD_BACKOFF_MIN_MS,
                                            LOAD_BACKOFF_MAX_MS);
    if (atomic_load(&host->ending)) {
        complete_error(host, h, truth(h, ES_ECLOSED), ES_HOST_NO_VERSION,
                       "host ended while the database could not be "
                       "reached to load the aggregate or look the "
                       "command up");
        return;
    }
    pthread_mutex_lock(&a->sh->lock);
    h->next = a->mb_head;
    a->mb_head = h;
    if (a->mb_tail == NULL) a->mb_tail = h;
    a->mb_n++;
    pthread_mutex_unlock(&a->sh->lock);
    count(&host->mailbox_depth, 1);
    a->parked = true;
}

/* may_park: before a load (the actor is not loaded), a lookup that
 * cannot reach the database parks h like a load would. */
static bool answer_from_store(es_host *host, actor *a, hcmd *h,
                              bool may_park)
{
    es_error err = {0};
    es_txn *txn = NULL;
    int rc = es_store_begin(host->store, &txn, &err);
    if (rc != 0) {
        if (may_park && rc == ES_EDB && es__unreachable(&err)) {
            park_command(host, a, h);
            return true;
        }
        complete_error(host, h, truth(h, rc), actor_version(a), err.message);
        return true;
    }
    es__command_record *rec = NULL;
    rc = es__txn_get_command(txn, &h->id, &rec, &err);
    if (rc == ES_ENOTFOUND) {
        es_txn_rollback(txn);
        return false;
    }
    if (rc != 0) {
        es_txn_rollback(txn);
        if (may_park && rc == ES_EDB && es__unreachable(&err)) {
            park_command(host, a, h);
            return true;
        }
        complete_error(host, h, truth(h, rc), actor_version(a), err.message);
        return true;
    }
    if (!es_uuid_equal(&rec->aggregate_id, &a->id) ||
        !es__command_matches(rec, h->kind, h->payload, h->len)) {
        es_txn_rollback(txn);
        es__free(rec);
        complete_error(host, h, ES_EIDEMPOTENCY, actor_version(a),
                       "command id already used with other content or "
                       "for another aggregate");
        return true;
    }
    /* A command whose own commit came back unknown finds its own outcome
     * here: not a duplicate.  Any other finds what an earlier send of the
     * id wrote: one decided again because its commit found the id taken
     * (lazy_ids), or because another item of its batch failed (its own
     * writes rolled back with it), is a duplicate too. */
    bool dup = !h->maybe_own;
    if (rec->rejected && rec->forgotten) {
        /* Its reason was sealed with the aggregate's data key, since
         * destroyed (crypto-shredding): the aggregate is gone, and so is
         * the reason. */
        es_txn_rollback(txn);
        complete_error(host, h, truth(h, ES_EFORGOTTEN), actor_version(a),
                       "aggregate was forgotten: the command was rejected, "
                       "its reason is destroyed");
        es__free(rec);
        return true;
    }
    if (rec->rejected) {
        es_txn_rollback(txn);
        complete(host, h, ES_EREJECTED, rec->version, NULL, 0,
                 rec->reason ? rec->reason : "", dup);
        es__free(rec);
        return true;
    }
    collect c = {NULL, 0, (size_t)rec->event_count};
    if (c.want > 0) {
        c.ev = es__calloc(c.want, sizeof *c.ev);
        rc = c.ev == NULL
                 ? ES_ENOMEM
                 : es__txn_stream(txn, a->ht->type->name, &a->id,
                                  rec->first_version, collect_event, &c,
                                  &err);
        if (rc == 1) rc = 0;
        if (rc == 0 && c.n != c.want) rc = ES_EDECODE;
    }
    es_txn_rollback(txn);
    if (rc == 0)
        complete(host, h, 0, rec->version, c.ev, c.n, "", dup);
    else if (rc == ES_EWRONGTYPE) /* the same command, to another type */
        complete_error(host, h, rc, ES_HOST_NO_VERSION, err.message);
    else if (rc == ES_EFORGOTTEN) /* committed; its data key destroyed */
        complete_error(host, h, ES_EFORGOTTEN, actor_version(a),
                       "aggregate was forgotten: the command was accepted, "
                       "its events are destroyed");
    else /* the record says it committed: never answer a failure */
        complete_error(host, h, ES_EUNKNOWN, actor_version(a),
                       "committed, but its events could not be read back");
    for (size_t i = 0; i < c.n; i++) es__free((void *)c.ev[i].data);
    es__free(c.ev);
    es__free(rec);
    return true;
}

static bool same_content(const hcmd *a, const hcmd *b)
{
    return a->kind == b->kind && a->len == b->len &&
           (a->len == 0 || memcmp(a->payload, b->payload, a->len) == 0);
}

typedef struct submit {
    hcmd *head, *tail;
    uint32_t n;
} submit;

static void enqueue_item(es_host *host, actor *a, hcmd *h, submit *sub,
                         uint64_t t_decided);

/* Decide one command; on success its item joins the submit list. */
static void process_command(es_host *host, actor *a, hcmd *h, submit *sub)
{
    uint64_t t0 = es__now_ns();
    if (h->attempts == 0) es__hist_record(&host->h_queue, t0 - h->t_accept);
    if (atomic_load(&host->closing_now)) {
        complete_error(host, h, ES_ECLOSED, actor_version(a),
                       "host closed");
        return;
    }
    /* Idempotency: in flight here first, then the store. */
    for (hcmd *p = a->pend_head; p; p = p->next) {
        if (!es_uuid_equal(&p->id, &h->id)) continue;
        if (!same_content(p, h)) {
            complete_error(host, h, ES_EIDEMPOTENCY, actor_version(a),
                           "command id already used with other content");
            return;
        }
        h->next = p->dups;
        p->dups = h;
        return;
    }
    /* Ending while the database could not be reached: no more tries
     * (after the first command of an actor parked or cut off now). */
    if (!a->loaded && a->park_ms != 0 && atomic_load(&host->ending)) {
        complete_error(host, h, truth(h, ES_ECLOSED), ES_HOST_NO_VERSION,
                       "host ended while the database could not be "
                       "reached to load the aggregate or look the "
                       "command up");
        return;
    }
    if (host->has_commands && (!host->lazy_ids || h->attempts > 0) &&
        answer_from_store(host, a, h, !a->loaded))
        return;
    es_error err = {0};
    bool loaded_now = !a->loaded;
    if (!a->loaded) {
        int rc = load_actor(host, a, &err);
        if (rc == ES_EDB && es__unreachable(&err)) {
            park_command(host, a, h);
            return;
        }
        if (rc != 0) {
            complete_error(host, h, truth(h, rc), ES_HOST_NO_VERSION,
                           err.message);
            return;
        }
    }

    const es_aggregate_type *t = a->ht->type;
    es_emitter em;
    memset(&em, 0, sizeof em);
    em.type = t;
    em.aggregate_id = &a->id;
    em.active = true;
    es_command cmd = {h->id, h->kind, h->len ? h->payload : NULL, h->len};
    /* Clock reads were 6% of the host bench: t0 still holds unless a
     * load or a store lookup came between. */
    bool waited = loaded_now || !host->lazy_ids || h->attempts > 0;
    uint64_t td = waited ? es__now_ns() : t0;
    int rc = a->ht->decide(a->ht->user, actor_state(a), &cmd, &em);
    em.active = false;
    if (rc != 0 || em.rejected || em.failed != 0) {
        /* A rejection is an outcome (promise 3) and is recorded like one;
         * a decide that failed (an error, not es_emit_reject) is not:
         * deciding again may succeed. */
        bool rejection = em.rejected && em.failed == 0 &&
                         (rc == 0 || rc == ES_EREJECTED);
        char reason[256];
        if (em.reason[0])
            snprintf(reason, sizeof reason, "%s", em.reason);
        else
            snprintf(reason, sizeof reason, "decide failed: %s",
                     es_status_name(rc ? rc : em.failed));
        emitter_free(&em);
        uint64_t t_rejected = es__now_ns();
        es__hist_record(&host->h_decide, t_rejected - td);
        /* A command accepted before may be rejected on today's state:
         * its original outcome wins. */
        if (host->has_commands && host->lazy_ids && h->attempts == 0 &&
            answer_from_store(host, a, h, false))
            return;
        if (!rejection || !host->has_commands) {
            complete_error(host, h, ES_EREJECTED, actor_version(a), reason);
            return;
        }
        /* Answered once its record committed, after the items before it:
         * it may have been decided on their events. */
        h->reason = es__strdup(reason);
        if (h->reason == NULL) {
            complete_error(host, h, ES_ENOMEM, actor_version(a),
                           "out of memory");
            return;
        }
        enqueue_item(host, a, h, sub, t_rejected);
        return;
    }
    rc = apply_emitted(a, &em, &err);
    emitter_free(&em);
    uint64_t t_decided = es__now_ns();
    es__hist_record(&host->h_decide, t_decided - td);
    if (rc != 0) {
        if (host->has_commands && host->lazy_ids && h->attempts == 0 &&
            rc != ES_ENOMEM && answer_from_store(host, a, h, false))
            return;
        complete_error(host, h, rc == ES_ENOMEM ? rc : ES_EAPPLY,
                       actor_version(a), err.message);
        return;
    }
    if (a->ctx)
        es__context_take(a->ctx, &h->item.events, &h->item.n_events,
                         &h->item.side_effects, &h->item.n_side_effects);
    enqueue_item(host, a, h, sub, t_decided);
}

/* Make h's commit item (its events, if any, are in it already; a
 * rejection has h->reason) and put it on the pending and submit lists;
 * t_decided: when its decide ended (the commit wait starts there). */
static void enqueue_item(es_host *host, actor *a, hcmd *h, submit *sub,
                         uint64_t t_decided)
{
    const es_aggregate_type *t = a->ht->type;
    es__commit_item *it = &h->item;
    uint64_t v = actor_version(a);
    it->type_name = t->name;
    it->group = a;
    it->status = ES__COMMIT_PENDING;
    it->why = NULL;
    it->record = (es__command_record){h->id, a->id, h->kind, h->payload,
                                      h->len,
                                      it->n_events ? it->events[0].version
                                                   : v,
                                      it->n_events, v, false,
                                      h->reason != NULL, h->reason, false};
    if (host->cfg.snap_every > 0 && it->n_events > 0 &&
        v + 1 - a->folded_at_snapshot >= host->cfg.snap_every) {
        snap_job *j = snap_of(a);
        if (j) { /* kept as a job until the item commits */
            h->snap = (uint8_t *)j;
            a->folded_at_snapshot = v + 1;
        }
    }
    h->epoch = a->epoch;
    h->t_handoff = t_decided;
    h->next = NULL;
    if (a->pend_tail) a->pend_tail->next = h;
    else a->pend_head = h;
    a->pend_tail = h;
    h->qnext = NULL;
    if (sub->tail) sub->tail->qnext = h;
    else sub->head = h;
    sub->tail = h;
    sub->n++;
}

/* The lane of an aggregate: fixed, so its items are committed in order. */
static lane *lane_of(es_host *host, const actor *a)
{
    uint64_t h = 1469598103934665603u; /* FNV-1a over the key */
    for (int i = 0; i < 16; i++) {
        h ^= a->id.bytes[i];
        h *= 1099511628211u;
    }
    return &host->lanes[h % host->n_lanes];
}

/* Hand the decided items to the actor's commit lane (its loop is woken
 * by an event, once until it finds the queue empty). */
static void lane_push(es_host *host, actor *a, submit *sub)
{
    lane *l = lane_of(host, a);
    pthread_mutex_lock(&l->lock);
    if (l->tail) l->tail->qnext = sub->head;
    else l->head = sub->head;
    l->tail = sub->tail;
    bool kick = !l->kicked;
    l->kicked = true;
    pthread_mutex_unlock(&l->lock);
    memset(sub, 0, sizeof *sub);
    if (kick) event_active(l->kick_ev, 0, 0);
}

static void flush(es_host *host, actor *a, submit *sub)
{
    if (sub->n == 0) return;
    pthread_mutex_lock(&a->sh->lock);
    a->inflight += sub->n;
    pthread_mutex_unlock(&a->sh->lock);
    lane_push(host, a, sub);
}

static bool retryable(int status)
{
    return status == ES_ECONFLICT || status == ES_EIDEMPOTENCY ||
           status == ES_EUNKNOWN;
}

/* Outcomes from the committer, in the order the actor decided them. */
static void process_results(es_host *host, actor *a, hcmd *list)
{
    uint64_t now = es__now_ns();
    while (list) {
        hcmd *h = list;
        list = h->qnext;
        /* h is the oldest pending item */
        a->pend_head = h->next;
        if (a->pend_head == NULL) a->pend_tail = NULL;
        h->next = NULL;
        es__hist_record(&host->h_commit, now - h->t_handoff);
        int st = h->item.status;
        if (st == 0) {
            if (h->snap) {
                snap_enqueue(host, (snap_job *)(void *)h->snap);
                h->snap = NULL;
            }
            if (h->item.record.rejected)
                complete(host, h, ES_EREJECTED, h->item.record.version,
                         NULL, 0, h->reason, false);
            else
                complete(host, h, 0, h->item.record.version,
                         h->item.events, h->item.n_events, "", false);
            continue;
        }
        a->broken = true;
        if (st == ES_ECONFLICT) count(&host->conflicts, 1);
        if (st == ES_EUNKNOWN) h->maybe_own = true;
        if (retryable(st) && ++h->attempts < MAX_ATTEMPTS &&
            !atomic_load(&host->closing_now)) {
            free_item_data(h);
            if (a->bnc_tail) a->bnc_tail->next = h;
            else a->bnc_head = h;
            a->bnc_tail = h;
            continue;
        }
        complete_error(host, h, st, ES_HOST_NO_VERSION,
                       st == ES_ECONFLICT ? "commit kept conflicting"
                                          : h->item.why);
    }
}

/* All items of a broken actor are back: drop the state (loaded again on
 * the next command) and decide the returned commands again first. */
static void rebuild(es_host *host, actor *a)
{
    /* Committed events may not be in a snapshot yet (a failed item may
     * even have taken the every-N turn): passivation at shutdown loads
     * the state again to write one, unless a command loads it first. */
    if (actor_version(a) != ES_HOST_NO_VERSION) a->snap_owed = true;
    actor_drop_state(a);
    a->loaded = false;
    a->broken = false;
    a->epoch++;
    if (a->bnc_head == NULL) return;
    size_t n = 0;
    for (hcmd *h = a->bnc_head; h; h = h->next) n++;
    pthread_mutex_lock(&a->sh->lock);
    a->bnc_tail->next = a->mb_head;
    a->mb_head = a->bnc_head;
    if (a->mb_tail == NULL) a->mb_tail = a->bnc_tail;
    a->mb_n += n;
    pthread_mutex_unlock(&a->sh->lock);
    count(&host->mailbox_depth, n);
    a->bnc_head = a->bnc_tail = NULL;
}

/* Jitter of the load backoff: between half and all of ms, in ns. */
static uint64_t jittered_ns(const actor *a, unsigned ms)
{
    uint64_t seed = (es__now_ns() ^ key_hash(&a->id)) | 1u;
    return (uint64_t)es__backoff_jitter(&seed, ms) * 1000000u;
}

/* Arm the retry timer for due (hk_lock held) unless it is armed already
 * for that time or earlier.  Returns false when there is no timer (it
 * could not be added): the caller runs the actors at once rather than
 * leave them parked with nothing to wake them.  retry_due records only a
 * timer that is pending, or one that fired and whose on_retry has yet to
 * take hk_lock (it then arms for what is left). */
static bool arm_retry_locked(es_host *host, uint64_t due, uint64_t now)
{
    if (host->retry_due != 0 && host->retry_due <= due) return true;
    if (host->retry_ev == NULL) return false;
    uint64_t us = due > now ? (due - now) / 1000u : 0;
    struct timeval tv = {(time_t)(us / 1000000u),
                         (suseconds_t)(us % 1000000u)};
    if (event_add(host->retry_ev, &tv) != 0) return false;
    host->retry_due = due;
    return true;
}

/* The worker's last touch of a parked actor: it stays scheduled (so
 * es_host_send does not queue it and it is never passivated) and the
 * loop's retry timer puts it back on the run queue when its backoff is
 * over.  A host ending runs it at once: its commands complete. */
static void park(es_host *host, actor *a)
{
    uint64_t now = es__now_ns();
    uint64_t due = now + jittered_ns(a, a->park_ms);
    /* One lock for the list and the timer: on_retry either sees a on the
     * list or runs after the timer is armed for it. */
    pthread_mutex_lock(&host->hk_lock);
    bool now_run = atomic_load(&host->ending) ||
                   !arm_retry_locked(host, due, now);
    if (!now_run) {
        a->last_used = due;
        a->next = host->parked;
        host->parked = a;
    }
    pthread_mutex_unlock(&host->hk_lock);
    if (now_run) runq_push(host, a);
}

/* Take the parked actors due by now (all with all) off the list (hk_lock
 * held) and arm the timer for the earliest of the others; returns the
 * actors taken, linked by next, their number in *n.  The timer fired, or
 * is ignored (all): whatever it was armed for is forgotten. */
static actor *unpark_locked(es_host *host, uint64_t now, bool all,
                            actor **tail, size_t *n)
{
    actor *head = NULL, **pp = &host->parked;
    *tail = NULL;
    *n = 0;
    host->retry_due = 0;
    uint64_t next_due = 0;
    while (*pp) {
        actor *a = *pp;
        if (all || a->last_used <= now + RETRY_SLACK_NS) {
            *pp = a->next;
            a->next = NULL;
            if (*tail) (*tail)->next = a;
            else head = a;
            *tail = a;
            (*n)++;
            continue;
        }
        if (next_due == 0 || a->last_used < next_due) next_due = a->last_used;
        pp = &a->next;
    }
    if (next_due != 0 && !arm_retry_locked(host, next_due, now)) {
        /* no timer: the others run now too */
        if (*tail) (*tail)->next = host->parked;
        else head = host->parked;
        for (actor *a = host->parked; a; a = a->next) {
            *tail = a;
            (*n)++;
        }
        host->parked = NULL;
    }
    return head;
}

/* Loop, when the first parked actor is due: run the due ones again. */
static void on_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    es_host *host = arg;
    actor *tail = NULL;
    size_t n = 0;
    pthread_mutex_lock(&host->hk_lock);
    actor *head = unpark_locked(host, es__now_ns(), false, &tail, &n);
    pthread_mutex_unlock(&host->hk_lock);
    if (head) runq_push_list(host, head, tail, n);
}

static void run_actor(es_host *host, actor *a)
{
    shard *sh = a->sh;
    submit sub = {NULL, NULL, 0};
    int budget = RUN_BUDGET;
    tls_stack[tls_depth++] = a;
    for (;;) {
        /* One lock a turn: results first, else the next command; when
         * there is neither, the decided items are counted in flight here
         * (before the lane can answer them) and handed over below. */
        if (!a->broken && atomic_load(&a->broken_epoch) >= a->epoch)
            a->broken = true;
        hcmd *h = NULL;
        bool hand_over = false;
        pthread_mutex_lock(&sh->lock);
        hcmd *res = a->res_head;
        a->res_head = a->res_tail = NULL;
        if (res == NULL && !a->broken && a->mb_head && budget > 0) {
            h = a->mb_head;
            a->mb_head = h->next;
            if (a->mb_head == NULL) a->mb_tail = NULL;
            a->mb_n--;
        }
        if (res == NULL && h == NULL && sub.n > 0) {
            a->inflight += sub.n;
            hand_over = true;
        }
        pthread_mutex_unlock(&sh->lock);
        if (res) {
            process_results(host, a, res);
            continue;
        }
        if (h) {
            uncount(&host->mailbox_depth, 1);
            h->next = NULL;
            process_command(host, a, h, &sub);
            budget--;
            if (a->parked) {
                a->parked = false;
                flush(host, a, &sub);
                actor_compact(a);
                tls_depth--;
                park(host, a); /* from here on another worker may run a */
                return;
            }
            if (sub.n >= RUN_BUDGET) flush(host, a, &sub);
            continue;
        }
        if (hand_over) lane_push(host, a, &sub);
        if (a->broken) {
            pthread_mutex_lock(&sh->lock);
            bool all_back = a->inflight == 0 && a->res_head == NULL;
            pthread_mutex_unlock(&sh->lock);
            if (all_back) {
                rebuild(host, a);
                continue;
            }
        }
        actor_compact(a);
        pthread_mutex_lock(&sh->lock);
        if (a->res_head || (!a->broken && a->mb_head && budget > 0)) {
            pthread_mutex_unlock(&sh->lock);
            continue;
        }
        bool requeue = !a->broken && a->mb_head != NULL;
        bool drop = false;
        if (!requeue) {
            a->scheduled = false;
            if (!a->broken && a->inflight == 0 && a->mb_head == NULL) {
                /* An actor that holds no state (its load failed, e.g.
                 * ES_EWRONGTYPE, or its commands were answered from the
                 * store) is not kept: the next command loads anyway. */
                drop = !a->loaded && !a->snap_owed;
                if (drop) {
                    unlink_actor(host, sh, a);
                } else {
                    a->last_used = es__now_ns();
                    lru_append(sh, a);
                }
            }
        }
        pthread_mutex_unlock(&sh->lock);
        /* From here on another worker may run a: do not touch it. */
        if (requeue) runq_push(host, a);
        if (drop) {
            actor_drop_state(a);
            es__free(a);
        }
        break;
    }
    tls_depth--;
}

static void *worker_main(void *arg)
{
    es_host *host = arg;
    tls_host = host;
    for (;;) {
        actor *a = runq_pop(host, true);
        if (a == NULL) break;
        run_actor(host, a);
    }
    return NULL;
}

/* ---- the commit lanes, on the commit loop ----
 *
 * Every lane lives on one libevent loop, the host's commit loop (a
 * thread of its own, never the embedder's loop: a host may be shut down
 * from a callback there, while its lanes still have to finish).  A store
 * with an asynchronous batch writer (lane_open: PostgreSQL) writes there
 * without blocking, so one thread serves every lane and their round trips
 * overlap; any other store (memory) writes synchronously in the lane's
 * callback.  A lane writes one batch at a time: when it is done, the
 * next batch is what has queued meanwhile (up to batch_rows), so a lone
 * command is written at once and a busy lane batches more. */

#define LANE_BACKOFF_MIN_MS 10
#define LANE_BACKOFF_MAX_MS 1000

static void lane_write(lane *l);

/* Post the outcomes of the lane's batch back, in order: an actor's items
 * sit together (one flush), so they go back under one shard lock, and the
 * actors to run go to the run queue under one lock. */
static void lane_post(es_host *host, hcmd *h)
{
    actor *wake_head = NULL, *wake_tail = NULL;
    size_t n_wake = 0;
    while (h) {
        actor *a = h->actor;
        hcmd *run_last = h;
        uint32_t n_run = 1;
        while (run_last->qnext && run_last->qnext->actor == a) {
            run_last = run_last->qnext;
            n_run++;
        }
        hcmd *next = run_last->qnext;
        run_last->qnext = NULL;
        for (hcmd *x = h; x; x = x->qnext)
            if (x->item.status != 0 &&
                atomic_load(&a->broken_epoch) < x->epoch)
                atomic_store(&a->broken_epoch, x->epoch);
        pthread_mutex_lock(&a->sh->lock);
        if (a->res_tail) a->res_tail->qnext = h;
        else a->res_head = h;
        a->res_tail = run_last;
        a->inflight -= n_run;
        bool push = schedule_locked(a->sh, a);
        pthread_mutex_unlock(&a->sh->lock);
        if (push) {
            a->next = NULL;
            if (wake_tail) wake_tail->next = a;
            else wake_head = a;
            wake_tail = a;
            n_wake++;
        }
        h = next;
    }
    if (wake_head) runq_push_list(host, wake_head, wake_tail, n_wake);
}

/* The lane's batch is over: every item has its outcome. */
static void lane_end_batch(lane *l)
{
    hcmd *first = l->batch;
    l->batch = NULL;
    l->busy = false;
    l->last_try = false;
    lane_post(l->host, first);
    event_active(l->kick_ev, 0, 0); /* the next batch, if any */
}

/* A write of the batch is done.  What the batch writer could not pin on
 * an aggregate (left pending) is written the generic way; items the
 * database could not take wait with the lane: it tries again with capped,
 * jittered exponential backoff, and a batch whose COMMIT answer was lost
 * is read back once the database answers, so its commands get the truth.
 * Only when the host ends: one last try, then ES_ECLOSED for what did not
 * commit and ES_EUNKNOWN for what could not be read back. */
static void lane_done(void *ud, size_t committed)
{
    lane *l = ud;
    es_host *host = l->host;
    count(&host->batches, committed);
    count(&host->batches, es__commit_rest(host->store, l->live, l->k));
    bool waiting = false;
    for (size_t i = 0; i < l->k && !waiting; i++)
        waiting = l->live[i]->status == ES__COMMIT_RETRY ||
                  l->live[i]->status == ES__COMMIT_UNKNOWN;
    if (!waiting) {
        lane_end_batch(l);
        return;
    }
    if (!atomic_load(&host->ending)) {
        unsigned ms = es__backoff_jitter(&l->seed, l->delay);
        struct timeval tv = {(time_t)(ms / 1000),
                             (suseconds_t)(ms % 1000 * 1000)};
        l->delay = es__backoff_grow(l->delay, LANE_BACKOFF_MIN_MS,
                                    LANE_BACKOFF_MAX_MS);
        l->waiting = true;
        if (event_add(l->retry_ev, &tv) == 0) return;
        l->waiting = false;
        /* no timer: at once (not reached but with memory exhausted) */
    }
    if (!l->last_try) {
        l->last_try = atomic_load(&host->ending);
        event_active(l->retry_ev, 0, 0);
        l->waiting = true;
        return;
    }
    for (size_t i = 0; i < l->k; i++) {
        es__commit_item *it = l->live[i];
        if (it->status == ES__COMMIT_RETRY) {
            it->status = ES_ECLOSED;
            it->why = "host closed while the database could not be "
                      "reached; nothing was committed";
        } else if (it->status == ES__COMMIT_UNKNOWN) {
            it->status = ES_EUNKNOWN;
            it->why = "host closed before the outcome of a COMMIT whose "
                      "answer was lost could be read back";
        }
    }
    lane_end_batch(l);
}

/* Write the lane's live items: asynchronously on a store that can, else
 * here and now. */
static void lane_write(lane *l)
{
    es_host *host = l->host;
    if (l->bl != NULL) {
        host->store->ops->lane_write(l->bl, l->live, l->k, lane_done, l);
        return;
    }
    lane_done(l, es__commit_batch(host->store, &l->conn, l->live, l->k));
}

/* The backoff is over, or the host ends: try the batch again. */
static void on_lane_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    lane *l = arg;
    if (!l->waiting) return;
    l->waiting = false;
    lane_write(l);
}

/* The host ends: lanes waiting out the database try once more now. */
static void on_lanes_end(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    es_host *host = arg;
    for (unsigned i = 0; i < host->n_lanes; i++) {
        lane *l = &host->lanes[i];
        if (!l->waiting) continue;
        event_del(l->retry_ev);
        on_lane_retry(-1, 0, l);
    }
}

/* Items have queued (lane_push), or the last batch ended: the next
 * batch, which closes at the row limit or with what is there now. */
static void on_lane_kick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    lane *l = arg;
    es_host *host = l->host;
    if (l->busy) return;
    pthread_mutex_lock(&l->lock);
    if (l->head == NULL) {
        l->kicked = false;
        pthread_mutex_unlock(&l->lock);
        return;
    }
    size_t rows = 0, n = 0;
    hcmd *first = l->head, *last = NULL;
    for (hcmd *h = first; h; h = h->qnext) {
        size_t r = es__commit_item_rows(&h->item);
        if (n > 0 && rows + r > host->cfg.batch_rows) break;
        rows += r;
        n++;
        last = h;
    }
    l->head = last->qnext;
    if (l->head == NULL) l->tail = NULL;
    last->qnext = NULL;
    pthread_mutex_unlock(&l->lock);

    if (n > l->cap) {
        void *p = es__realloc(l->live, n * 2 * sizeof *l->live);
        if (p) {
            l->live = p;
            l->cap = n * 2;
        }
    }
    bool oom = n > l->cap;
    size_t k = 0;
    bool now = atomic_load(&host->closing_now);
    for (hcmd *h = first; h; h = h->qnext) {
        if (now) h->item.status = ES_ECLOSED;
        else if (oom) h->item.status = ES_ENOMEM;
        else if (h->epoch <= atomic_load(&h->actor->broken_epoch))
            h->item.status = ES_ECONFLICT; /* decided on lost events */
        else
            l->live[k++] = &h->item;
    }
    l->batch = first;
    l->k = k;
    l->busy = true;
    l->delay = LANE_BACKOFF_MIN_MS;
    if (k > 0) lane_write(l);
    else lane_end_batch(l);
}

static void *commit_main(void *arg)
{
    es_host *host = arg;
    tls_host = host;
    event_base_loop(host->cbase, EVLOOP_NO_EXIT_ON_EMPTY);
    return NULL;
}

static void on_commit_stop(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    event_base_loopbreak(arg);
}

/* ---- the I/O loop (timers, passivation) and the snapshot writer ---- */

static void free_jobs(snap_job *jobs)
{
    while (jobs) {
        snap_job *next = jobs->next;
        es__free(jobs);
        jobs = next;
    }
}

/* The snapshot writer: when the loop's flush timer asks (FLUSH_MS after
 * the first job was queued, so that several snapshots of one aggregate
 * coalesce), what was queued, coalesced, in one transaction on its own
 * connection.  It waits on a condition, never polls.  At the stop it
 * writes what is left (nothing when closing now). */
/* Retention of command ids, on the snapshot writer (off the loop and the
 * workers): one batch a second, more while batches come back full. */
static void purge_commands_due(es_host *host, int64_t *next_ms)
{
    int64_t keep = host->cfg.command_retention_ms;
    if (keep == 0) return;
    int64_t now = es_clock_now_ms();
    if (now < *next_ms) return;
    size_t n = 0;
    es_error err = {0};
    int rc = es__store_purge_commands(host->store, now - keep,
                                      ES__PURGE_BATCH, &n, &err);
    if (rc != 0)
        es__log(ES_LOG_WARN, "host: purge of command ids failed: %s: %s",
                es_status_name(rc), err.message);
    *next_ms = rc == 0 && n == ES__PURGE_BATCH ? now : now + 1000;
}

static void *snap_writer_main(void *arg)
{
    es_host *host = arg;
    tls_host = host;
    int64_t next_purge = 0;
    for (;;) {
        pthread_mutex_lock(&host->sw_lock);
        while (!host->sw_flush && !host->sw_stop) {
            if (host->cfg.command_retention_ms == 0) {
                pthread_cond_wait(&host->sw_cond, &host->sw_lock);
                continue;
            }
            struct timespec until;
            deadline_in(&until, 1000000000u); /* the next purge */
            if (pthread_cond_timedwait(&host->sw_cond, &host->sw_lock,
                                       &until) == ETIMEDOUT)
                break;
        }
        snap_job *jobs = host->sj_head;
        host->sj_head = host->sj_tail = NULL;
        host->sj_n = 0;
        host->sw_flush = false;
        bool stop = host->sw_stop;
        pthread_mutex_unlock(&host->sw_lock);
        if (atomic_load(&host->closing_now)) {
            free_jobs(jobs);
        } else {
            es_error err = {0};
            write_snapshots(host, jobs, &err); /* a cache: errors only cost */
        }
        if (stop) break;
        purge_commands_due(host, &next_purge);
    }
    return NULL;
}

static void evict_idle(es_host *host, snap_job **jobs)
{
    uint64_t now = es__now_ns();
    uint64_t idle = host->cfg.idle_ms * 1000000u;
    for (size_t s = 0; s < N_SHARDS; s++) {
        shard *sh = &host->shards[s];
        actor *list = NULL;
        pthread_mutex_lock(&sh->lock);
        /* last_used may be later than now (idle since now was read):
         * unsigned, now - last_used would wrap and evict it at once */
        while (sh->lru_head && now >= sh->lru_head->last_used &&
               now - sh->lru_head->last_used >= idle) {
            actor *a = sh->lru_head;
            unlink_actor(host, sh, a);
            a->next = list;
            list = a;
        }
        pthread_mutex_unlock(&sh->lock);
        while (list) {
            actor *next = list->next;
            passivate(host, list, true, jobs);
            list = next;
        }
    }
}

/* Loop: actors es_host_send evicted for room; passivate them now. */
static void on_wake(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    es_host *host = arg;
    pthread_mutex_lock(&host->hk_lock);
    actor *evicted = host->evicted;
    host->evicted = NULL;
    pthread_mutex_unlock(&host->hk_lock);
    snap_job *jobs = NULL;
    bool now = atomic_load(&host->closing_now);
    while (evicted) {
        actor *next = evicted->next;
        passivate(host, evicted, !now, &jobs);
        evicted = next;
    }
    snap_enqueue(host, jobs);
}

/* Loop, every tick: passivate the actors idle for idle_ms. */
static void on_sweep(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    es_host *host = arg;
    snap_job *jobs = NULL;
    evict_idle(host, &jobs);
    snap_enqueue(host, jobs);
}

/* Loop, FLUSH_MS after the first snapshot job was queued: wake the
 * writer (it writes on its own thread: never a store round trip here). */
static void on_flush(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    es_host *host = arg;
    pthread_mutex_lock(&host->sw_lock);
    host->flush_armed = false;
    host->sw_flush = true;
    pthread_cond_signal(&host->sw_cond);
    pthread_mutex_unlock(&host->sw_lock);
}

/* Our own loop only: stop it (activated by host_end; an activation made
 * before the loop started is run by its first turn, unlike a loopbreak). */
static void on_stop(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    event_base_loopbreak(((es_host *)arg)->base);
}

static void *io_main(void *arg)
{
    es_host *host = arg;
    tls_host = host;
    event_base_loop(host->base, EVLOOP_NO_EXIT_ON_EMPTY);
    return NULL;
}

static pthread_once_t evthread_once = PTHREAD_ONCE_INIT;
static int evthread_rc;

static void evthread_init(void) { evthread_rc = evthread_use_pthreads(); }

/* Make the loop's events; with no base of the embedder's, our own base
 * (libevent's pthread locks on first: other threads activate events). */
static int io_setup(es_host *host)
{
    host->base = host->cfg.base;
    if (host->base == NULL) {
        pthread_once(&evthread_once, evthread_init);
        if (evthread_rc != 0) return ES_EIO;
        host->base = event_base_new();
        if (host->base == NULL) return ES_ENOMEM;
        host->own_base = true;
        host->stop_ev = event_new(host->base, -1, 0, on_stop, host);
        if (host->stop_ev == NULL) return ES_ENOMEM;
    }
    host->wake_ev = event_new(host->base, -1, 0, on_wake, host);
    host->flush_ev = event_new(host->base, -1, 0, on_flush, host);
    host->retry_ev = event_new(host->base, -1, 0, on_retry, host);
    if (host->wake_ev == NULL || host->flush_ev == NULL ||
        host->retry_ev == NULL)
        return ES_ENOMEM;
    if (host->cfg.idle_ms > 0) {
        /* a quarter of the idle time, between 1 ms and 100 ms */
        uint64_t tick_ms = host->cfg.idle_ms / 4;
        if (tick_ms > 100) tick_ms = 100;
        if (tick_ms < 1) tick_ms = 1;
        host->sweep_ev = event_new(host->base, -1, EV_PERSIST, on_sweep,
                                   host);
        struct timeval tv = {(time_t)(tick_ms / 1000),
                             (suseconds_t)(tick_ms % 1000 * 1000)};
        if (host->sweep_ev == NULL || event_add(host->sweep_ev, &tv) != 0)
            return ES_ENOMEM;
    }
    return 0;
}

/* Delete the loop's events: event_del waits for a callback running on
 * the loop's thread to return, so none runs after this.  With our own
 * base, the loop is stopped first and the base freed. */
static void io_teardown(es_host *host)
{
    if (host->io_started) {
        event_active(host->stop_ev, 0, 0);
        pthread_join(host->io_thread, NULL);
        host->io_started = false;
    }
    /* the flush timer after the callbacks that may arm it */
    struct event **evs[] = {&host->sweep_ev, &host->wake_ev,
                            &host->flush_ev, &host->retry_ev,
                            &host->stop_ev};
    for (size_t i = 0; i < sizeof evs / sizeof evs[0]; i++) {
        if (*evs[i] == NULL) continue;
        event_del(*evs[i]);
        event_free(*evs[i]);
        *evs[i] = NULL;
    }
    if (host->own_base && host->base) event_base_free(host->base);
    host->base = NULL;
    host->own_base = false;
}

/* The commit loop and the lanes' events (and the store's lanes).  The
 * loop's thread is started by the caller. */
static int commit_setup(es_host *host, es_error *err)
{
    pthread_once(&evthread_once, evthread_init);
    if (evthread_rc != 0)
        return es__error_set(err, ES_EIO, "could not set up the commit "
                                          "loop (libevent threads)");
    host->cbase = event_base_new();
    if (host->cbase == NULL)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    host->cstop_ev = event_new(host->cbase, -1, 0, on_commit_stop,
                               host->cbase);
    host->lanes_end_ev = event_new(host->cbase, -1, 0, on_lanes_end, host);
    if (host->cstop_ev == NULL || host->lanes_end_ev == NULL)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    for (unsigned i = 0; i < host->n_lanes; i++) {
        lane *l = &host->lanes[i];
        l->kick_ev = event_new(host->cbase, -1, 0, on_lane_kick, l);
        l->retry_ev = event_new(host->cbase, -1, 0, on_lane_retry, l);
        if (l->kick_ev == NULL || l->retry_ev == NULL)
            return es__error_set(err, ES_ENOMEM, "out of memory");
        if (host->store->ops->lane_open != NULL) {
            int rc = host->store->ops->lane_open(host->store, host->cbase,
                                                 &l->bl, err);
            if (rc != 0) return rc;
        }
    }
    return 0;
}

/* Stop the commit loop (its lanes are idle: every command completed) and
 * free the lanes' events, connections and writers. */
static void commit_teardown(es_host *host)
{
    if (host->commit_started) {
        event_active(host->cstop_ev, 0, 0);
        pthread_join(host->commit_thread, NULL);
        host->commit_started = false;
    }
    for (unsigned i = 0; host->lanes && i < host->n_lanes; i++) {
        lane *l = &host->lanes[i];
        struct event **evs[] = {&l->kick_ev, &l->retry_ev};
        for (size_t j = 0; j < 2; j++)
            if (*evs[j]) {
                event_free(*evs[j]);
                *evs[j] = NULL;
            }
        if (l->bl) host->store->ops->lane_close(l->bl);
        l->bl = NULL;
        es__store_background_close(host->store, &l->conn);
        es__free(l->live);
        l->live = NULL;
        l->cap = 0;
    }
    struct event **evs[] = {&host->cstop_ev, &host->lanes_end_ev};
    for (size_t j = 0; j < 2; j++)
        if (*evs[j]) {
            event_free(*evs[j]);
            *evs[j] = NULL;
        }
    if (host->cbase) event_base_free(host->cbase);
    host->cbase = NULL;
}

/* ---- life cycle ---- */

static void host_free(es_host *host)
{
    for (size_t s = 0; s < N_SHARDS; s++)
        pthread_mutex_destroy(&host->shards[s].lock);
    pthread_mutex_destroy(&host->rq_lock);
    pthread_cond_destroy(&host->rq_cond);
    for (unsigned i = 0; host->lanes && i < host->n_lanes; i++)
        pthread_mutex_destroy(&host->lanes[i].lock);
    es__free(host->lanes);
    pthread_mutex_destroy(&host->hk_lock);
    free_jobs(host->sj_head); /* left by a failed open */
    pthread_mutex_destroy(&host->sw_lock);
    pthread_cond_destroy(&host->sw_cond);
    es__store_background_close(host->store, &host->snap_conn);
    pthread_mutex_destroy(&host->drain_lock);
    pthread_cond_destroy(&host->drain_cond);
    es__free(host->workers);
    es__free(host);
}

static void stop_threads(es_host *host)
{
    pthread_mutex_lock(&host->rq_lock);
    host->rq_stop = true;
    pthread_cond_broadcast(&host->rq_cond);
    pthread_mutex_unlock(&host->rq_lock);
    for (unsigned i = 0; i < host->n_workers; i++)
        pthread_join(host->workers[i], NULL);
    host->n_workers = 0;
    commit_teardown(host);
    /* Workers are gone; the loop's callbacks go next (io_teardown), so
     * nobody queues snapshots or arms the flush timer any more. */
    io_teardown(host);
    /* last: the loop may have queued snapshots of passivations; the
     * writer writes what is queued before it stops */
    if (host->snap_writer_started) {
        pthread_mutex_lock(&host->sw_lock);
        host->sw_stop = true;
        pthread_cond_signal(&host->sw_cond);
        pthread_mutex_unlock(&host->sw_lock);
        pthread_join(host->snap_writer, NULL);
        host->snap_writer_started = false;
    }
}

int es_host_open(const es_host_config *cfg, es_store *store, es_host **out,
                 es_error *err)
{
    if (cfg == NULL || store == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "config, store and out are "
                                             "required");
    if (cfg->n_types == 0)
        return es__error_set(err, ES_EINVAL, "no aggregate type registered");
    es_host *host = es__calloc(1, sizeof *host);
    if (host == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    host->workers = es__calloc(cfg->workers, sizeof(pthread_t));
    /* Lanes pay where commits wait for the database: a store with a
     * batch writer gets LANES_DEFAULT (measured: bench/bench_pg.c) unless
     * it says otherwise (the memory store: 1), the others one. */
    host->n_lanes = cfg->lanes > 0 ? cfg->lanes
                    : store->ops->write_batch == NULL ? 1
                    : store->ops->batch_lanes > 0     ? store->ops->batch_lanes
                                                      : LANES_DEFAULT;
    host->lanes = es__calloc(host->n_lanes, sizeof *host->lanes);
    if (host->workers == NULL || host->lanes == NULL) {
        es__free(host->lanes);
        es__free(host->workers);
        es__free(host);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    host->store = store;
    host->cfg = *cfg;
    host->has_commands = es__store_has_commands(store);
    host->lazy_ids = host->has_commands && store->ops->write_batch != NULL;
    size_t bound = cfg->resident_bound;
    if (cfg->resident_bytes > 0) {
        /* malloc chunks: the actor, its state, a hash bucket (load 1) */
        size_t state = 0;
        for (size_t i = 0; i < cfg->n_types; i++)
            if (cfg->types[i].type->state_size > state)
                state = cfg->types[i].type->state_size;
        size_t per = ((sizeof(actor) + 8 + 15) & ~(size_t)15) +
                     ((state + 8 + 15) & ~(size_t)15) + sizeof(actor *);
        uint64_t by_bytes = cfg->resident_bytes / per;
        if (by_bytes < bound) bound = by_bytes > 0 ? (size_t)by_bytes : 1;
    }
    host->shard_bound = (bound + N_SHARDS - 1) / N_SHARDS;
    for (size_t s = 0; s < N_SHARDS; s++)
        pthread_mutex_init(&host->shards[s].lock, NULL);
    pthread_mutex_init(&host->rq_lock, NULL);
    pthread_cond_init(&host->rq_cond, NULL);
    for (unsigned i = 0; i < host->n_lanes; i++) {
        host->lanes[i].host = host;
        host->lanes[i].seed = 2654435761u * (i + 1);
        pthread_mutex_init(&host->lanes[i].lock, NULL);
    }
    pthread_mutex_init(&host->hk_lock, NULL);
    pthread_mutex_init(&host->sw_lock, NULL);
    pthread_cond_init(&host->sw_cond, NULL);
    pthread_mutex_init(&host->drain_lock, NULL);
    pthread_cond_init(&host->drain_cond, NULL);

    int rc = 0;
    int commit_rc = commit_setup(host, err);
    if (commit_rc != 0) {
        stop_threads(host);
        host_free(host);
        return commit_rc;
    }
    rc = pthread_create(&host->commit_thread, NULL, commit_main, host);
    host->commit_started = rc == 0;
    if (rc == 0) {
        rc = pthread_create(&host->snap_writer, NULL, snap_writer_main, host);
        host->snap_writer_started = rc == 0;
    }
    int io_rc = rc == 0 ? io_setup(host) : 0;
    if (rc == 0 && io_rc == 0 && host->own_base) {
        rc = pthread_create(&host->io_thread, NULL, io_main, host);
        host->io_started = rc == 0;
    }
    for (unsigned i = 0; rc == 0 && io_rc == 0 && i < cfg->workers; i++) {
        rc = pthread_create(&host->workers[i], NULL, worker_main, host);
        if (rc == 0) host->n_workers++;
    }
    if (io_rc != 0) {
        stop_threads(host);
        host_free(host);
        return es__error_set(err, io_rc, "could not set up the I/O loop "
                                         "(libevent)");
    }
    if (rc != 0) {
        stop_threads(host);
        host_free(host);
        es__error_set(err, ES_EIO, "could not start a host thread");
        if (err) err->sys_errno = rc;
        return ES_EIO;
    }
    *out = host;
    return 0;
}

/* Shutdown, before passivating a: an actor whose state a failed commit
 * dropped and that no command loaded since has none to snapshot, though
 * the policy may want one (events came since the last).  Load it here,
 * on the closing thread (the workers are gone; the I/O loop never reads
 * the store, so an idle passivation skips such an actor).  The load
 * claims its state as snapshotted: undo that, so passivate writes one. */
static void load_owed(es_host *host, actor *a)
{
    if (!a->snap_owed || a->loaded || !host->cfg.snap_on_passivation)
        return;
    es_error err = {0};
    /* a cache: a failed load costs only the snapshot */
    if (load_actor(host, a, &err) == 0) a->folded_at_snapshot = 0;
}

static int host_end(es_host *host, bool now, es_error *err)
{
    if (host == NULL) return 0;
    if (tls_host == host)
        return es__error_set(err, ES_EMISUSE, "a host cannot be closed "
                                              "from its own threads");
    if (now) atomic_store(&host->closing_now, true);
    atomic_store(&host->closing, true);
    atomic_store(&host->ending, true);
    if (host->lanes_end_ev) /* lanes waiting out the database: now */
        event_active(host->lanes_end_ev, 0, 0);
    { /* parked actors run now: their commands complete (ES_ECLOSED) */
        actor *tail = NULL;
        size_t n = 0;
        pthread_mutex_lock(&host->hk_lock);
        actor *head = unpark_locked(host, 0, true, &tail, &n);
        pthread_mutex_unlock(&host->hk_lock);
        if (head) runq_push_list(host, head, tail, n);
    }
    /* Every accepted command completes: workers decide (or, closing now,
     * complete with ES_ECLOSED) what is in the mailboxes. */
    pthread_mutex_lock(&host->drain_lock);
    while (atomic_load(&host->pending) > 0) {
        struct timespec ts;
        deadline_in(&ts, 20000000u);
        pthread_cond_timedwait(&host->drain_cond, &host->drain_lock, &ts);
    }
    pthread_mutex_unlock(&host->drain_lock);
    stop_threads(host);

    /* What the loop did not get to: evicted actors, queued snapshots. */
    snap_job *jobs = host->sj_head;
    host->sj_head = host->sj_tail = NULL;
    host->sj_n = 0;
    if (now) {
        free_jobs(jobs);
        jobs = NULL;
    }
    while (host->evicted) {
        actor *next = host->evicted->next;
        if (!now) load_owed(host, host->evicted);
        passivate(host, host->evicted, !now, &jobs);
        host->evicted = next;
    }
    for (size_t s = 0; s < N_SHARDS; s++) {
        shard *sh = &host->shards[s];
        for (size_t i = 0; i < sh->n_buckets; i++) {
            actor *a = sh->buckets[i];
            while (a) {
                actor *next = a->hnext;
                uncount(&host->resident, 1);
                if (!now) load_owed(host, a);
                passivate(host, a, !now, &jobs);
                a = next;
            }
        }
        es__free(sh->buckets);
        sh->buckets = NULL;
        sh->n_buckets = 0;
    }
    int rc = write_snapshots(host, jobs, err);
    host_free(host);
    return rc;
}

void es_host_stop(es_host *host)
{
    if (host != NULL) atomic_store(&host->closing, true);
}

int es_host_shutdown(es_host *host, es_error *err)
{
    return host_end(host, false, err);
}

int es_host_close(es_host *host) { return host_end(host, true, NULL); }

/* ---- commands ---- */

int es_host_send(es_host *host, const es_aggregate_type *type,
                 const es_uuid *aggregate_id, const es_command *command,
                 es_host_done_fn done, void *ud, es_error *err)
{
    if (host == NULL || aggregate_id == NULL || command == NULL ||
        (command->payload == NULL && command->len > 0))
        return es__error_set(err, ES_EINVAL, "host, aggregate id and "
                                             "command are required");
    if (es_uuid_is_nil(aggregate_id) || es_uuid_is_nil(&command->id))
        return es__error_set(err, ES_EINVAL, "aggregate id and command id "
                                             "must not be nil");
    const htype *ht = find_type(host, type);
    if (ht == NULL)
        return es__error_set(err, ES_EINVAL, "aggregate type not "
                                             "registered");
    if (atomic_load(&host->closing))
        return es__error_set(err, ES_ECLOSED, "host is closing");
    if (atomic_fetch_add(&host->pending, 1) >= host->cfg.host_bound) {
        pending_done(host);
        count(&host->busy, 1);
        return es__error_set(err, ES_EBUSY, "host is full");
    }
    if (atomic_load(&host->closing)) {
        pending_done(host);
        return es__error_set(err, ES_ECLOSED, "host is closing");
    }
    hcmd *h = es__calloc(1, sizeof *h + command->len);
    if (h == NULL) {
        pending_done(host);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    h->done = done;
    h->ud = ud;
    h->id = command->id;
    h->kind = command->kind;
    h->len = command->len;
    if (command->len > 0) memcpy(h->payload, command->payload, command->len);
    h->item.aggregate_id = *aggregate_id;
    h->t_accept = es__now_ns();

    shard *sh = shard_of(host, aggregate_id);
    actor *evicted = NULL, *fresh = NULL;
    bool push = false;
    int rc = 0;
    pthread_mutex_lock(&sh->lock);
    actor *a = shard_find(sh, aggregate_id, ht);
    if (a == NULL) {
        if (sh->resident >= host->shard_bound) {
            if (sh->lru_head) {
                evicted = sh->lru_head;
                unlink_actor(host, sh, evicted);
            } else {
                rc = ES_EBUSY;
            }
        }
        if (rc == 0) {
            fresh = es__calloc(1, sizeof *fresh);
            if (fresh != NULL) fresh->id = *aggregate_id; /* the hash key */
            if (fresh == NULL || shard_insert(sh, fresh) != 0)
                rc = ES_ENOMEM;
        }
        if (rc == 0) {
            a = fresh;
            fresh = NULL;
            a->ht = ht;
            a->sh = sh;
            a->epoch = 1;
            atomic_init(&a->broken_epoch, 0);
            sh->resident++;
            count(&host->resident, 1);
        }
    }
    if (rc == 0 && a->mb_n >= host->cfg.mailbox_bound) rc = ES_EBUSY;
    if (rc == 0) {
        h->actor = a;
        if (a->mb_tail) a->mb_tail->next = h;
        else a->mb_head = h;
        a->mb_tail = h;
        a->mb_n++;
        /* counted before a worker can take it, so the gauge never dips */
        count(&host->accepted, 1);
        count(&host->mailbox_depth, 1);
        push = schedule_locked(sh, a);
    }
    pthread_mutex_unlock(&sh->lock);
    es__free(fresh);
    if (evicted) { /* passivated on the loop (state_encode, free) */
        pthread_mutex_lock(&host->hk_lock);
        evicted->next = host->evicted;
        host->evicted = evicted;
        pthread_mutex_unlock(&host->hk_lock);
        event_active(host->wake_ev, 0, 0);
    }
    if (rc != 0) {
        es__free(h);
        pending_done(host);
        if (rc == ES_EBUSY) {
            count(&host->busy, 1);
            return es__error_set(err, rc, "mailbox or resident bound is "
                                          "full");
        }
        return es__error_set(err, rc, "out of memory");
    }
    if (push) runq_push(host, a);
    return 0;
}

/* ---- the blocking call ---- */

/* The caller of es_host_call waits on this; the completion callback fills
 * it under its lock, and unlocking is the worker's last touch.  Waiters
 * are recycled, never destroyed: POSIX lets the caller destroy the mutex
 * as soon as it has seen done, but the worker's pthread_mutex_unlock may
 * then still be writing the mutex's bytes, after the point where a race
 * detector (helgrind) counts the lock as released, so destroying or
 * reusing the memory at once (a stack slot, a freed block) is reported as
 * a race with that unlock.  A recycled waiter's mutex stays a mutex; its
 * other fields are handed on through waiters_lock (never held with
 * another lock).  The free list is as long as the most blocking calls
 * ever waiting at once (one per blocked thread); it is process-wide, so
 * that no host has to outlive the callers that return waiters to it. */
typedef struct waiter {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool done;
    int status;
    es_host_reply *reply;
    struct waiter *next; /* in the free list */
} waiter;

static pthread_mutex_t waiters_lock = PTHREAD_MUTEX_INITIALIZER;
static waiter *waiters_free;

static waiter *waiter_get(void)
{
    pthread_mutex_lock(&waiters_lock);
    waiter *w = waiters_free;
    if (w) waiters_free = w->next;
    pthread_mutex_unlock(&waiters_lock);
    if (w == NULL) {
        w = es__calloc(1, sizeof *w);
        if (w == NULL) return NULL;
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->cond, NULL);
    }
    w->done = false;
    w->status = 0;
    w->reply = NULL;
    w->next = NULL;
    return w;
}

static void waiter_put(waiter *w)
{
    pthread_mutex_lock(&waiters_lock);
    w->next = waiters_free;
    waiters_free = w;
    pthread_mutex_unlock(&waiters_lock);
}

static es_host_reply *reply_of(const es_host_result *r)
{
    es_host_reply *reply = es__calloc(1, sizeof *reply);
    if (reply == NULL) return NULL;
    reply->status = r->status;
    reply->duplicate = r->duplicate;
    reply->version = r->version;
    snprintf(reply->reason, sizeof reply->reason, "%s", r->reason);
    if (r->n_events > 0) {
        reply->events = es__calloc(r->n_events, sizeof *reply->events);
        if (reply->events == NULL) {
            es__free(reply);
            return NULL;
        }
        for (size_t i = 0; i < r->n_events; i++) {
            reply->events[i] = r->events[i];
            reply->events[i].data = es__memdup(r->events[i].data,
                                               r->events[i].len);
            if (reply->events[i].data == NULL) {
                reply->n_events = i;
                es_host_reply_free(reply);
                return NULL;
            }
        }
        reply->n_events = r->n_events;
    }
    return reply;
}

static void call_done(void *ud, const es_host_result *r)
{
    waiter *w = ud;
    es_host_reply *reply = reply_of(r);
    pthread_mutex_lock(&w->lock);
    w->reply = reply;
    w->status = reply ? r->status : ES_ENOMEM;
    w->done = true;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

void es_host_reply_free(es_host_reply *reply)
{
    if (reply == NULL) return;
    for (size_t i = 0; i < reply->n_events; i++)
        es__free((void *)reply->events[i].data);
    es__free(reply->events);
    es__free(reply);
}

int es_host_call(es_host *host, const es_aggregate_type *type,
                 const es_uuid *aggregate_id, const es_command *command,
                 es_host_reply **out, es_error *err)
{
    if (out) *out = NULL;
    bool on_worker = host != NULL && tls_host == host;
    if (on_worker && aggregate_id != NULL)
        for (int i = 0; i < tls_depth; i++)
            if (es_uuid_equal(&tls_stack[i]->id, aggregate_id))
                return es__error_set(err, ES_EMISUSE, "a blocking call to "
                                     "the aggregate that is running "
                                     "would never return");
    waiter *w = waiter_get();
    if (w == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    int rc = es_host_send(host, type, aggregate_id, command, call_done, w,
                          err);
    if (rc != 0) {
        waiter_put(w);
        return rc;
    }
    for (;;) {
        pthread_mutex_lock(&w->lock);
        bool done = w->done;
        pthread_mutex_unlock(&w->lock);
        if (done) break;
        /* A worker runs other actors while it waits, so that the pool
         * cannot run out of threads. */
        actor *a = on_worker && tls_depth < MAX_NESTED
                       ? runq_pop(host, false)
                       : NULL;
        if (a) {
            run_actor(host, a);
            continue;
        }
        pthread_mutex_lock(&w->lock);
        if (!w->done) {
            if (on_worker) {
                struct timespec ts;
                deadline_in(&ts, 1000000u);
                pthread_cond_timedwait(&w->cond, &w->lock, &ts);
            } else {
                pthread_cond_wait(&w->cond, &w->lock);
            }
        }
        pthread_mutex_unlock(&w->lock);
    }
    rc = w->status;
    es_host_reply *reply = w->reply;
    waiter_put(w);
    if (rc != 0 && err && reply)
        es__error_set(err, rc, "%s", reply->reason);
    if (out) *out = reply;
    else es_host_reply_free(reply);
    return rc;
}

/* ---- metrics ---- */

int es_host_metrics_get(es_host *host, es_host_metrics *out)
{
    if (host == NULL || out == NULL) return ES_EINVAL;
    memset(out, 0, sizeof *out);
#define LOAD(f) out->f = atomic_load_explicit(&host->f, memory_order_relaxed)
    LOAD(accepted);
    LOAD(completed);
    LOAD(rejected);
    LOAD(duplicate);
    LOAD(conflicts);
    LOAD(busy);
    LOAD(resident);
    LOAD(loads);
    LOAD(passivations);
    LOAD(mailbox_depth);
    LOAD(batches);
    LOAD(snapshots);
#undef LOAD
    es__hist_read(&host->h_queue, &out->queue_wait);
    es__hist_read(&host->h_load, &out->load);
    es__hist_read(&host->h_decide, &out->decide);
    es__hist_read(&host->h_commit, &out->commit_wait);
    es__hist_read(&host->h_total, &out->total);
    return 0;
}
