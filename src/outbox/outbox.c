/*
 * The outbox dispatcher: claims messages through the store's outbox
 * operations, hands them to handlers on worker threads, records verdicts.
 *
 * One claimer thread takes a batch, queues it for the workers, writes
 * their verdicts in groups while they work (one write per group, not per
 * message), waits until the whole batch is finished, then claims again at
 * once (a finished
 * message may free the next one of its aggregate); with nothing to claim
 * it sleeps until a commit wakes it or the poll interval passes.  A commit
 * of this process wakes it through the store's commit listeners; where
 * the store can hear other processes (PostgreSQL: LISTEN/NOTIFY, on a
 * thread and connection of the store's watch), so does theirs.  Per
 * aggregate order comes from the claim itself: only the first pending
 * message of an aggregate can be claimed.
 *
 * Lock rule: `lock` guards the queue, the counters of the batch and the
 * flags; it is never held while a handler or the store runs.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "core/backoff.h"
#include "core/internal.h"
#include "eventastic/outbox.h"
#include "store/store_impl.h"

typedef struct handler_reg {
    const es_aggregate_type *type;
    int32_t kind;
    es_outbox_handler fn;
    void *ud;
} handler_reg;

struct es_outbox_config {
    es_store *store;
    handler_reg *handlers;
    size_t n_handlers, cap_handlers;
    size_t workers, batch;
    int64_t lease_ms, poll_ms, base_ms, max_ms;
    int64_t retention_ms; /* done messages kept this long; 0: for ever */
    uint32_t max_attempts;
    char owner[64];
    es_clock_fn clock;
    void *clock_ud;
};

struct es_outbox {
    es_outbox_config cfg; /* handlers array owned */
    es__outbox_filter *filters;
    pthread_mutex_t lock;
    pthread_cond_t wake_cv;  /* claimer: a commit or a stop */
    pthread_cond_t work_cv;  /* workers: queue not empty or stop */
    pthread_cond_t done_cv;  /* claimer: batch finished (monotonic) */
    bool stopping, woken, listening, claimer_started;
    es__outbox_watch *watch; /* NULL: the store hears no other process */
    es_outbox_entry_list *batch;
    size_t next_item, outstanding;
    es__outbox_outcome *verdicts; /* of the batch, n_verdicts written */
    size_t n_verdicts;
    pthread_t claimer;
    pthread_t *workers;
    size_t n_workers;
    uint64_t rng;
    _Atomic uint64_t deliveries, done, retries, dead, rounds, notifications;
};

static int64_t system_clock(void *ud)
{
    (void)ud;
    return es_clock_now_ms();
}

void es_outbox_entry_list_free(es_outbox_entry_list *list)
{
    if (list == NULL) return;
    for (size_t i = 0; i < list->count; i++)
        es__free((void *)list->items[i].side_effect.data);
    es__free(list->items);
    es__free(list);
}

/* ---- configuration ---- */

