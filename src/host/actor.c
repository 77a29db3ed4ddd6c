/*
 * An actor's state: its version, compacting it while idle and expanding
 * it into a context while running, dropping it, and loading it from the
 * store.  Thread: the worker running the actor (the closing thread once
 * the workers are gone); no lock is held, and these run user code (the
 * type's state callbacks, es_store_load's apply).
 */
#include <string.h>

#include "core/backoff.h"
#include "host/host_int.h"

uint64_t es__host_actor_version(const actor *a)
{
    if (a->ctx) return es_context_version(a->ctx);
    return a->state ? a->version : ES_HOST_NO_VERSION;
}

const void *es__host_actor_state(const actor *a)
{
    return a->ctx ? es_context_state(a->ctx) : a->state;
}

/* Idle: keep the state without its context. */
void es__host_actor_compact(actor *a)
{
    if (a->ctx == NULL) return;
    a->state = es__context_release(a->ctx, &a->version);
    a->ctx = NULL;
}

/* Running: a context around the state (none before the first event). */
int es__host_actor_expand(actor *a)
{
    if (a->ctx != NULL || a->state == NULL) return 0;
    a->ctx = es__context_adopt(a->ht->type, &a->id, a->version, a->state);
    if (a->ctx == NULL) return ES_ENOMEM;
    a->state = NULL;
    return 0;
}

void es__host_actor_drop_state(actor *a)
{
    es_context_free(a->ctx);
    a->ctx = NULL;
    if (a->state) {
        if (a->ht->type->state_free) a->ht->type->state_free(a->state);
        es__free(a->state);
        a->state = NULL;
    }
}

int es__host_actor_load(es_host *host, actor *a, es_error *err)
{
    uint64_t t0 = es__mono_ns();
    es_context *ctx = NULL;
    int rc = 0;
    /* A load only reads: one cut by a lost connection is tried again on
     * a fresh connection (twice), instead of failing the command. */
    for (int attempt = 0; attempt < 3; attempt++) {
        memset(err, 0, sizeof *err);
        rc = es_store_load(host->store, a->ht->type, &a->id, &ctx, err);
        if (rc != ES_EDB || !es__unreachable(err)) break;
    }
    uint64_t took = es__mono_ns() - t0;
    metric_add(&host->loads, 1);
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
        snap_job *j = es__host_snap_of(a);
        if (j) es__host_snap_enqueue(host, j);
    }
    return 0;
}
