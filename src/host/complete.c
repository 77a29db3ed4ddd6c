/*
 * Completions: a command's outcome handed to its callback (and to the
 * callbacks of its duplicates), counted, and the command freed.  Runs on
 * a worker, or on the thread closing the host; no lock is held while a
 * callback runs.  host->drain_lock only wakes a close waiting for the last
 * completion.
 */
#include <string.h>

#include "host/host_int.h"

void es__host_free_item_data(hcmd *h)
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

void es__host_pending_done(es_host *host)
{
    if (atomic_fetch_sub(&host->pending, 1) == 1 &&
        atomic_load(&host->closing)) {
        pthread_mutex_lock(&host->drain_lock);
        pthread_cond_broadcast(&host->drain_cond);
        pthread_mutex_unlock(&host->drain_lock);
    }
}

/* Counted before the callback, so a caller woken by it sees the counts. */
static void complete_one(es_host *host, hcmd *h, const es_host_result *r)
{
    metric_add(&host->completed, 1);
    if (r->status == ES_EREJECTED || r->status == ES_EAPPLY)
        metric_add(&host->rejected, 1);
    if (r->duplicate) metric_add(&host->duplicate, 1);
    es__hist_record(&host->h_total, es__mono_ns() - h->t_accept);
    if (h->done) h->done(h->ud, r);
}

/* Call the completion of h and of its duplicates, then free them all. */
void es__host_complete(es_host *host, hcmd *h, int status, uint64_t version,
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
    complete_one(host, h, &r);
    hcmd *d = h->dups;
    r.duplicate = true;
    size_t done = 1;
    while (d) {
        hcmd *next = d->next;
        complete_one(host, d, &r);
        es__free(d);
        d = next;
        done++;
    }
    es__host_free_item_data(h);
    es__free(h);
    while (done-- > 0) es__host_pending_done(host);
}

void es__host_complete_error(es_host *host, hcmd *h, int status,
                             uint64_t version, const char *reason)
{
    es__host_complete(host, h, status, version, NULL, 0,
                      reason && reason[0] ? reason : es_strerror(status),
                      false);
}