int es_outbox_config_new(es_store *store, es_outbox_config **out,
                         es_error *err)
{
    if (store == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "store and out are required");
    if (!es__store_has_outbox(store))
        return es__error_set(err, ES_EINVAL, "the %s store has no outbox",
                             es__store_name(store));
    es_outbox_config *cfg = es__calloc(1, sizeof *cfg);
    if (cfg == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    cfg->store = store;
    cfg->workers = 4;
    cfg->batch = 64;
    cfg->lease_ms = 30000;
    cfg->poll_ms = 1000;
    cfg->max_attempts = 10;
    cfg->base_ms = 100;
    cfg->max_ms = 60000;
    cfg->clock = system_clock;
    es_uuid id;
    char text[ES_UUID_STRLEN + 1];
    if (es_uuid_v7(&id) != 0) {
        es__free(cfg);
        return es__error_set(err, ES_EIO, "no random bytes for the owner");
    }
    snprintf(cfg->owner, sizeof cfg->owner, "dispatcher-%s",
             es_uuid_format(&id, text));
    *out = cfg;
    return 0;
}

void es_outbox_config_free(es_outbox_config *cfg)
{
    if (cfg == NULL) return;
    es__free(cfg->handlers);
    es__free(cfg);
}

int es_outbox_config_add_handler(es_outbox_config *cfg,
                                 const es_aggregate_type *type, int32_t kind,
                                 es_outbox_handler handler, void *ud,
                                 es_error *err)
{
    if (cfg == NULL || handler == NULL)
        return es__error_set(err, ES_EINVAL, "config and handler are "
                                             "required");
    int rc = es_aggregate_type_check(type, err);
    if (rc != 0) return rc;
    if (type->side_effect_decode == NULL)
        return es__error_set(err, ES_EINVAL, "type '%s' has no side-effect "
                             "codec", type->name);
    for (size_t i = 0; i < cfg->n_handlers; i++)
        if (strcmp(cfg->handlers[i].type->name, type->name) == 0 &&
            cfg->handlers[i].kind == kind)
            return es__error_set(err, ES_EINVAL, "a handler for type '%s' "
                                 "and this kind is already registered",
                                 type->name);
    void *items = cfg->handlers;
    if (es__grow(&items, &cfg->cap_handlers, cfg->n_handlers + 1,
                 sizeof(handler_reg)))
        return es__error_set(err, ES_ENOMEM, "out of memory");
    cfg->handlers = items;
    cfg->handlers[cfg->n_handlers++] = (handler_reg){type, kind, handler, ud};
    return 0;
}

#define CHECK_RANGE(v, lo, hi, what)                                          \
    do {                                                                      \
        if (cfg == NULL || (v) < (lo) || (v) > (hi))                          \
            return es__error_set(err, ES_EINVAL, "%s out of range", what);    \
    } while (0)

int es_outbox_config_set_concurrency(es_outbox_config *cfg, size_t workers,
                                     es_error *err)
{
    CHECK_RANGE(workers, 1, 256, "workers");
    cfg->workers = workers;
    return 0;
}

int es_outbox_config_set_batch_size(es_outbox_config *cfg, size_t batch,
                                    es_error *err)
{
    CHECK_RANGE(batch, 1, 10000, "batch size");
    cfg->batch = batch;
    return 0;
}

int es_outbox_config_set_lease_ms(es_outbox_config *cfg, int64_t lease_ms,
                                  es_error *err)
{
    CHECK_RANGE(lease_ms, 10, 86400000, "lease");
    cfg->lease_ms = lease_ms;
    return 0;
}

int es_outbox_config_set_poll_ms(es_outbox_config *cfg, int64_t poll_ms,
                                 es_error *err)
{
    CHECK_RANGE(poll_ms, 1, 3600000, "poll interval");
    cfg->poll_ms = poll_ms;
    return 0;
}

int es_outbox_config_set_retention(es_outbox_config *cfg, int64_t done_ms,
                                   es_error *err)
{
    CHECK_RANGE(done_ms, 0, INT64_MAX / 2, "retention");
    cfg->retention_ms = done_ms;
    return 0;
}

int es_outbox_config_set_retry(es_outbox_config *cfg, uint32_t max_attempts,
                               int64_t base_ms, int64_t max_ms,
                               es_error *err)
{
    CHECK_RANGE(max_attempts, 1, 1000000, "max attempts");
    CHECK_RANGE(base_ms, 1, 86400000, "backoff base");
    CHECK_RANGE(max_ms, base_ms, 86400000, "backoff max");
    cfg->max_attempts = max_attempts;
    cfg->base_ms = base_ms;
    cfg->max_ms = max_ms;
    return 0;
}

int es_outbox_config_set_owner(es_outbox_config *cfg, const char *owner,
                               es_error *err)
{
    if (cfg == NULL || owner == NULL || owner[0] == '\0' ||
        strlen(owner) >= sizeof cfg->owner)
        return es__error_set(err, ES_EINVAL, "owner must have 1 to 63 "
                                             "characters");
    snprintf(cfg->owner, sizeof cfg->owner, "%s", owner);
    return 0;
}

int es_outbox_config_set_clock(es_outbox_config *cfg, es_clock_fn clock,
                               void *ud, es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "config is NULL");
    cfg->clock = clock ? clock : system_clock;
    cfg->clock_ud = clock ? ud : NULL;
    return 0;
}

