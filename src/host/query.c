/*
 * es_host_query: a read-only function run on an aggregate's state, queued
 * in its mailbox like a command, so that it is ordered with the commands.
 *
 * Why the state it sees is committed: the actor applies a command's
 * events as soon as it decided it (pipelining), before they commit.  A
 * query at the head of the mailbox is therefore not taken while the
 * actor has items pending (decided, outcome not processed): the worker
 * hands them to their lane, ends its turn, and their results schedule
 * the actor again (worker.c, mailbox_ready).  With nothing pending the
 * state holds exactly the committed events of every command taken from
 * the mailbox before the query; a failed commit has rebuilt it from the
 * store and decided the returned commands again (they go back ahead of
 * the query) before that.  A query never enters the pending list or a
 * lane.
 */
#include <string.h>

#include "core/backoff.h"
#include "host/host_int.h"

int es_host_query(es_host *host, const es_aggregate_type *type,
                  const es_uuid *aggregate_id, es_query_fn fn, void *ud,
                  es_query_done_fn done, void *done_ud, es_error *err)
{
    if (host == NULL || aggregate_id == NULL || fn == NULL)
        return es__error_set(err, ES_EINVAL, "host, aggregate id and query "
                                             "function are required");
    if (es_uuid_is_nil(aggregate_id))
        return es__error_set(err, ES_EINVAL, "aggregate id must not be nil");
    const htype *ht = es__host_find_type(host, type);
    if (ht == NULL)
        return es__error_set(err, ES_EINVAL, "aggregate type not "
                                             "registered");
    int rc = es__host_admit(host, err);
    if (rc != 0) return rc;
    hcmd *h = es__calloc(1, sizeof *h + sizeof(hquery));
    if (h == NULL) {
        es__host_pending_done(host);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    hquery q = {fn, ud, done, done_ud};
    memcpy(h->payload, &q, sizeof q);
    h->len = sizeof q;
    h->query = true;
    h->item.aggregate_id = *aggregate_id;
    h->t_accept = es__mono_ns();
    return es__host_enqueue(host, ht, h, err);
}

void es__host_query_complete(es_host *host, hcmd *h, int status,
                             uint64_t version, const char *reason)
{
    hquery q;
    memcpy(&q, h->payload, sizeof q);
    es_query_result r;
    memset(&r, 0, sizeof r);
    r.status = status;
    r.version = version;
    r.reason = status == 0 ? ""
               : reason && reason[0] ? reason
                                     : es_strerror(status);
    r.aggregate_id = h->item.aggregate_id;
    es__hist_record(&host->h_query, es__mono_ns() - h->t_accept);
    if (q.done) q.done(q.done_ud, &r);
    es__free(h);
    es__host_pending_done(host);
}

/* A fresh query of a resident actor: fold in the events stored after its
 * version (written by another process).  A state the store no longer
 * matches is replayed from the start (es__context_load_into). */
static int refresh(es_host *host, actor *a, es_error *err)
{
    if (a->ctx == NULL && a->state == NULL) return 0; /* no event yet */
    int rc = es__host_actor_expand(a);
    if (rc != 0) return es__error_set(err, rc, "out of memory");
    es_txn *txn = NULL;
    rc = es__store_begin_read(host->store, &txn, err);
    if (rc != 0) return rc;
    rc = es__context_load_into(txn, a->ctx, false, err);
    es_txn_rollback(txn);
    return rc;
}

void es__host_run_query(es_host *host, actor *a, hcmd *h)
{
    if (atomic_load(&host->closing_now)) {
        es__host_query_complete(host, h, ES_ECLOSED, ES_HOST_NO_VERSION,
                                "host closed");
        return;
    }
    if (!a->loaded && a->park_ms != 0 && atomic_load(&host->ending)) {
        es__host_query_complete(host, h, ES_ECLOSED, ES_HOST_NO_VERSION,
                                "host ended while the database could not "
                                "be reached to load the aggregate");
        return;
    }
    if (a->loaded && host->cfg.query_fresh) {
        es_error err = {0};
        int rc = refresh(host, a, &err);
        if (rc == ES_EDB && es__unreachable(&err)) {
            es__host_park_item(host, a, h);
            return;
        }
        if (rc != 0) { /* loaded again by the next item that needs it */
            es__host_actor_drop_state(a);
            a->loaded = false;
            es__host_query_complete(host, h, rc, ES_HOST_NO_VERSION,
                                    err.message);
            return;
        }
    }
    if (!a->loaded) {
        es_error err = {0};
        int rc = es__host_actor_load(host, a, &err);
        if (rc == ES_EDB && es__unreachable(&err)) {
            es__host_park_item(host, a, h);
            return;
        }
        if (rc != 0) { /* the actor stays unloaded: dropped after the turn */
            es__host_query_complete(host, h, rc, ES_HOST_NO_VERSION,
                                    err.message);
            return;
        }
    }
    uint64_t version = es__host_actor_version(a);
    if (version == ES_HOST_NO_VERSION) {
        /* No event: nothing worth keeping resident for a read.  Marked
         * unloaded, the actor is dropped after its turn unless more items
         * wait (a command then loads it again). */
        a->loaded = false;
        es__host_query_complete(host, h, ES_ENOTFOUND, ES_HOST_NO_VERSION,
                                "aggregate has no events");
        return;
    }
    hquery q;
    memcpy(&q, h->payload, sizeof q);
    int rc = q.fn(q.ud, es__host_actor_state(a), version);
    es__host_query_complete(host, h, rc, version,
                            rc ? "query function failed" : "");
}
