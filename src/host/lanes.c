/*
 * The commit lanes, on the commit loop.
 *
 * Every lane lives on one libevent loop, the host's commit loop (a
 * thread of its own, never the embedder's loop: a host may be shut down
 * from a callback there, while its lanes still have to finish).  A store
 * with an asynchronous batch writer (lane_open: PostgreSQL) writes there
 * without blocking, so one thread serves every lane and their round trips
 * overlap; any other store (memory) writes synchronously in the lane's
 * callback.  A lane writes one batch at a time: when it is done, the
 * next batch is what has queued meanwhile (up to batch_rows), so a lone
 * command is written at once and a busy lane batches more.
 *
 * Threads and locks: workers queue items under lane->lock and activate
 * kick_ev; everything else of a lane (its batch, live items, backoff,
 * the store's writer) is the commit loop's thread's alone.  Outcomes go
 * back to each actor under its shard's lock, and the actors to run to the
 * run queue.  Setup and teardown run on the opening/closing thread while
 * the loop does not run.
 */
#include <string.h>
#include <time.h>

#include <event2/event.h>

#include "core/backoff.h"
#include "host/host_int.h"

/* The lane of an aggregate: fixed, so its items are committed in order. */
static lane *lane_of(es_host *host, const actor *a)
{
    uint64_t h = 1469598103934665603u; /* FNV-1a over the key */
    for (int i = 0; i < 16; i++) {
        h ^= a->id.bytes[i];
        h *= 1099511628211u;
    }
    return &host->commit.lanes[h % host->commit.n_lanes];
}

/* Hand the decided items to the actor's commit lane (its loop is woken
 * by an event, once until it finds the queue empty). */
void es__host_lane_push(es_host *host, actor *a, submit *sub)
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
        bool push = es__host_schedule_locked(a->sh, a);
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
    if (wake_head) es__host_runq_push_list(host, wake_head, wake_tail, n_wake);
}

/* The lane's batch is over: every item has its outcome. */
static void lane_end_batch(lane *l)
{
    hcmd *first = l->batch;
    uint64_t now = es__mono_ns();
    for (hcmd *h = first; h; h = h->qnext) h->t_done = now;
    l->batch = NULL;
    l->busy = false;
    atomic_fetch_sub_explicit(&l->host->lanes_busy, 1, memory_order_relaxed);
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
static void lane_done(void *ud, size_t committed,
                      const es__batch_timing *timing)
{
    lane *l = ud;
    es_host *host = l->host;
    uint64_t took = es__mono_ns() - l->t_start;
    for (size_t i = 0; i < l->k; i++) {
        es__hist_record(&host->h_write, took);
        if (timing->commit_ns > 0)
            es__hist_record(&host->h_dbcommit, timing->commit_ns);
    }
    metric_add(&host->round_trips, timing->round_trips);
    metric_add(&host->batches, committed);
    metric_add(&host->batches, es__commit_rest(host->store, l->live, l->k));
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
        es__store_lane_write(host->store, l->bl, l->live, l->k, lane_done, l);
        return;
    }
    static const es__batch_timing none = {0, 0};
    lane_done(l, es__commit_batch(host->store, &l->conn, l->live, l->k),
              &none);
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
    for (unsigned i = 0; i < host->commit.n_lanes; i++) {
        lane *l = &host->commit.lanes[i];
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
    l->t_start = es__mono_ns();
    atomic_fetch_add_explicit(&host->lanes_busy, 1, memory_order_relaxed);
    metric_add(&host->batch_items, k);
    for (hcmd *h = first; h; h = h->qnext)
        es__hist_record(&host->h_lane, l->t_start - h->t_handoff);
    l->delay = LANE_BACKOFF_MIN_MS;
    if (k > 0) lane_write(l);
    else lane_end_batch(l);
}

void *es__host_commit_main(void *arg)
{
    es_host *host = arg;
    es__host_tls = host;
    event_base_loop(host->commit.base, EVLOOP_NO_EXIT_ON_EMPTY);
    return NULL;
}

static void on_commit_stop(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    event_base_loopbreak(arg);
}

/* The commit loop and the lanes' events (and the store's lanes).  The
 * loop's thread is started by the caller. */
int es__host_commit_setup(es_host *host, es_error *err)
{
    if (es__host_evthread() != 0)
        return es__error_set(err, ES_EIO, "could not set up the commit "
                                          "loop (libevent threads)");
    host->commit.base = event_base_new();
    if (host->commit.base == NULL)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    host->commit.stop_ev =
        event_new(host->commit.base, -1, 0, on_commit_stop, host->commit.base);
    host->commit.end_ev =
        event_new(host->commit.base, -1, 0, on_lanes_end, host);
    if (host->commit.stop_ev == NULL || host->commit.end_ev == NULL)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    for (unsigned i = 0; i < host->commit.n_lanes; i++) {
        lane *l = &host->commit.lanes[i];
        l->kick_ev = event_new(host->commit.base, -1, 0, on_lane_kick, l);
        l->retry_ev = event_new(host->commit.base, -1, 0, on_lane_retry, l);
        if (l->kick_ev == NULL || l->retry_ev == NULL)
            return es__error_set(err, ES_ENOMEM, "out of memory");
        int rc = es__store_lane_open(host->store, host->commit.base, &l->bl,
                                     err);
        if (rc != 0) return rc;
    }
    return 0;
}

/* Stop the commit loop (its lanes are idle: every command completed) and
 * free the lanes' events, connections and writers. */
void es__host_commit_teardown(es_host *host)
{
    if (host->commit.started) {
        event_active(host->commit.stop_ev, 0, 0);
        pthread_join(host->commit.thread, NULL);
        host->commit.started = false;
    }
    for (unsigned i = 0; host->commit.lanes && i < host->commit.n_lanes; i++) {
        lane *l = &host->commit.lanes[i];
        struct event **evs[] = {&l->kick_ev, &l->retry_ev};
        for (size_t j = 0; j < 2; j++)
            if (*evs[j]) {
                event_free(*evs[j]);
                *evs[j] = NULL;
            }
        if (l->bl) es__store_lane_close(host->store, l->bl);
        l->bl = NULL;
        es__store_background_close(host->store, &l->conn);
        es__free(l->live);
        l->live = NULL;
        l->cap = 0;
    }
    struct event **evs[] = {&host->commit.stop_ev, &host->commit.end_ev};
    for (size_t j = 0; j < 2; j++)
        if (*evs[j]) {
            event_free(*evs[j]);
            *evs[j] = NULL;
        }
    if (host->commit.base) event_base_free(host->commit.base);
    host->commit.base = NULL;
}