/* ---- delivery ---- */

static const handler_reg *find_handler(const es_outbox *ob,
                                       const es_outbox_entry *e)
{
    const handler_reg *any = NULL;
    for (size_t i = 0; i < ob->cfg.n_handlers; i++) {
        const handler_reg *h = &ob->cfg.handlers[i];
        if (strcmp(h->type->name, e->aggregate_type) != 0) continue;
        if (h->kind == e->side_effect.kind) return h;
        if (h->kind == ES_OUTBOX_ANY_KIND) any = h;
    }
    return any;
}

/* Full jitter: a random delay in [0, min(max, base * 2^(n-1))]. */
static int64_t backoff_ms(es_outbox *ob, uint32_t attempts)
{
    int64_t cap = ob->cfg.base_ms;
    for (uint32_t i = 1; i < attempts && cap < ob->cfg.max_ms; i++) cap *= 2;
    if (cap > ob->cfg.max_ms) cap = ob->cfg.max_ms;
    pthread_mutex_lock(&ob->lock);
    uint64_t x = es__random_next(&ob->rng);
    pthread_mutex_unlock(&ob->lock);
    return (int64_t)(x % (uint64_t)(cap + 1));
}

/* Fill v with a verdict on e; it is written to the store later, with the
 * others of its round (record_verdicts). */
static void finish(es_outbox *ob, const es_outbox_entry *e,
                   es_outbox_status status, int64_t next_ms,
                   const char *error, es__outbox_outcome *v)
{
    (void)ob;
    memset(v, 0, sizeof *v);
    v->id = e->side_effect.id;
    v->status = status;
    v->next_attempt_ms = next_ms;
    if (error != NULL) { /* cut to the column's bound */
        size_t len = strnlen(error, sizeof v->error - 1);
        memcpy(v->error, error, len);
        v->error[len] = '\0';
    }
}

/* Write n verdicts.  One statement where the store can (finish_many), so
 * a round of deliveries costs one commit, not one per message.  A verdict
 * that is not written is not lost work: its claim expires and the message
 * is delivered again (at least once). */
static void record_verdicts(es_outbox *ob, const es__outbox_outcome *v,
                            size_t n)
{
    if (n == 0) return;
    es_store *store = ob->cfg.store;
    int64_t now = ob->cfg.clock(ob->cfg.clock_ud);
    if (es__store_has_outbox_finish_many(store)) {
        es_error err = {0};
        size_t lost = 0;
        int rc = es__store_outbox_finish_many(store, ob->cfg.owner, now, v, n,
                                              &lost, &err);
        if (rc != 0)
            es__log(ES_LOG_WARN, "outbox: %zu verdicts not recorded (their "
                    "messages will be delivered again): %s: %s", n,
                    es_status_name(rc), err.message);
        else if (lost > 0)
            es__log(ES_LOG_WARN, "outbox: %zu of %zu verdicts not recorded: "
                    "their claims were lost (lease expired)", lost, n);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        es_error err = {0};
        int rc = es__store_outbox_finish(
            store, &v[i].id, ob->cfg.owner, v[i].status, now,
            v[i].next_attempt_ms, v[i].error[0] ? v[i].error : NULL, &err);
        if (rc != 0) {
            char id[ES_UUID_STRLEN + 1];
            es__log(ES_LOG_WARN, "outbox: verdict on %s not recorded: %s: %s",
                    es_uuid_format(&v[i].id, id), es_status_name(rc),
                    err.message);
        }
    }
}

