/*
 * The I/O loop: a libevent event_base (the host's own, run by its io
 * thread, or the embedder's) carrying the host's timers: idle
 * passivation (sweep), the snapshot flush, the retry of parked actors,
 * and passivation of actors es_host_send evicted.  Its callbacks run on
 * the loop's thread; other threads wake it with events, never by
 * polling.  host->hk.lock guards the evicted and parked lists and the
 * retry timer (event_add under it: then libevent's lock of the base).
 * Passivation runs the type's state_encode and state_free here.
 */
#include <string.h>
#include <time.h>

#include <event2/event.h>
#include <event2/thread.h>

#include "core/backoff.h"
#include "host/host_int.h"

/* A parked actor due within this of now is run: the retry timer may fire
 * a little early by es__mono_ns (libevent adds a timeout to the loop's
 * cached time), and without it the loop would arm again for a few us. */
#define RETRY_SLACK_NS 1000000u

/* Free an actor nobody can reach any more; with a snapshot job on the
 * list when the policy wants one. */
void es__host_passivate(es_host *host, actor *a, bool snapshot, snap_job **jobs)
{
    if (snapshot && host->cfg.snap_on_passivation &&
        es__host_actor_version(a) != ES_HOST_NO_VERSION &&
        es__host_actor_version(a) + 1 > a->folded_at_snapshot) {
        snap_job *j = es__host_snap_of(a);
        if (j) {
            j->next = *jobs;
            *jobs = j;
        }
    }
    es__host_actor_drop_state(a);
    es__free(a);
    metric_add(&host->passivations, 1);
}

/* Jitter of the load backoff: between half and all of ms, in ns. */
static uint64_t jittered_ns(const actor *a, unsigned ms)
{
    uint64_t seed = (es__mono_ns() ^ es__host_key_hash(&a->id)) | 1u;
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
    if (host->hk.retry_due != 0 && host->hk.retry_due <= due) return true;
    if (host->io.retry_ev == NULL) return false;
    uint64_t us = due > now ? (due - now) / 1000u : 0;
    struct timeval tv = {(time_t)(us / 1000000u),
                         (suseconds_t)(us % 1000000u)};
    if (event_add(host->io.retry_ev, &tv) != 0) return false;
    host->hk.retry_due = due;
    return true;
}

/* The worker's last touch of a parked actor: it stays scheduled (so
 * es_host_send does not queue it and it is never passivated) and the
 * loop's retry timer puts it back on the run queue when its backoff is
 * over.  A host ending runs it at once: its commands complete. */
void es__host_park(es_host *host, actor *a)
{
    uint64_t now = es__mono_ns();
    uint64_t due = now + jittered_ns(a, a->park_ms);
    /* One lock for the list and the timer: on_retry either sees a on the
     * list or runs after the timer is armed for it. */
    pthread_mutex_lock(&host->hk.lock);
    bool now_run = atomic_load(&host->ending) ||
                   !arm_retry_locked(host, due, now);
    if (!now_run) {
        a->last_used = due;
        a->next = host->hk.parked;
        host->hk.parked = a;
    }
    pthread_mutex_unlock(&host->hk.lock);
    if (now_run) es__host_runq_push(host, a);
}

/* Take the parked actors due by now (all with all) off the list (hk_lock
 * held) and arm the timer for the earliest of the others; returns the
 * actors taken, linked by next, their number in *n.  The timer fired, or
 * is ignored (all): whatever it was armed for is forgotten. */
actor *es__host_unpark_locked(es_host *host, uint64_t now, bool all,
                              actor **tail, size_t *n)
{
    actor *head = NULL, **pp = &host->hk.parked;
    *tail = NULL;
    *n = 0;
    host->hk.retry_due = 0;
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
        if (*tail) (*tail)->next = host->hk.parked;
        else head = host->hk.parked;
        for (actor *a = host->hk.parked; a; a = a->next) {
            *tail = a;
            (*n)++;
        }
        host->hk.parked = NULL;
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
    pthread_mutex_lock(&host->hk.lock);
    actor *head = es__host_unpark_locked(host, es__mono_ns(), false, &tail, &n);
    pthread_mutex_unlock(&host->hk.lock);
    if (head) es__host_runq_push_list(host, head, tail, n);
}

