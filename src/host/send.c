/*
 * es_host_send: a command accepted into its actor's mailbox (any thread);
 * es__host_admit and es__host_enqueue are shared with es_host_query.
 * Under the shard's lock it finds or makes the actor, evicting the
 * shard's least recently used idle actor for room (passivated later on
 * the I/O loop, handed over under hk.lock), and schedules the actor; the
 * run queue is pushed after the shard lock is released.
 */
#include <string.h>

#include <event2/event.h>

#include "host/host_int.h"

int es__host_admit(es_host *host, es_error *err)
{
    if (atomic_load(&host->closing))
        return es__error_set(err, ES_ECLOSED, "host is closing");
    if (atomic_fetch_add(&host->pending, 1) >= host->cfg.host_bound) {
        es__host_pending_done(host);
        metric_add(&host->busy, 1);
        return es__error_set(err, ES_EBUSY, "host is full");
    }
    if (atomic_load(&host->closing)) {
        es__host_pending_done(host);
        return es__error_set(err, ES_ECLOSED, "host is closing");
    }
    return 0;
}

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
    const htype *ht = es__host_find_type(host, type);
    if (ht == NULL)
        return es__error_set(err, ES_EINVAL, "aggregate type not "
                                             "registered");
    int rc = es__host_admit(host, err);
    if (rc != 0) return rc;
    hcmd *h = es__calloc(1, sizeof *h + command->len);
    if (h == NULL) {
        es__host_pending_done(host);
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
    return es__host_enqueue(host, ht, h, err);
}

int es__host_enqueue(es_host *host, const htype *ht, hcmd *h, es_error *err)
{
    const es_uuid *aggregate_id = &h->item.aggregate_id;
    shard *sh = es__host_shard_of(host, aggregate_id);
    actor *evicted = NULL, *fresh = NULL;
    bool push = false;
    int rc = 0;
    pthread_mutex_lock(&sh->lock);
    actor *a = es__host_shard_find(sh, aggregate_id, ht);
    if (a == NULL) {
        if (sh->resident >= host->shard_bound) {
            if (sh->lru_head) {
                evicted = sh->lru_head;
                es__host_unlink_actor(host, sh, evicted);
            } else {
                rc = ES_EBUSY;
            }
        }
        if (rc == 0) {
            fresh = es__calloc(1, sizeof *fresh);
            if (fresh != NULL) fresh->id = *aggregate_id; /* the hash key */
            if (fresh == NULL || es__host_shard_insert(sh, fresh) != 0)
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
            metric_add(&host->resident, 1);
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
        metric_add(h->query ? &host->queries : &host->accepted, 1);
        metric_add(&host->mailbox_depth, 1);
        push = es__host_schedule_locked(sh, a);
    }
    pthread_mutex_unlock(&sh->lock);
    es__free(fresh);
    if (evicted) { /* passivated on the loop (state_encode, free) */
        pthread_mutex_lock(&host->hk.lock);
        evicted->next = host->hk.evicted;
        host->hk.evicted = evicted;
        pthread_mutex_unlock(&host->hk.lock);
        event_active(host->io.wake_ev, 0, 0);
    }
    if (rc != 0) {
        es__free(h);
        es__host_pending_done(host);
        if (rc == ES_EBUSY) {
            metric_add(&host->busy, 1);
            return es__error_set(err, rc, "mailbox or resident bound is "
                                          "full");
        }
        return es__error_set(err, rc, "out of memory");
    }
    if (push) es__host_runq_push(host, a);
    return 0;
}