static void deliver(es_outbox *ob, const es_outbox_entry *e,
                    es__outbox_outcome *v)
{
    const handler_reg *h = find_handler(ob, e);
    if (h == NULL) { /* the filter let it through: release at once */
        finish(ob, e, ES_OUTBOX_PENDING, 0, NULL, v);
        return;
    }
    char why[320];
    void *value = es__calloc(1, h->type->side_effect_size);
    if (value == NULL) {
        finish(ob, e, ES_OUTBOX_PENDING, ob->cfg.clock(ob->cfg.clock_ud) +
               backoff_ms(ob, e->attempts), "out of memory", v);
        atomic_fetch_add(&ob->retries, 1);
        return;
    }
    es_error derr = {0};
    int rc = es_side_effect_decode(h->type, &e->side_effect, value, &derr);
    if (rc != 0) { /* a poison message: dead at once, never blocking */
        snprintf(why, sizeof why, "cannot be decoded: %s", derr.message);
        finish(ob, e, ES_OUTBOX_DEAD, 0, why, v);
        atomic_fetch_add(&ob->dead, 1);
        es__free(value);
        return;
    }
    es_error reason = {0};
    atomic_fetch_add(&ob->deliveries, 1);
    es_outbox_verdict verdict = h->fn(h->ud, e, value, &reason);
    es_side_effect_value_free(h->type, value);
    es__free(value);
    switch (verdict) {
    case ES_OUTBOX_VERDICT_DONE:
        finish(ob, e, ES_OUTBOX_DONE, 0, NULL, v);
        atomic_fetch_add(&ob->done, 1);
        return;
    case ES_OUTBOX_VERDICT_RETRY:
        if (e->attempts >= ob->cfg.max_attempts) {
            snprintf(why, sizeof why, "gave up after %u attempts: %s",
                     e->attempts, reason.message);
            finish(ob, e, ES_OUTBOX_DEAD, 0, why, v);
            atomic_fetch_add(&ob->dead, 1);
        } else {
            int64_t next = ob->cfg.clock(ob->cfg.clock_ud) +
                           backoff_ms(ob, e->attempts);
            finish(ob, e, ES_OUTBOX_PENDING, next, reason.message, v);
            atomic_fetch_add(&ob->retries, 1);
        }
        return;
    case ES_OUTBOX_VERDICT_GIVE_UP:
        finish(ob, e, ES_OUTBOX_DEAD, 0,
               reason.message[0] ? reason.message : "handler gave up", v);
        atomic_fetch_add(&ob->dead, 1);
        return;
    }
    snprintf(why, sizeof why, "handler returned %d, not a verdict", (int)verdict);
    finish(ob, e, ES_OUTBOX_DEAD, 0, why, v);
    atomic_fetch_add(&ob->dead, 1);
}

static int claim(es_outbox *ob, es_outbox_entry_list **out, es_error *err)
{
    atomic_fetch_add(&ob->rounds, 1);
    int64_t now = ob->cfg.clock(ob->cfg.clock_ud);
    return es__store_outbox_claim(
        ob->cfg.store, ob->cfg.owner, now, ob->cfg.lease_ms,
        ob->cfg.max_attempts, ob->filters, ob->cfg.n_handlers, ob->cfg.batch,
        out, err);
}

int es_outbox_run_once(es_outbox *ob, size_t *delivered, es_error *err)
{
    if (ob == NULL) return es__error_set(err, ES_EINVAL, "outbox is NULL");
    if (delivered) *delivered = 0;
    es_outbox_entry_list *list = NULL;
    int rc = claim(ob, &list, err);
    if (rc != 0) return rc;
    es__outbox_outcome *v =
        list->count ? es__calloc(list->count, sizeof *v) : NULL;
    if (list->count > 0 && v == NULL) {
        es_outbox_entry_list_free(list); /* the claims expire */
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < list->count; i++)
        deliver(ob, &list->items[i], &v[i]);
    record_verdicts(ob, v, list->count);
    if (delivered) *delivered = list->count;
    es__free(v);
    es_outbox_entry_list_free(list);
    return 0;
}

/* ---- threads ---- */

