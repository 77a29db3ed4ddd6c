/*
 * Projections (eventastic/subscription.h): a handler run over the global
 * order of a store on a thread of its own, with a checkpoint by name.
 *
 * The thread's loop: read the checkpoint; then, batch after batch, read
 * up to `batch` events after it and apply them; save the checkpoint
 *   - exactly-once: in the transaction the handler wrote in (one commit
 *     for both: a crash before it loses the batch's writes with the
 *     checkpoint, and the batch is applied again, once);
 *   - at-least-once: in a transaction of its own after the handler.
 * A short batch means the projection is at the head: it waits until a
 * commit of this process wakes it (an event listener), the store's watch
 * hears of another process's (PostgreSQL: LISTEN/NOTIFY), or poll_ms
 * passes.
 * A failed batch is retried after a jittered, doubling backoff; after
 * max_attempts it stops in FAILED with the error, never skipping.
 *
 * Locks: p->lock guards the stats, the flags (stop, wake, rebuild) and
 * the condition variables; it is never held while calling the store or
 * the handler.  The event listener takes it under the store's listeners
 * lock (listeners lock, then p->lock; never the other way).
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/backoff.h"
#include "core/internal.h"
#include "store/read_ops.h"
#include "store/store_impl.h"

struct es_projection_config {
    char name[ES__CHECKPOINT_NAME_MAX + 1];
    es_projection_apply_fn apply;
    es_projection_reset_fn reset;
    es_projection_flush_fn flush;
    void *ud;
    es_projection_mode mode;
    size_t batch;
    int64_t retry_initial_ms, retry_max_ms;
    uint32_t max_attempts;
    int64_t poll_ms;
};

struct es_projection {
    es_store *store;
    const es__read_ops *ops;
    es_projection_config cfg;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake_cond;     /* the thread waits on it */
    pthread_cond_t progress_cond; /* es_projection_wait, rebuild wait */
    bool stop, wake, rebuild, rebuild_done;
    int rebuild_rc;
    es_error rebuild_err;
    es_projection_stats stats;
    uint64_t seed;   /* jitter (core/backoff.h), never 0 */
    unsigned delay;  /* the current backoff, ms (0: none yet) */
    /* The thread's own: the position read up to, the batch's txn. */
    es_position pos;
    es_txn *txn;
    es_error apply_err;
    es__outbox_watch *watch; /* commits of other processes, or NULL */
};

/* ---- configuration ---- */

int es_projection_config_new(es_projection_config **out, es_error *err)
{
    if (out == NULL) return es__error_set(err, ES_EINVAL, "out is NULL");
    es_projection_config *c = es__calloc(1, sizeof *c);
    if (c == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    c->mode = ES_PROJECTION_AT_LEAST_ONCE;
    c->batch = 500;
    c->retry_initial_ms = 100;
    c->retry_max_ms = 10000;
    c->max_attempts = 10;
    c->poll_ms = 100;
    *out = c;
    return 0;
}

void es_projection_config_free(es_projection_config *cfg) { es__free(cfg); }

int es_projection_config_set_name(es_projection_config *cfg,
                                  const char *name, es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "cfg is NULL");
    if (!es__checkpoint_name_ok(name, err)) return ES_EINVAL;
    memcpy(cfg->name, name, strlen(name) + 1);
    return 0;
}

int es_projection_config_set_handler(es_projection_config *cfg,
                                     es_projection_apply_fn apply,
                                     es_projection_reset_fn reset, void *ud,
                                     es_error *err)
{
    if (cfg == NULL || apply == NULL)
        return es__error_set(err, ES_EINVAL, "cfg and apply are required");
    cfg->apply = apply;
    cfg->reset = reset;
    cfg->ud = ud;
    return 0;
}

int es_projection_config_set_flush(es_projection_config *cfg,
                                   es_projection_flush_fn flush,
                                   es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "cfg is NULL");
    cfg->flush = flush;
    return 0;
}