static void evict_idle(es_host *host, snap_job **jobs)
{
    uint64_t now = es__mono_ns();
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
            es__host_unlink_actor(host, sh, a);
            a->next = list;
            list = a;
        }
        pthread_mutex_unlock(&sh->lock);
        while (list) {
            actor *next = list->next;
            es__host_passivate(host, list, true, jobs);
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
    pthread_mutex_lock(&host->hk.lock);
    actor *evicted = host->hk.evicted;
    host->hk.evicted = NULL;
    pthread_mutex_unlock(&host->hk.lock);
    snap_job *jobs = NULL;
    bool now = atomic_load(&host->closing_now);
    while (evicted) {
        actor *next = evicted->next;
        es__host_passivate(host, evicted, !now, &jobs);
        evicted = next;
    }
    es__host_snap_enqueue(host, jobs);
}

/* Loop, every tick: passivate the actors idle for idle_ms. */
static void on_sweep(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    es_host *host = arg;
    snap_job *jobs = NULL;
    evict_idle(host, &jobs);
    es__host_snap_enqueue(host, jobs);
}

/* Loop, FLUSH_MS after the first snapshot job was queued: wake the
 * writer (it writes on its own thread: never a store round trip here). */
static void on_flush(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    es_host *host = arg;
    pthread_mutex_lock(&host->sw.lock);
    host->sw.flush_armed = false;
    host->sw.flush = true;
    pthread_cond_signal(&host->sw.cond);
    pthread_mutex_unlock(&host->sw.lock);
}

/* Our own loop only: stop it (activated by host_end; an activation made
 * before the loop started is run by its first turn, unlike a loopbreak). */
static void on_stop(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    event_base_loopbreak(((es_host *)arg)->io.base);
}

void *es__host_io_main(void *arg)
{
    es_host *host = arg;
    es__host_tls = host;
    event_base_loop(host->io.base, EVLOOP_NO_EXIT_ON_EMPTY);
    return NULL;
}

static pthread_once_t evthread_once = PTHREAD_ONCE_INIT;
static int evthread_rc;

static void evthread_init(void) { evthread_rc = evthread_use_pthreads(); }

int es__host_evthread(void)
{
    pthread_once(&evthread_once, evthread_init);
    return evthread_rc;
}

/* Make the loop's events; with no base of the embedder's, our own base
 * (libevent's pthread locks on first: other threads activate events). */
int es__host_io_setup(es_host *host)
{
    host->io.base = host->cfg.base;
    if (host->io.base == NULL) {
        if (es__host_evthread() != 0) return ES_EIO;
        host->io.base = event_base_new();
        if (host->io.base == NULL) return ES_ENOMEM;
        host->io.own_base = true;
        host->io.stop_ev = event_new(host->io.base, -1, 0, on_stop, host);
        if (host->io.stop_ev == NULL) return ES_ENOMEM;
    }
    host->io.wake_ev = event_new(host->io.base, -1, 0, on_wake, host);
    host->io.flush_ev = event_new(host->io.base, -1, 0, on_flush, host);
    host->io.retry_ev = event_new(host->io.base, -1, 0, on_retry, host);
    if (host->io.wake_ev == NULL || host->io.flush_ev == NULL ||
        host->io.retry_ev == NULL)
        return ES_ENOMEM;
    if (host->cfg.idle_ms > 0) {
        /* a quarter of the idle time, between 1 ms and 100 ms */
        uint64_t tick_ms = host->cfg.idle_ms / 4;
        if (tick_ms > 100) tick_ms = 100;
        if (tick_ms < 1) tick_ms = 1;
        host->io.sweep_ev =
            event_new(host->io.base, -1, EV_PERSIST, on_sweep, host);
        struct timeval tv = {(time_t)(tick_ms / 1000),
                             (suseconds_t)(tick_ms % 1000 * 1000)};
        if (host->io.sweep_ev == NULL || event_add(host->io.sweep_ev, &tv) != 0)
            return ES_ENOMEM;
    }
    return 0;
}

/* Delete the loop's events: event_del waits for a callback running on
 * the loop's thread to return, so none runs after this.  With our own
 * base, the loop is stopped first and the base freed. */
void es__host_io_teardown(es_host *host)
{
    if (host->io.started) {
        event_active(host->io.stop_ev, 0, 0);
        pthread_join(host->io.thread, NULL);
        host->io.started = false;
    }
    /* the flush timer after the callbacks that may arm it */
    struct event **evs[] = {&host->io.sweep_ev, &host->io.wake_ev,
                            &host->io.flush_ev, &host->io.retry_ev,
                            &host->io.stop_ev};
    for (size_t i = 0; i < sizeof evs / sizeof evs[0]; i++) {
        if (*evs[i] == NULL) continue;
        event_del(*evs[i]);
        event_free(*evs[i]);
        *evs[i] = NULL;
    }
    if (host->io.own_base && host->io.base) event_base_free(host->io.base);
    host->io.base = NULL;
    host->io.own_base = false;
}