static void *worker_main(void *arg)
{
    es_outbox *ob = arg;
    es__outbox_outcome v;
    pthread_mutex_lock(&ob->lock);
    for (;;) {
        while (!ob->stopping &&
               (ob->batch == NULL || ob->next_item >= ob->batch->count))
            pthread_cond_wait(&ob->work_cv, &ob->lock);
        if (ob->batch == NULL || ob->next_item >= ob->batch->count) break;
        const es_outbox_entry *e = &ob->batch->items[ob->next_item++];
        pthread_mutex_unlock(&ob->lock);
        deliver(ob, e, &v);
        pthread_mutex_lock(&ob->lock);
        ob->verdicts[ob->n_verdicts++] = v;
        if (--ob->outstanding == 0) pthread_cond_signal(&ob->done_cv);
    }
    pthread_mutex_unlock(&ob->lock);
    return NULL;
}

static void deadline_after(struct timespec *ts, int64_t ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (ms % 1000) * 1000000;
    if (ts->tv_nsec >= 1000000000) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000;
    }
}

/* Hands a claimed batch to the workers and writes their verdicts while
 * they work: whatever is ready every flush interval, then the rest, so a
 * round costs a few writes instead of one per message and a slow handler
 * does not hold back the verdicts of the others for long.  Called and
 * returns with ob->lock held. */
static void run_round(es_outbox *ob, es_outbox_entry_list *list,
                      es__outbox_outcome *v)
{
    int64_t flush_ms = ob->cfg.lease_ms / 4;
    if (flush_ms > 20) flush_ms = 20;
    if (flush_ms < 1) flush_ms = 1;
    ob->batch = list;
    ob->next_item = 0;
    ob->outstanding = list->count;
    ob->verdicts = v;
    ob->n_verdicts = 0;
    size_t written = 0;
    pthread_cond_broadcast(&ob->work_cv);
    for (;;) {
        bool all = ob->outstanding == 0;
        size_t ready = ob->n_verdicts;
        if (ready > written) {
            /* Entries below n_verdicts are not touched again this round. */
            pthread_mutex_unlock(&ob->lock);
            record_verdicts(ob, v + written, ready - written);
            pthread_mutex_lock(&ob->lock);
            written = ready;
        }
        if (all) break;
        struct timespec until;
        deadline_after(&until, flush_ms);
        while (ob->outstanding > 0 &&
               pthread_cond_timedwait(&ob->done_cv, &ob->lock, &until) !=
                   ETIMEDOUT)
            ;
    }
    ob->batch = NULL;
    ob->verdicts = NULL;
}

/* Retention: at most one batch of done messages a second (more while
 * batches come back full), between rounds. */
static void purge_due(es_outbox *ob, int64_t *next_ms)
{
    if (ob->cfg.retention_ms == 0) return;
    int64_t now = ob->cfg.clock(ob->cfg.clock_ud);
    if (now < *next_ms) return;
    size_t n = 0;
    es_error err = {0};
    int rc = es__store_outbox_purge(
        ob->cfg.store, now - ob->cfg.retention_ms, ES__PURGE_BATCH, &n, &err);
    if (rc != 0)
        es__log(ES_LOG_WARN, "outbox: purge failed: %s: %s",
                es_status_name(rc), err.message);
    *next_ms = rc == 0 && n == ES__PURGE_BATCH ? now : now + 1000;
}

static void *claimer_main(void *arg)
{
    es_outbox *ob = arg;
    int64_t next_purge = 0;
    pthread_mutex_lock(&ob->lock);
    while (!ob->stopping) {
        ob->woken = false;
        pthread_mutex_unlock(&ob->lock);
        purge_due(ob, &next_purge);
        es_outbox_entry_list *list = NULL;
        es_error err = {0};
        int rc = claim(ob, &list, &err);
        if (rc != 0)
            es__log(ES_LOG_WARN, "outbox: claim failed: %s: %s",
                    es_status_name(rc), err.message);
        pthread_mutex_lock(&ob->lock);
        if (rc == 0 && list->count > 0) {
            es__outbox_outcome *v = es__calloc(list->count, sizeof *v);
            if (v == NULL) { /* the claims expire; try again later */
                pthread_mutex_unlock(&ob->lock);
                es_outbox_entry_list_free(list);
                es__log(ES_LOG_WARN, "outbox: out of memory for a round");
                pthread_mutex_lock(&ob->lock);
                list = NULL;
            } else {
                run_round(ob, list, v);
                pthread_mutex_unlock(&ob->lock);
                es__free(v);
                es_outbox_entry_list_free(list);
                pthread_mutex_lock(&ob->lock);
                continue; /* more may be due now */
            }
        }
        es_outbox_entry_list_free(list);
        struct timespec until;
        deadline_after(&until, ob->cfg.poll_ms);
        while (!ob->stopping && !ob->woken)
            if (pthread_cond_timedwait(&ob->wake_cv, &ob->lock, &until) ==
                ETIMEDOUT)
                break;
    }
    pthread_mutex_unlock(&ob->lock);
    return NULL;
}

