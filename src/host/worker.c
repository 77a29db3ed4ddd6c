/*
 * The worker threads and the run queue.  A worker takes a scheduled actor
 * off the run queue (host->rq.lock) and runs it: results from its lane
 * first, then commands from its mailbox (shard->lock, taken briefly, never
 * while deciding), decided one at a time; decided items go to the actor's
 * commit lane.  Only the worker running an actor touches its state, its
 * pending and bounced lists; user code (decide, apply, callbacks) runs
 * with no lock held.  A worker waiting in es_host_call runs other actors
 * (nested, up to MAX_NESTED).
 */
#include <stdio.h>
#include <string.h>

#include "core/backoff.h"
#include "host/host_int.h"

#define RUN_BUDGET 64  /* commands per turn of an actor, for fairness */
#define MAX_ATTEMPTS 4 /* decisions of one command whose commit failed */
/* A load cut off from the database: the actor is parked and its load
 * tried again after this backoff (doubling, jittered, capped). */
#define LOAD_BACKOFF_MIN_MS 10
#define LOAD_BACKOFF_MAX_MS 1000

/* Which host this thread serves, and the actors it runs (nested when a
 * blocking call helps while it waits). */
_Thread_local es_host *es__host_tls;
_Thread_local const actor *es__host_tls_stack[MAX_NESTED];
_Thread_local int es__host_tls_depth;

void es__host_runq_push(es_host *host, actor *a)
{
    pthread_mutex_lock(&host->rq.lock);
    a->next = NULL;
    if (host->rq.tail) host->rq.tail->next = a;
    else host->rq.head = a;
    host->rq.tail = a;
    pthread_cond_signal(&host->rq.cond);
    pthread_mutex_unlock(&host->rq.lock);
}

/* Push a list of actors (linked by next) with one lock. */
void es__host_runq_push_list(es_host *host, actor *head, actor *tail, size_t n)
{
    pthread_mutex_lock(&host->rq.lock);
    if (host->rq.tail) host->rq.tail->next = head;
    else host->rq.head = head;
    host->rq.tail = tail;
    if (n == 1) pthread_cond_signal(&host->rq.cond);
    else pthread_cond_broadcast(&host->rq.cond);
    pthread_mutex_unlock(&host->rq.lock);
}

