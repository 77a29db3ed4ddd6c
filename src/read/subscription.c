/*
 * The global order's public entry points (eventastic/subscription.h):
 * positions, reads, the head, checkpoints by name, and the event
 * listeners that wake readers after a commit of this process.  Each
 * checks its arguments and calls the backend's read table
 * (store/read_ops.h).
 */
#include <string.h>

#include "core/internal.h"
#include "store/read_ops.h"
#include "store/store_impl.h"

int es_position_compare(const es_position *a, const es_position *b)
{
    static const es_position zero = {0, 0};
    if (a == NULL) a = &zero;
    if (b == NULL) b = &zero;
    if (a->commit != b->commit) return a->commit < b->commit ? -1 : 1;
    if (a->seq != b->seq) return a->seq < b->seq ? -1 : 1;
    return 0;
}

bool es__checkpoint_name_ok(const char *name, es_error *err)
{
    if (name == NULL || name[0] == '\0') {
        es__error_set(err, ES_EINVAL, "projection name is empty");
        return false;
    }
    size_t n = strlen(name);
    if (n > ES__CHECKPOINT_NAME_MAX) {
        es__error_set(err, ES_EINVAL, "projection name is longer than %d "
                      "bytes", ES__CHECKPOINT_NAME_MAX);
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                  (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
        if (!ok) {
            es__error_set(err, ES_EINVAL, "projection name may hold only "
                          "letters, digits, '_', '.' and '-' (byte %zu is "
                          "not one)", i);
            return false;
        }
    }
    return true;
}

/* The backend's read table, or NULL with *rc (and err) set. */
static const es__read_ops *read_ops(es_store *store, int *rc, es_error *err)
{
    if (store == NULL) {
        *rc = es__error_set(err, ES_EINVAL, "store is NULL");
        return NULL;
    }
    if (atomic_load(&store->closing)) {
        *rc = es__error_set(err, ES_ECLOSED, "store is closing");
        return NULL;
    }
    if (store->ops->read == NULL) {
        *rc = es__error_set(err, ES_EINVAL, "the %s store has no global "
                            "order of events", store->ops->name);
        return NULL;
    }
    return store->ops->read;
}

int es_store_read_all(es_store *store, const es_position *after, size_t max,
                      es_read_fn fn, void *ud, size_t *count,
                      es_position *last, es_error *err)
{
    static const es_position zero = {0, 0};
    size_t n = 0;
    es_position at = after ? *after : zero;
    if (count) *count = 0;
    if (last) *last = at;
    if (fn == NULL) return es__error_set(err, ES_EINVAL, "fn is NULL");
    int rc = 0;
    const es__read_ops *ops = read_ops(store, &rc, err);
    if (ops == NULL) return rc;
    if (max == 0) return 0;
    rc = ops->read_all(store, &at, max, fn, ud, &n, &at, err);
    if (count) *count = n;
    if (last) *last = at;
    return rc;
}

int es_store_head(es_store *store, es_position *out, es_error *err)
{
    if (out == NULL) return es__error_set(err, ES_EINVAL, "out is NULL");
    memset(out, 0, sizeof *out);
    int rc = 0;
    const es__read_ops *ops = read_ops(store, &rc, err);
    if (ops == NULL) return rc;
    return ops->head(store, out, err);
}

int es_store_lag(es_store *store, const es_position *after, uint64_t cap,
                 uint64_t *events, int64_t *oldest_ms, es_error *err)
{
    static const es_position zero = {0, 0};
    int64_t oldest = 0;
    if (events == NULL)
        return es__error_set(err, ES_EINVAL, "events is NULL");
    *events = 0;
    if (oldest_ms) *oldest_ms = 0;
    int rc = 0;
    const es__read_ops *ops = read_ops(store, &rc, err);
    if (ops == NULL) return rc;
    rc = ops->lag(store, after ? after : &zero, cap, events, &oldest,
                      err);
    if (rc == 0 && oldest_ms) *oldest_ms = oldest;
    return rc;
}

int es_checkpoint_list(es_store *store, es_checkpoint **out, size_t *n,
                       es_error *err)
{
    if (out == NULL || n == NULL)
        return es__error_set(err, ES_EINVAL, "out and n are required");
    *out = NULL;
    *n = 0;
    int rc = 0;
    const es__read_ops *ops = read_ops(store, &rc, err);
    if (ops == NULL) return rc;
    return ops->checkpoint_list(store, out, n, err);
}

int es_checkpoint_reset(es_store *store, const char *name, es_error *err)
{
    int rc = 0;
    const es__read_ops *ops = read_ops(store, &rc, err);
    if (ops == NULL) return rc;
    if (!es__checkpoint_name_ok(name, err)) return ES_EINVAL;
    es_txn *txn = NULL;
    rc = es_store_begin(store, &txn, err);
    if (rc != 0) return rc;
    bool found = false;
    rc = ops->checkpoint_delete(txn, name, &found, err);
    if (rc != 0) {
        es_txn_rollback(txn);
        return rc;
    }
    rc = es_txn_commit(txn, err);
    if (rc == 0 && !found)
        rc = es__error_set(err, ES_ENOTFOUND, "no projection named \"%s\" "
                           "has a checkpoint", name);
    return rc;
}

int es__store_listen_events(es_store *store, es__event_listener fn, void *ud)
{
    int rc = ES_EBUSY;
    pthread_mutex_lock(&store->listeners_lock);
    for (size_t i = 0; i < ES__MAX_LISTENERS; i++) {
        if (store->event_listeners[i].fn != NULL) continue;
        store->event_listeners[i].fn = fn;
        store->event_listeners[i].ud = ud;
        atomic_fetch_add(&store->n_event_listeners, 1);
        rc = 0;
        break;
    }
    pthread_mutex_unlock(&store->listeners_lock);
    return rc;
}

void es__store_unlisten_events(es_store *store, es__event_listener fn,
                               void *ud)
{
    pthread_mutex_lock(&store->listeners_lock);
    for (size_t i = 0; i < ES__MAX_LISTENERS; i++)
        if (store->event_listeners[i].fn == fn &&
            store->event_listeners[i].ud == ud) {
            store->event_listeners[i].fn = NULL;
            atomic_fetch_sub(&store->n_event_listeners, 1);
        }
    pthread_mutex_unlock(&store->listeners_lock);
}

void es__store_notify_events(es_store *store)
{
    /* Every commit calls this: without listeners it costs one load. */
    if (atomic_load(&store->n_event_listeners) == 0) return;
    pthread_mutex_lock(&store->listeners_lock);
    for (size_t i = 0; i < ES__MAX_LISTENERS; i++)
        if (store->event_listeners[i].fn != NULL)
            store->event_listeners[i].fn(store->event_listeners[i].ud);
    pthread_mutex_unlock(&store->listeners_lock);
}