static void on_commit(void *ud)
{
    es_outbox_wake(ud);
}

static void on_watch(void *ud, bool notified)
{
    es_outbox *ob = ud;
    if (notified) atomic_fetch_add(&ob->notifications, 1);
    es_outbox_wake(ob);
}

void es_outbox_wake(es_outbox *ob)
{
    if (ob == NULL) return;
    pthread_mutex_lock(&ob->lock);
    ob->woken = true;
    pthread_cond_signal(&ob->wake_cv);
    pthread_mutex_unlock(&ob->lock);
}

static void stop_threads(es_outbox *ob)
{
    pthread_mutex_lock(&ob->lock);
    ob->stopping = true;
    pthread_cond_broadcast(&ob->wake_cv);
    pthread_mutex_unlock(&ob->lock);
    if (ob->claimer_started) pthread_join(ob->claimer, NULL);
    pthread_mutex_lock(&ob->lock);
    pthread_cond_broadcast(&ob->work_cv);
    pthread_mutex_unlock(&ob->lock);
    for (size_t i = 0; i < ob->n_workers; i++)
        pthread_join(ob->workers[i], NULL);
    ob->n_workers = 0;
}

void es_outbox_close(es_outbox *ob)
{
    if (ob == NULL) return;
    if (ob->listening) es__store_unlisten(ob->cfg.store, on_commit, ob);
    if (ob->watch) es__store_outbox_unwatch(ob->cfg.store, ob->watch);
    stop_threads(ob);
    pthread_cond_destroy(&ob->wake_cv);
    pthread_cond_destroy(&ob->work_cv);
    pthread_cond_destroy(&ob->done_cv);
    pthread_mutex_destroy(&ob->lock);
    es__free(ob->workers);
    es__free(ob->filters);
    es__free(ob->cfg.handlers);
    es__free(ob);
}

