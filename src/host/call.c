/*
 * es_host_call and es_host_query_call, the blocking calls, and their
 * process-wide pool of waiters.
 * The caller waits on a waiter's lock and condition; the completion (a
 * worker) fills it.  A worker that calls runs other actors while it
 * waits.  waiters_lock guards only the free list and is never held with
 * another lock.
 */
#include <stdio.h>
#include <string.h>

#include "host/host_int.h"

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
    char reason[256];    /* a query's failure */
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
    w->reason[0] = 0;
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

/* A blocking call to aggregate_id from this thread would wait for
 * itself: the aggregate's decide, query or callback runs below it. */
static bool calls_itself(es_host *host, const es_uuid *aggregate_id)
{
    if (host == NULL || es__host_tls != host || aggregate_id == NULL)
        return false;
    for (int i = 0; i < es__host_tls_depth; i++)
        if (es_uuid_equal(&es__host_tls_stack[i]->id, aggregate_id))
            return true;
    return false;
}

/* Wait until the completion filled w.  A worker runs other actors while
 * it waits, so that the pool cannot run out of threads. */
static void wait_done(es_host *host, waiter *w)
{
    bool on_worker = es__host_tls == host;
    for (;;) {
        pthread_mutex_lock(&w->lock);
        bool done = w->done;
        pthread_mutex_unlock(&w->lock);
        if (done) break;
        actor *a = on_worker && es__host_tls_depth < MAX_NESTED
                       ? es__host_runq_pop(host, false)
                       : NULL;
        if (a) {
            es__host_run_actor(host, a);
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
}

int es_host_call(es_host *host, const es_aggregate_type *type,
                 const es_uuid *aggregate_id, const es_command *command,
                 es_host_reply **out, es_error *err)
{
    if (out) *out = NULL;
    if (calls_itself(host, aggregate_id))
        return es__error_set(err, ES_EMISUSE, "a blocking call to the "
                                              "aggregate that is running "
                                              "would never return");
    waiter *w = waiter_get();
    if (w == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    int rc = es_host_send(host, type, aggregate_id, command, call_done, w,
                          err);
    if (rc != 0) {
        waiter_put(w);
        return rc;
    }
    wait_done(host, w);
    rc = w->status;
    es_host_reply *reply = w->reply;
    waiter_put(w);
    if (rc != 0 && err && reply)
        es__error_set(err, rc, "%s", reply->reason);
    if (out) *out = reply;
    else es_host_reply_free(reply);
    return rc;
}

static void query_call_done(void *ud, const es_query_result *r)
{
    waiter *w = ud;
    pthread_mutex_lock(&w->lock);
    w->status = r->status;
    snprintf(w->reason, sizeof w->reason, "%s", r->reason);
    w->done = true;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

int es_host_query_call(es_host *host, const es_aggregate_type *type,
                       const es_uuid *aggregate_id, es_query_fn fn, void *ud,
                       es_error *err)
{
    if (calls_itself(host, aggregate_id))
        return es__error_set(err, ES_EMISUSE, "a blocking query of the "
                                              "aggregate that is running "
                                              "would never return");
    waiter *w = waiter_get();
    if (w == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    int rc = es_host_query(host, type, aggregate_id, fn, ud, query_call_done,
                           w, err);
    if (rc != 0) {
        waiter_put(w);
        return rc;
    }
    wait_done(host, w);
    rc = w->status;
    if (rc != 0) es__error_set(err, rc, "%s", w->reason);
    waiter_put(w);
    return rc;
}