int es_projection_config_set_mode(es_projection_config *cfg,
                                  es_projection_mode mode, es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "cfg is NULL");
    if (mode != ES_PROJECTION_EXACTLY_ONCE &&
        mode != ES_PROJECTION_AT_LEAST_ONCE)
        return es__error_set(err, ES_EINVAL, "unknown projection mode %d",
                             (int)mode);
    cfg->mode = mode;
    return 0;
}

int es_projection_config_set_batch(es_projection_config *cfg, size_t events,
                                   es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "cfg is NULL");
    if (events < 1 || events > 100000)
        return es__error_set(err, ES_EINVAL, "batch must be 1 to 100000 "
                             "events");
    cfg->batch = events;
    return 0;
}

int es_projection_config_set_retry(es_projection_config *cfg,
                                   int64_t initial_ms, int64_t max_ms,
                                   uint32_t max_attempts, es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "cfg is NULL");
    if (initial_ms < 1 || max_ms < initial_ms || max_ms > 86400000)
        return es__error_set(err, ES_EINVAL, "retry needs 1 <= initial_ms "
                             "<= max_ms <= 86400000");
    cfg->retry_initial_ms = initial_ms;
    cfg->retry_max_ms = max_ms;
    cfg->max_attempts = max_attempts;
    return 0;
}

int es_projection_config_set_poll_ms(es_projection_config *cfg,
                                     int64_t poll_ms, es_error *err)
{
    if (cfg == NULL) return es__error_set(err, ES_EINVAL, "cfg is NULL");
    if (poll_ms < 1 || poll_ms > 60000)
        return es__error_set(err, ES_EINVAL, "poll_ms must be 1 to 60000");
    cfg->poll_ms = poll_ms;
    return 0;
}

/* ---- the thread ---- */