int es_outbox_open(const es_outbox_config *cfg, bool start, es_outbox **out,
                   es_error *err)
{
    if (cfg == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "config and out are required");
    if (cfg->n_handlers == 0)
        return es__error_set(err, ES_EINVAL, "no handler is registered");
    es_outbox *ob = es__calloc(1, sizeof *ob);
    if (ob == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    ob->cfg = *cfg;
    ob->cfg.handlers = es__memdup(cfg->handlers,
                                  cfg->n_handlers * sizeof(handler_reg));
    ob->filters = es__calloc(cfg->n_handlers, sizeof *ob->filters);
    ob->workers = es__calloc(cfg->workers, sizeof *ob->workers);
    pthread_mutex_init(&ob->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&ob->wake_cv, &ca);
    pthread_cond_init(&ob->done_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&ob->work_cv, NULL);
    es_uuid seed;
    es_uuid_v7(&seed);
    memcpy(&ob->rng, seed.bytes + 8, sizeof ob->rng);
    ob->rng |= 1;
    if (ob->cfg.handlers == NULL || ob->filters == NULL ||
        ob->workers == NULL) {
        es_outbox_close(ob);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < cfg->n_handlers; i++)
        ob->filters[i] = (es__outbox_filter){cfg->handlers[i].type->name,
                                             cfg->handlers[i].kind};
    if (start) {
        for (size_t i = 0; i < cfg->workers; i++) {
            if (pthread_create(&ob->workers[i], NULL, worker_main, ob) != 0) {
                es_outbox_close(ob);
                return es__error_set(err, ES_EIO, "cannot start a worker");
            }
            ob->n_workers++;
        }
        if (pthread_create(&ob->claimer, NULL, claimer_main, ob) != 0) {
            es_outbox_close(ob);
            return es__error_set(err, ES_EIO, "cannot start the claimer");
        }
        ob->claimer_started = true;
        if (es__store_listen(cfg->store, on_commit, ob) == 0)
            ob->listening = true;
        else
            es__log(ES_LOG_WARN, "outbox: too many listeners; polling only");
        es_error werr = {0};
        if (es__store_has_outbox_watch(cfg->store) &&
            es__store_outbox_watch(cfg->store, cfg->poll_ms, on_watch, ob,
                                   &ob->watch, &werr) != 0)
            es__log(ES_LOG_WARN, "outbox: %s; polling only", werr.message);
    }
    *out = ob;
    return 0;
}

void es_outbox_metrics_get(es_outbox *ob, es_outbox_metrics *out)
{
    if (ob == NULL || out == NULL) return;
    out->deliveries = atomic_load(&ob->deliveries);
    out->done = atomic_load(&ob->done);
    out->retries = atomic_load(&ob->retries);
    out->dead_letters = atomic_load(&ob->dead);
    out->rounds = atomic_load(&ob->rounds);
    out->notifications = atomic_load(&ob->notifications);
}

/* ---- operations on the store ---- */

static int need_outbox(es_store *store, es_error *err)
{
    if (store == NULL) return es__error_set(err, ES_EINVAL, "store is NULL");
    if (!es__store_has_outbox(store))
        return es__error_set(err, ES_EINVAL, "the %s store has no outbox",
                             es__store_name(store));
    return 0;
}

int es_outbox_stats_get(es_store *store, int64_t now_ms, es_outbox_stats *out,
                        es_error *err)
{
    int rc = need_outbox(store, err);
    if (rc != 0) return rc;
    if (out == NULL) return es__error_set(err, ES_EINVAL, "out is NULL");
    return es__store_outbox_stats(store, now_ms ? now_ms : es_clock_now_ms(),
                                  out, err);
}

int es_outbox_list(es_store *store, es_outbox_status status, size_t limit,
                   es_outbox_entry_list **out, es_error *err)
{
    int rc = need_outbox(store, err);
    if (rc != 0) return rc;
    if (out == NULL) return es__error_set(err, ES_EINVAL, "out is NULL");
    if (status != ES_OUTBOX_PENDING && status != ES_OUTBOX_DONE &&
        status != ES_OUTBOX_DEAD)
        return es__error_set(err, ES_EINVAL, "unknown status %d",
                             (int)status);
    *out = NULL;
    return es__store_outbox_list(store, status, limit ? limit : 1000, out,
                                 err);
}

int es_outbox_show(es_store *store, const es_uuid *id, es_outbox_entry **out,
                   es_error *err)
{
    int rc = need_outbox(store, err);
    if (rc != 0) return rc;
    if (id == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "id and out are required");
    *out = NULL;
    return es__store_outbox_get(store, id, out, err);
}

int es_outbox_requeue(es_store *store, const es_uuid *id,
                      const char *type_name, int32_t kind, size_t *count,
                      es_error *err)
{
    int rc = need_outbox(store, err);
    if (rc != 0) return rc;
    if ((id == NULL) == (type_name == NULL))
        return es__error_set(err, ES_EINVAL, "give an id or a type name");
    return es__store_outbox_requeue(store, id, type_name, kind,
                                    es_clock_now_ms(), count, err);
}

int es_outbox_purge_done(es_store *store, int64_t before_ms, size_t *count,
                         es_error *err)
{
    if (count) *count = 0;
    int rc = need_outbox(store, err);
    if (rc != 0) return rc;
    for (;;) { /* short transactions: dispatchers go on meanwhile */
        size_t n = 0;
        rc = es__store_outbox_purge(store, before_ms, ES__PURGE_BATCH, &n,
                                    err);
        if (count) *count += n;
        if (rc != 0 || n < ES__PURGE_BATCH) return rc;
    }
}