/* Next actor to run; with wait, blocks until one or the stop. */
actor *es__host_runq_pop(es_host *host, bool wait)
{
    pthread_mutex_lock(&host->rq.lock);
    while (wait && host->rq.head == NULL && !host->rq.stop)
        pthread_cond_wait(&host->rq.cond, &host->rq.lock);
    actor *a = host->rq.head;
    if (a) {
        host->rq.head = a->next;
        if (host->rq.head == NULL) host->rq.tail = NULL;
    }
    pthread_mutex_unlock(&host->rq.lock);
    return a;
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

/* A command whose commit had an unknown outcome and whose read-back
 * failed too is still unknown: never report it failed (guarantee 1). */
static int truth(const hcmd *h, int rc)
{
    return h->maybe_own && rc != ES_EIDEMPOTENCY ? ES_EUNKNOWN : rc;
}

/* The database could not be reached to load a or to look h up before
 * deciding it: wait the outage out without holding this worker.  h goes
 * back to the head of the mailbox (per-key order) and the actor is
 * parked (es__host_run_actor ends its turn; the loop's retry timer runs
 * it again after the backoff).  A host ending completes h instead:
 * ES_ECLOSED.  h may be a query. */
void es__host_park_item(es_host *host, actor *a, hcmd *h)
{
    a->park_ms = (uint16_t)es__backoff_grow(a->park_ms, LOAD_BACKOFF_MIN_MS,
                                            LOAD_BACKOFF_MAX_MS);
    if (atomic_load(&host->ending) && h->query) {
        es__host_query_complete(host, h, ES_ECLOSED, ES_HOST_NO_VERSION,
                                "host ended while the database could not "
                                "be reached to load the aggregate");
        return;
    }
    if (atomic_load(&host->ending)) {
        es__host_complete_error(host, h, truth(h, ES_ECLOSED),
                                ES_HOST_NO_VERSION,
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
    metric_add(&host->mailbox_depth, 1);
    a->parked = true;
}

/* A command id the store knows: answer the original outcome or
 * ES_EIDEMPOTENCY.  Returns true when h was completed. */
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
            es__host_park_item(host, a, h);
            return true;
        }
        es__host_complete_error(host, h, truth(h, rc),
                                es__host_actor_version(a), err.message);
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
            es__host_park_item(host, a, h);
            return true;
        }
        es__host_complete_error(host, h, truth(h, rc),
                                es__host_actor_version(a), err.message);
        return true;
    }
    if (!es_uuid_equal(&rec->aggregate_id, &a->id) ||
        !es__command_matches(rec, h->kind, h->payload, h->len)) {
        es_txn_rollback(txn);
        es__free(rec);
        es__host_complete_error(host, h, ES_EIDEMPOTENCY,
                                es__host_actor_version(a),
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
        es__host_complete_error(
            host, h, truth(h, ES_EFORGOTTEN), es__host_actor_version(a),
            "aggregate was forgotten: the command was rejected, "
            "its reason is destroyed");
        es__free(rec);
        return true;
    }
    if (rec->rejected) {
        es_txn_rollback(txn);
        es__host_complete(host, h, ES_EREJECTED, rec->version, NULL, 0,
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
        es__host_complete(host, h, 0, rec->version, c.ev, c.n, "", dup);
    else if (rc == ES_EWRONGTYPE) /* the same command, to another type */
        es__host_complete_error(host, h, rc, ES_HOST_NO_VERSION, err.message);
    else if (rc == ES_EFORGOTTEN) /* committed; its data key destroyed */
        es__host_complete_error(
            host, h, ES_EFORGOTTEN, es__host_actor_version(a),
            "aggregate was forgotten: the command was accepted, "
            "its events are destroyed");
    else /* the record says it committed: never answer a failure */
        es__host_complete_error(
            host, h, ES_EUNKNOWN, es__host_actor_version(a),
            "committed, but its events could not be read back");
    for (size_t i = 0; i < c.n; i++) es__free((void *)c.ev[i].data);
    es__free(c.ev);
    es__free(rec);
    return true;
}

/* The head of a's mailbox may be taken: a query waits until the outcome
 * of every item decided before it is known (nothing pending), so that it
 * reads committed state only.  The shard lock is held; pend_head is the
 * running worker's own. */
static bool mailbox_ready(const actor *a)
{
    return a->mb_head != NULL && !(a->mb_head->query && a->pend_head);
}

static bool same_content(const hcmd *a, const hcmd *b)
{
    return a->kind == b->kind && a->len == b->len &&
           (a->len == 0 || memcmp(a->payload, b->payload, a->len) == 0);
}

static void enqueue_item(es_host *host, actor *a, hcmd *h, submit *sub,
                         uint64_t t_decided);

/* Decide one command; on success its item joins the submit list. */
static void process_command(es_host *host, actor *a, hcmd *h, submit *sub)
{
    uint64_t t0 = es__now_ns();
    if (h->attempts == 0) es__hist_record(&host->h_queue, t0 - h->t_accept);
    if (atomic_load(&host->closing_now)) {
        es__host_complete_error(host, h, ES_ECLOSED, es__host_actor_version(a),
                                "host closed");
        return;
    }
    /* Idempotency: in flight here first, then the store. */
    for (hcmd *p = a->pend_head; p; p = p->next) {
        if (!es_uuid_equal(&p->id, &h->id)) continue;
        if (!same_content(p, h)) {
            es__host_complete_error(
                host, h, ES_EIDEMPOTENCY, es__host_actor_version(a),
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
        es__host_complete_error(host, h, truth(h, ES_ECLOSED),
                                ES_HOST_NO_VERSION,
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
        int rc = es__host_actor_load(host, a, &err);
        if (rc == ES_EDB && es__unreachable(&err)) {
            es__host_park_item(host, a, h);
            return;
        }
        if (rc != 0) {
            es__host_complete_error(host, h, truth(h, rc), ES_HOST_NO_VERSION,
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
    int rc = a->ht->decide(a->ht->user, es__host_actor_state(a), &cmd, &em);
    em.active = false;
    if (rc != 0 || em.rejected || em.failed != 0) {
        /* A rejection is an outcome (guarantee 3) and is recorded like one;
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
        es__host_emitter_free(&em);
        uint64_t t_rejected = es__now_ns();
        es__hist_record(&host->h_decide, t_rejected - td);
        /* A command accepted before may be rejected on today's state:
         * its original outcome wins. */
        if (host->has_commands && host->lazy_ids && h->attempts == 0 &&
            answer_from_store(host, a, h, false))
            return;
        if (!rejection || !host->has_commands) {
            es__host_complete_error(host, h, ES_EREJECTED,
                                    es__host_actor_version(a), reason);
            return;
        }
        /* Answered once its record committed, after the items before it:
         * it may have been decided on their events. */
        h->reason = es__strdup(reason);
        if (h->reason == NULL) {
            es__host_complete_error(host, h, ES_ENOMEM,
                                    es__host_actor_version(a), "out of memory");
            return;
        }
        enqueue_item(host, a, h, sub, t_rejected);
        return;
    }
    rc = es__host_apply_emitted(a, &em, &err);
    es__host_emitter_free(&em);
    uint64_t t_decided = es__now_ns();
    es__hist_record(&host->h_decide, t_decided - td);
    if (rc != 0) {
        if (host->has_commands && host->lazy_ids && h->attempts == 0 &&
            rc != ES_ENOMEM && answer_from_store(host, a, h, false))
            return;
        es__host_complete_error(host, h, rc == ES_ENOMEM ? rc : ES_EAPPLY,
                                es__host_actor_version(a), err.message);
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
    uint64_t v = es__host_actor_version(a);
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
        snap_job *j = es__host_snap_of(a);
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

static void submit_flush(es_host *host, actor *a, submit *sub)
{
    if (sub->n == 0) return;
    pthread_mutex_lock(&a->sh->lock);
    a->inflight += sub->n;
    pthread_mutex_unlock(&a->sh->lock);
    es__host_lane_push(host, a, sub);
}

static bool retryable(int status)
{
    return status == ES_ECONFLICT || status == ES_EIDEMPOTENCY ||
           status == ES_EUNKNOWN;
}

/* Outcomes from the commit lane, in the order the actor decided them. */
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
                es__host_snap_enqueue(host, (snap_job *)(void *)h->snap);
                h->snap = NULL;
            }
            if (h->item.record.rejected)
                es__host_complete(host, h, ES_EREJECTED, h->item.record.version,
                                  NULL, 0, h->reason, false);
            else
                es__host_complete(host, h, 0, h->item.record.version,
                                  h->item.events, h->item.n_events, "", false);
            continue;
        }
        a->broken = true;
        if (st == ES_ECONFLICT) metric_add(&host->conflicts, 1);
        if (st == ES_EUNKNOWN) h->maybe_own = true;
        if (retryable(st) && ++h->attempts < MAX_ATTEMPTS &&
            !atomic_load(&host->closing_now)) {
            es__host_free_item_data(h);
            if (a->bnc_tail) a->bnc_tail->next = h;
            else a->bnc_head = h;
            a->bnc_tail = h;
            continue;
        }
        es__host_complete_error(host, h, st, ES_HOST_NO_VERSION,
                                st == ES_ECONFLICT ? "commit kept conflicting"
                                                   : h->item.why);
    }
}

/* All items of a broken actor are back: drop the state (loaded again on
 * the next command) and decide the returned commands again first. */
static void actor_rebuild(es_host *host, actor *a)
{
    /* Committed events may not be in a snapshot yet (a failed item may
     * even have taken the every-N turn): passivation at shutdown loads
     * the state again to write one, unless a command loads it first. */
    if (es__host_actor_version(a) != ES_HOST_NO_VERSION) a->snap_owed = true;
    es__host_actor_drop_state(a);
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
    metric_add(&host->mailbox_depth, n);
    a->bnc_head = a->bnc_tail = NULL;
}

void es__host_run_actor(es_host *host, actor *a)
{
    shard *sh = a->sh;
    submit sub = {NULL, NULL, 0};
    int budget = RUN_BUDGET;
    es__host_tls_stack[es__host_tls_depth++] = a;
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
        if (res == NULL && !a->broken && mailbox_ready(a) && budget > 0) {
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
            metric_sub(&host->mailbox_depth, 1);
            h->next = NULL;
            if (h->query) es__host_run_query(host, a, h);
            else process_command(host, a, h, &sub);
            budget--;
            if (a->parked) {
                a->parked = false;
                submit_flush(host, a, &sub);
                es__host_actor_compact(a);
                es__host_tls_depth--;
                es__host_park(host,
                              a); /* from here on another worker may run a */
                return;
            }
            if (sub.n >= RUN_BUDGET) submit_flush(host, a, &sub);
            continue;
        }
        if (hand_over) es__host_lane_push(host, a, &sub);
        if (a->broken) {
            pthread_mutex_lock(&sh->lock);
            bool all_back = a->inflight == 0 && a->res_head == NULL;
            pthread_mutex_unlock(&sh->lock);
            if (all_back) {
                actor_rebuild(host, a);
                continue;
            }
        }
        es__host_actor_compact(a);
        pthread_mutex_lock(&sh->lock);
        if (a->res_head || (!a->broken && mailbox_ready(a) && budget > 0)) {
            pthread_mutex_unlock(&sh->lock);
            continue;
        }
        /* A query waiting for the outcomes of items in flight: their
         * results schedule the actor again (lane_post). */
        bool requeue = !a->broken && mailbox_ready(a);
        bool drop = false;
        if (!requeue) {
            a->scheduled = false;
            if (!a->broken && a->inflight == 0 && a->mb_head == NULL) {
                /* An actor that holds no state (its load failed, e.g.
                 * ES_EWRONGTYPE, or its commands were answered from the
                 * store) is not kept: the next command loads anyway. */
                drop = !a->loaded && !a->snap_owed;
                if (drop) {
                    es__host_unlink_actor(host, sh, a);
                } else {
                    a->last_used = es__now_ns();
                    es__host_lru_append(sh, a);
                }
            }
        }
        pthread_mutex_unlock(&sh->lock);
        /* From here on another worker may run a: do not touch it. */
        if (requeue) es__host_runq_push(host, a);
        if (drop) {
            es__host_actor_drop_state(a);
            es__free(a);
        }
        break;
    }
    es__host_tls_depth--;
}

void *es__host_worker_main(void *arg)
{
    es_host *host = arg;
    es__host_tls = host;
    for (;;) {
        actor *a = es__host_runq_pop(host, true);
        if (a == NULL) break;
        es__host_run_actor(host, a);
    }
    return NULL;
}