static struct timespec deadline_in(int64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* Lock held.  Sleep until woken, stopped, asked to rebuild, or ms. */
static void nap(es_projection *p, int64_t ms)
{
    struct timespec until = deadline_in(ms);
    while (!p->stop && !p->wake && !p->rebuild)
        if (pthread_cond_timedwait(&p->wake_cond, &p->lock, &until) ==
            ETIMEDOUT)
            break;
    p->wake = false;
}

static void on_commit(void *ud)
{
    es_projection *p = ud;
    pthread_mutex_lock(&p->lock);
    p->wake = true;
    pthread_cond_signal(&p->wake_cond);
    pthread_mutex_unlock(&p->lock);
}

/* The store's watch heard of a commit by some process (or reconnected,
 * when some may have been missed): read now. */
static void on_watch(void *ud, bool notified)
{
    (void)notified;
    on_commit(ud);
}

static int apply_one(void *ud, const es_recorded_event *ev)
{
    es_projection *p = ud;
    int rc = p->cfg.apply(p->cfg.ud, p->txn, ev, &p->apply_err);
    if (rc == 0) return 0;
    if (p->apply_err.code == 0)
        es__error_set(&p->apply_err, rc < 0 ? rc : ES_EINVAL,
                      "the projection's handler failed (%d)", rc);
    return rc < 0 ? rc : p->apply_err.code;
}

/* Save the checkpoint in a transaction of its own. */
static int save_alone(es_projection *p, const es_position *pos,
                      es_error *err)
{
    es_txn *txn = NULL;
    int rc = es_store_begin(p->store, &txn, err);
    if (rc != 0) return rc;
    rc = p->ops->checkpoint_put(txn, p->cfg.name, pos, err);
    if (rc != 0) {
        es_txn_rollback(txn);
        return rc;
    }
    return es_txn_commit(txn, err);
}

/* The handler's batch-end hook, if it has one. */
static int flush(es_projection *p, es_error *err)
{
    if (p->cfg.flush == NULL) return 0;
    memset(err, 0, sizeof *err);
    int rc = p->cfg.flush(p->cfg.ud, p->txn, err);
    if (rc != 0 && err->code == 0)
        es__error_set(err, rc < 0 ? rc : ES_EINVAL, "the projection's flush "
                      "failed (%d)", rc);
    return rc == 0 ? 0 : err->code;
}

/* One batch: read and apply up to cfg.batch events after p->pos and
 * save the checkpoint.  *n: events applied and checkpointed. */
static int run_batch(es_projection *p, size_t *n, es_error *err)
{
    es_position last = p->pos;
    size_t count = 0;
    int rc;
    *n = 0;
    memset(&p->apply_err, 0, sizeof p->apply_err);
    if (p->cfg.mode == ES_PROJECTION_EXACTLY_ONCE) {
        rc = es_store_begin(p->store, &p->txn, err);
        if (rc != 0) return rc;
        rc = p->ops->read_all(p->store, &p->pos, p->cfg.batch, apply_one, p,
                              &count, &last, err);
        if (rc != 0 && p->apply_err.code != 0) *err = p->apply_err;
        if (rc == 0 && count > 0) rc = flush(p, err);
        if (rc == 0 && count > 0)
            rc = p->ops->checkpoint_put(p->txn, p->cfg.name, &last, err);
        if (rc == 0 && count > 0) {
            rc = es_txn_commit(p->txn, err);
        } else {
            es_txn_rollback(p->txn);
        }
        p->txn = NULL;
        if (rc != 0) return rc;
        *n = count;
        p->pos = last;
        return 0;
    }
    p->txn = NULL;
    rc = p->ops->read_all(p->store, &p->pos, p->cfg.batch, apply_one, p,
                          &count, &last, err);
    if (rc != 0 && p->apply_err.code != 0) *err = p->apply_err;
    /* What was applied before a failure is flushed and checkpointed. */
    if (count > 0) {
        es_error ferr;
        int frc = flush(p, &ferr);
        if (frc != 0) {
            if (rc == 0) *err = ferr;
            return rc != 0 ? rc : frc;
        }
        es_error serr;
        int src = save_alone(p, &last, &serr);
        if (src == 0) {
            *n = count;
            p->pos = last;
        } else if (rc == 0) {
            *err = serr;
            rc = src;
        }
    }
    return rc;
}

/* Move the checkpoint back to the start, with the handler's reset. */
static int run_rebuild(es_projection *p, es_error *err)
{
    es_txn *txn = NULL;
    int rc = es_store_begin(p->store, &txn, err);
    if (rc != 0) return rc;
    bool found = false;
    rc = p->cfg.reset(p->cfg.ud,
                      p->cfg.mode == ES_PROJECTION_EXACTLY_ONCE ? txn : NULL,
                      err);
    if (rc == 0) rc = p->ops->checkpoint_delete(txn, p->cfg.name, &found, err);
    if (rc != 0) {
        es_txn_rollback(txn);
        return rc;
    }
    rc = es_txn_commit(txn, err);
    if (rc == 0) memset(&p->pos, 0, sizeof p->pos);
    return rc;
}

/* The next retry's wait: the library's doubling, jittered backoff
 * (core/backoff.h) between the configured bounds. */
static int64_t retry_ms(es_projection *p)
{
    p->delay = es__backoff_grow(p->delay, (unsigned)p->cfg.retry_initial_ms,
                                (unsigned)p->cfg.retry_max_ms);
    return es__backoff_jitter(&p->seed, p->delay);
}

/* After a batch that did not reach the head: how far behind, at most
 * once a second (it costs a read). */
static void measure_lag(es_projection *p, int64_t *next_ms)
{
    int64_t now = es_clock_now_ms();
    if (now < *next_ms) return;
    *next_ms = now + 1000;
    uint64_t events = 0;
    int64_t oldest = 0;
    es_error err;
    if (p->ops->lag(p->store, &p->pos, 1000000, &events, &oldest, &err) != 0)
        return;
    pthread_mutex_lock(&p->lock);
    p->stats.lag_events = events;
    p->stats.lag_ms = events > 0 && oldest > 0 && now > oldest ? now - oldest
                                                              : 0;
    pthread_mutex_unlock(&p->lock);
}

static void *projection_main(void *arg)
{
    es_projection *p = arg;
    uint64_t attempts = 0; /* failed attempts of the batch in hand */
    int64_t next_lag_ms = 0;
    bool started = false;
    pthread_mutex_lock(&p->lock);
    while (!p->stop) {
        if (p->rebuild) {
            pthread_mutex_unlock(&p->lock);
            es_error err;
            memset(&err, 0, sizeof err);
            int rc = run_rebuild(p, &err);
            pthread_mutex_lock(&p->lock);
            p->rebuild = false;
            p->rebuild_done = true;
            p->rebuild_rc = rc;
            p->rebuild_err = err;
            if (rc == 0) {
                p->stats.position = p->pos;
                p->stats.state = ES_PROJECTION_CATCHING_UP;
                attempts = 0;
                p->delay = 0;
                started = true;
            }
            pthread_cond_broadcast(&p->progress_cond);
            continue;
        }
        if (p->stats.state == ES_PROJECTION_FAILED) {
            nap(p, 60000);
            continue;
        }
        pthread_mutex_unlock(&p->lock);
        es_error err;
        memset(&err, 0, sizeof err);
        size_t n = 0;
        int rc = 0;
        if (!started) {
            bool found = false;
            rc = p->ops->checkpoint_get(p->store, p->cfg.name, &p->pos,
                                        &found, &err);
            started = rc == 0;
        }
        if (rc == 0) rc = run_batch(p, &n, &err);
        if (rc == 0 && n == p->cfg.batch) measure_lag(p, &next_lag_ms);
        pthread_mutex_lock(&p->lock);
        p->stats.position = p->pos;
        if (n > 0) {
            p->stats.applied += n;
            p->stats.batches++;
            pthread_cond_broadcast(&p->progress_cond);
        }
        if (rc != 0) {
            p->stats.failures++;
            p->stats.last_error = err;
            attempts++;
            if (p->cfg.max_attempts != 0 && attempts >= p->cfg.max_attempts) {
                p->stats.state = ES_PROJECTION_FAILED;
                es__log(ES_LOG_ERROR, "projection %s failed after %llu "
                        "attempts: %s", p->cfg.name,
                        (unsigned long long)attempts, err.message);
                pthread_cond_broadcast(&p->progress_cond);
                continue;
            }
            p->stats.state = ES_PROJECTION_RETRYING;
            nap(p, retry_ms(p));
            continue;
        }
        attempts = 0;
        p->delay = 0;
        if (n == p->cfg.batch) {
            p->stats.state = ES_PROJECTION_CATCHING_UP;
            continue;
        }
        p->stats.state = ES_PROJECTION_LIVE;
        p->stats.lag_events = 0;
        p->stats.lag_ms = 0;
        pthread_cond_broadcast(&p->progress_cond);
        nap(p, p->cfg.poll_ms);
    }
    p->stats.state = ES_PROJECTION_STOPPED;
    pthread_cond_broadcast(&p->progress_cond);
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* ---- life cycle ---- */

int es_projection_start(es_store *store, const es_projection_config *cfg,
                        es_projection **out, es_error *err)
{
    if (out == NULL) return es__error_set(err, ES_EINVAL, "out is NULL");
    *out = NULL;
    if (store == NULL || cfg == NULL)
        return es__error_set(err, ES_EINVAL, "store and cfg are required");
    if (cfg->name[0] == '\0' || cfg->apply == NULL)
        return es__error_set(err, ES_EINVAL, "a projection needs a name and "
                             "a handler");
    if (atomic_load(&store->closing))
        return es__error_set(err, ES_ECLOSED, "store is closing");
    if (store->ops->read == NULL)
        return es__error_set(err, ES_EINVAL, "the %s store keeps no "
                             "checkpoints", store->ops->name);
    es_projection *p = es__calloc(1, sizeof *p);
    if (p == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    p->store = store;
    p->ops = store->ops->read;
    p->cfg = *cfg;
    p->seed = ((uint64_t)(uintptr_t)p ^ (uint64_t)es_clock_now_ms()) | 1u;
    p->stats.state = ES_PROJECTION_STARTING;
    pthread_mutex_init(&p->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&p->wake_cond, &ca);
    pthread_cond_init(&p->progress_cond, &ca);
    pthread_condattr_destroy(&ca);
    /* Other processes' commits: through the store's watch where it has
     * one (it starts even while the database is away); polling else. */
    if (p->ops->watch != NULL &&
        p->ops->watch(store, 10000, on_watch, p, &p->watch, NULL) != 0)
        p->watch = NULL;
    int rc = es__store_listen_events(store, on_commit, p);
    if (rc == 0 && pthread_create(&p->thread, NULL, projection_main, p) != 0) {
        es__store_unlisten_events(store, on_commit, p);
        rc = ES_ENOMEM;
    }
    if (rc != 0) {
        if (p->watch) p->ops->unwatch(p->watch);
        pthread_cond_destroy(&p->wake_cond);
        pthread_cond_destroy(&p->progress_cond);
        pthread_mutex_destroy(&p->lock);
        es__free(p);
        return es__error_set(err, rc, rc == ES_EBUSY
                             ? "too many listeners on this store"
                             : "could not start the projection's thread");
    }
    *out = p;
    return 0;
}

void es_projection_stop(es_projection *p)
{
    if (p == NULL) return;
    pthread_mutex_lock(&p->lock);
    p->stop = true;
    pthread_cond_signal(&p->wake_cond);
    pthread_mutex_unlock(&p->lock);
    pthread_join(p->thread, NULL);
    if (p->watch) p->ops->unwatch(p->watch);
    es__store_unlisten_events(p->store, on_commit, p);
    pthread_cond_destroy(&p->wake_cond);
    pthread_cond_destroy(&p->progress_cond);
    pthread_mutex_destroy(&p->lock);
    es__free(p);
}

int es_projection_stats_get(es_projection *p, es_projection_stats *out)
{
    if (p == NULL || out == NULL) return ES_EINVAL;
    pthread_mutex_lock(&p->lock);
    *out = p->stats;
    pthread_mutex_unlock(&p->lock);
    return 0;
}

int es_projection_wait(es_projection *p, const es_position *pos,
                       int64_t timeout_ms)
{
    if (p == NULL || timeout_ms < 0) return ES_EINVAL;
    struct timespec until = deadline_in(timeout_ms);
    int rc = 0;
    pthread_mutex_lock(&p->lock);
    while (es_position_compare(&p->stats.position, pos) < 0) {
        if (p->stats.state == ES_PROJECTION_FAILED) {
            rc = p->stats.last_error.code ? p->stats.last_error.code
                                          : ES_EDB;
            break;
        }
        if (p->stats.state == ES_PROJECTION_STOPPED) {
            rc = ES_ECLOSED;
            break;
        }
        if (pthread_cond_timedwait(&p->progress_cond, &p->lock, &until) ==
            ETIMEDOUT) {
            rc = es_position_compare(&p->stats.position, pos) < 0
                     ? ES_ETIMEDOUT
                     : 0;
            break;
        }
    }
    pthread_mutex_unlock(&p->lock);
    return rc;
}

int es_projection_rebuild(es_projection *p, es_error *err)
{
    if (p == NULL) return es__error_set(err, ES_EINVAL, "proj is NULL");
    if (p->cfg.reset == NULL)
        return es__error_set(err, ES_EINVAL, "the projection has no reset "
                             "handler");
    pthread_mutex_lock(&p->lock);
    p->rebuild = true;
    p->rebuild_done = false;
    if (p->stats.state == ES_PROJECTION_FAILED)
        p->stats.state = ES_PROJECTION_RETRYING;
    pthread_cond_signal(&p->wake_cond);
    while (!p->rebuild_done && p->stats.state != ES_PROJECTION_STOPPED)
        pthread_cond_wait(&p->progress_cond, &p->lock);
    int rc = p->rebuild_done ? p->rebuild_rc : ES_ECLOSED;
    es_error e = p->rebuild_err;
    pthread_mutex_unlock(&p->lock);
    if (rc != 0 && err != NULL) {
        if (e.code != 0)
            *err = e;
        else
            es__error_set(err, rc, "the rebuild did not run");
    }
    return rc;
}
