/*
 * The host's life cycle (es_host_open, es_host_stop, es_host_shutdown,
 * es_host_close) and its metrics.  Open and close run on the caller's
 * thread, never on one of the host's (ES_EMISUSE); close waits for every
 * accepted command to complete, stops the threads, then passivates what
 * is left on the closing thread.  The metrics are relaxed atomics: any
 * thread.  See host_int.h for the files, threads and locks.
 */
#include <string.h>

#include <event2/event.h>

#include "host/host_int.h"

#define LANES_DEFAULT 2 /* commit lanes on a store with a batch writer */

static void host_free(es_host *host)
{
    for (size_t s = 0; s < N_SHARDS; s++)
        pthread_mutex_destroy(&host->shards[s].lock);
    pthread_mutex_destroy(&host->rq.lock);
    pthread_cond_destroy(&host->rq.cond);
    for (unsigned i = 0; host->commit.lanes && i < host->commit.n_lanes; i++)
        pthread_mutex_destroy(&host->commit.lanes[i].lock);
    es__free(host->commit.lanes);
    pthread_mutex_destroy(&host->hk.lock);
    es__host_snap_free(host->sw.head); /* left by a failed open */
    pthread_mutex_destroy(&host->sw.lock);
    pthread_cond_destroy(&host->sw.cond);
    es__store_background_close(host->store, &host->sw.conn);
    pthread_mutex_destroy(&host->drain_lock);
    pthread_cond_destroy(&host->drain_cond);
    es__free(host->workers);
    es__free(host);
}

static void stop_threads(es_host *host)
{
    pthread_mutex_lock(&host->rq.lock);
    host->rq.stop = true;
    pthread_cond_broadcast(&host->rq.cond);
    pthread_mutex_unlock(&host->rq.lock);
    for (unsigned i = 0; i < host->n_workers; i++)
        pthread_join(host->workers[i], NULL);
    host->n_workers = 0;
    es__host_commit_teardown(host);
    /* Workers are gone; the loop's callbacks go next (io_teardown), so
     * nobody queues snapshots or arms the flush timer any more. */
    es__host_io_teardown(host);
    /* last: the loop may have queued snapshots of passivations; the
     * writer writes what is queued before it stops */
    if (host->sw.started) {
        pthread_mutex_lock(&host->sw.lock);
        host->sw.stop = true;
        pthread_cond_signal(&host->sw.cond);
        pthread_mutex_unlock(&host->sw.lock);
        pthread_join(host->sw.thread, NULL);
        host->sw.started = false;
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
    unsigned store_lanes = es__store_batch_lanes(store);
    host->commit.n_lanes = cfg->lanes > 0                         ? cfg->lanes
                           : !es__store_has_batch_writer(store) ? 1
                           : store_lanes > 0                    ? store_lanes
                                                                : LANES_DEFAULT;
    host->commit.lanes =
        es__calloc(host->commit.n_lanes, sizeof *host->commit.lanes);
    if (host->workers == NULL || host->commit.lanes == NULL) {
        es__free(host->commit.lanes);
        es__free(host->workers);
        es__free(host);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    host->store = store;
    host->cfg = *cfg;
    host->has_commands = es__store_has_commands(store);
    host->lazy_ids = host->has_commands && es__store_has_batch_writer(store);
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
    pthread_mutex_init(&host->rq.lock, NULL);
    pthread_cond_init(&host->rq.cond, NULL);
    for (unsigned i = 0; i < host->commit.n_lanes; i++) {
        host->commit.lanes[i].host = host;
        host->commit.lanes[i].seed = 2654435761u * (i + 1);
        pthread_mutex_init(&host->commit.lanes[i].lock, NULL);
    }
    pthread_mutex_init(&host->hk.lock, NULL);
    pthread_mutex_init(&host->sw.lock, NULL);
    pthread_cond_init(&host->sw.cond, NULL);
    pthread_mutex_init(&host->drain_lock, NULL);
    pthread_cond_init(&host->drain_cond, NULL);

    int rc = 0;
    int commit_rc = es__host_commit_setup(host, err);
    if (commit_rc != 0) {
        stop_threads(host);
        host_free(host);
        return commit_rc;
    }
    rc = pthread_create(&host->commit.thread, NULL, es__host_commit_main, host);
    host->commit.started = rc == 0;
    if (rc == 0) {
        rc = pthread_create(&host->sw.thread, NULL, es__host_snap_writer_main,
                            host);
        host->sw.started = rc == 0;
    }
    int io_rc = rc == 0 ? es__host_io_setup(host) : 0;
    if (rc == 0 && io_rc == 0 && host->io.own_base) {
        rc = pthread_create(&host->io.thread, NULL, es__host_io_main, host);
        host->io.started = rc == 0;
    }
    for (unsigned i = 0; rc == 0 && io_rc == 0 && i < cfg->workers; i++) {
        rc = pthread_create(&host->workers[i], NULL, es__host_worker_main,
                            host);
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
    if (es__host_actor_load(host, a, &err) == 0) a->folded_at_snapshot = 0;
}

static int host_end(es_host *host, bool now, es_error *err)
{
    if (host == NULL) return 0;
    if (es__host_tls == host)
        return es__error_set(err, ES_EMISUSE, "a host cannot be closed "
                                              "from its own threads");
    if (now) atomic_store(&host->closing_now, true);
    atomic_store(&host->closing, true);
    atomic_store(&host->ending, true);
    if (host->commit.end_ev) /* lanes waiting out the database: now */
        event_active(host->commit.end_ev, 0, 0);
    { /* parked actors run now: their commands complete (ES_ECLOSED) */
        actor *tail = NULL;
        size_t n = 0;
        pthread_mutex_lock(&host->hk.lock);
        actor *head = es__host_unpark_locked(host, 0, true, &tail, &n);
        pthread_mutex_unlock(&host->hk.lock);
        if (head) es__host_runq_push_list(host, head, tail, n);
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
    snap_job *jobs = host->sw.head;
    host->sw.head = host->sw.tail = NULL;
    host->sw.n = 0;
    if (now) {
        es__host_snap_free(jobs);
        jobs = NULL;
    }
    while (host->hk.evicted) {
        actor *next = host->hk.evicted->next;
        if (!now) load_owed(host, host->hk.evicted);
        es__host_passivate(host, host->hk.evicted, !now, &jobs);
        host->hk.evicted = next;
    }
    for (size_t s = 0; s < N_SHARDS; s++) {
        shard *sh = &host->shards[s];
        for (size_t i = 0; i < sh->n_buckets; i++) {
            actor *a = sh->buckets[i];
            while (a) {
                actor *next = a->hnext;
                metric_sub(&host->resident, 1);
                if (!now) load_owed(host, a);
                es__host_passivate(host, a, !now, &jobs);
                a = next;
            }
        }
        es__free(sh->buckets);
        sh->buckets = NULL;
        sh->n_buckets = 0;
    }
    int rc = es__host_snap_write(host, jobs, err);
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
    LOAD(queries);
#undef LOAD
    es__hist_read(&host->h_queue, &out->queue_wait);
    es__hist_read(&host->h_load, &out->load);
    es__hist_read(&host->h_decide, &out->decide);
    es__hist_read(&host->h_commit, &out->commit_wait);
    es__hist_read(&host->h_total, &out->total);
    es__hist_read(&host->h_query, &out->query);
    return 0;
}
