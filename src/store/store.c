/* The public repository interface: argument checks, then the backend. */
#include <string.h>

#include <sodium.h>

#include "core/internal.h"
#include "store/batch_ops.h"
#include "store/store_impl.h"

void es__store_txn_started(es_store *store)
{
    atomic_fetch_add(&store->open_txns, 1);
}

void es__store_txn_ended(es_store *store)
{
    atomic_fetch_sub(&store->open_txns, 1);
}

int es_store_begin(es_store *store, es_txn **out, es_error *err)
{
    if (store == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "store and out are required");
    if (atomic_load(&store->closing))
        return es__error_set(err, ES_ECLOSED, "store is closing");
    return store->ops->txn->begin(store, out, err);
}

int es__store_begin_bounded(es_store *store, es_txn **out, es_error *err)
{
    if (store->ops->txn->begin_bounded == NULL)
        return es_store_begin(store, out, err);
    if (atomic_load(&store->closing))
        return es__error_set(err, ES_ECLOSED, "store is closing");
    return store->ops->txn->begin_bounded(store, out, err);
}

int es__store_begin_read(es_store *store, es_txn **out, es_error *err)
{
    if (store->ops->txn->begin_read == NULL)
        return es_store_begin(store, out, err);
    if (atomic_load(&store->closing))
        return es__error_set(err, ES_ECLOSED, "store is closing");
    return store->ops->txn->begin_read(store, out, err);
}

int es__store_begin_background(es_store *store, void **slot, es_txn **out,
                               es_error *err)
{
    if (store->ops->txn->begin_background == NULL)
        return es_store_begin(store, out, err);
    if (atomic_load(&store->closing))
        return es__error_set(err, ES_ECLOSED, "store is closing");
    return store->ops->txn->begin_background(store, slot, out, err);
}

void es__store_background_close(es_store *store, void **slot)
{
    if (*slot != NULL && store->ops->txn->background_close != NULL)
        store->ops->txn->background_close(store, *slot);
    *slot = NULL;
}

int es_txn_commit(es_txn *txn, es_error *err)
{
    if (txn == NULL)
        return es__error_set(err, ES_EINVAL, "transaction is NULL");
    return txn->store->ops->txn->commit(txn, err);
}

void es_txn_rollback(es_txn *txn)
{
    if (txn != NULL) txn->store->ops->txn->rollback(txn);
}

int es_store_close(es_store *store)
{
    if (store == NULL) return 0;
    if (atomic_load(&store->open_txns) != 0) return ES_EMISUSE;
    atomic_store(&store->closing, true);
    store->ops->close(store);
    return 0;
}

/* A nil aggregate id names no aggregate: every entry refuses it. */
static int check_id(const es_uuid *aggregate_id, es_error *err)
{
    if (es_uuid_is_nil(aggregate_id))
        return es__error_set(err, ES_EINVAL, "aggregate id is nil");
    return 0;
}

int es__wrong_type(es_error *err, const es_uuid *aggregate_id,
                   const char *stored, const char *wanted)
{
    char id[ES_UUID_STRLEN + 1];
    es__error_set(err, ES_EWRONGTYPE,
                  "aggregate %s is of type '%.63s', not '%.63s'",
                  es_uuid_format(aggregate_id, id), stored, wanted);
    if (err) err->aggregate_id = *aggregate_id;
    return ES_EWRONGTYPE;
}

int es__txn_stream(es_txn *txn, const char *type_name,
                   const es_uuid *aggregate_id, uint64_t from_version,
                   int (*fn)(void *ud, const es_event *event), void *ud,
                   es_error *err)
{
    if (txn == NULL || aggregate_id == NULL || fn == NULL)
        return es__error_set(err, ES_EINVAL,
                             "transaction, aggregate id and fn are required");
    int rc = check_id(aggregate_id, err);
    if (rc != 0) return rc;
    return txn->store->ops->core->stream(txn, type_name, aggregate_id,
                                         from_version, fn, ud, err);
}

int es_txn_stream(es_txn *txn, const es_uuid *aggregate_id,
                  uint64_t from_version,
                  int (*fn)(void *ud, const es_event *event), void *ud,
                  es_error *err)
{
    return es__txn_stream(txn, NULL, aggregate_id, from_version, fn, ud, err);
}

int es_txn_stream_of(es_txn *txn, const es_aggregate_type *type,
                     const es_uuid *aggregate_id, uint64_t from_version,
                     int (*fn)(void *ud, const es_event *event), void *ud,
                     es_error *err)
{
    int rc = es_aggregate_type_check(type, err);
    if (rc != 0) return rc;
    return es__txn_stream(txn, type->name, aggregate_id, from_version, fn, ud,
                          err);
}

int es_txn_get_event(es_txn *txn, const es_uuid *aggregate_id,
                     const es_uuid *event_id, es_event **out, es_error *err)
{
    if (txn == NULL || aggregate_id == NULL || event_id == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "all arguments are required");
    *out = NULL;
    int rc = check_id(aggregate_id, err);
    if (rc != 0) return rc;
    if (es_uuid_is_nil(event_id))
        return es__error_set(err, ES_EINVAL, "event id is nil");
    return txn->store->ops->core->get_event(txn, aggregate_id, event_id, out,
                                            err);
}

int es__txn_get_snapshot(es_txn *txn, const char *type_name,
                         const es_uuid *aggregate_id,
                         uint64_t snapshot_version, es_snapshot **out,
                         es_error *err)
{
    if (txn == NULL || aggregate_id == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "all arguments are required");
    *out = NULL;
    int rc = check_id(aggregate_id, err);
    if (rc != 0) return rc;
    return txn->store->ops->core->get_snapshot(txn, type_name, aggregate_id,
                                         snapshot_version, out, err);
}

int es_txn_get_snapshot(es_txn *txn, const es_uuid *aggregate_id,
                        uint64_t snapshot_version, es_snapshot **out,
                        es_error *err)
{
    return es__txn_get_snapshot(txn, NULL, aggregate_id, snapshot_version,
                                out, err);
}

int es_txn_get_snapshot_of(es_txn *txn, const es_aggregate_type *type,
                           const es_uuid *aggregate_id, es_snapshot **out,
                           es_error *err)
{
    if (out != NULL) *out = NULL;
    int rc = es_aggregate_type_check(type, err);
    if (rc != 0) return rc;
    return es__txn_get_snapshot(txn, type->name, aggregate_id,
                                type->snapshot_version, out, err);
}

int es_txn_store_snapshot(es_txn *txn, const es_snapshot *snap, es_error *err)
{
    if (txn == NULL || snap == NULL || (snap->data == NULL && snap->len > 0))
        return es__error_set(err, ES_EINVAL, "transaction and snapshot "
                                             "are required");
    if (es_uuid_is_nil(&snap->aggregate_id))
        return es__error_set(err, ES_EINVAL, "snapshot has a nil "
                                             "aggregate id");
    return txn->store->ops->core->store_snapshot(txn, snap, err);
}

int es_txn_delete_snapshots(es_txn *txn, const es_uuid *aggregate_id,
                            es_error *err)
{
    if (txn == NULL || aggregate_id == NULL)
        return es__error_set(err, ES_EINVAL, "all arguments are required");
    int rc = check_id(aggregate_id, err);
    if (rc != 0) return rc;
    return txn->store->ops->core->delete_snapshots(txn, aggregate_id, err);
}

int es_txn_list_side_effects(es_txn *txn, const es_uuid *aggregate_id,
                             es_side_effect_list **out, es_error *err)
{
    if (txn == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "transaction and out are "
                                             "required");
    *out = NULL;
    if (aggregate_id != NULL) {
        int rc = check_id(aggregate_id, err);
        if (rc != 0) return rc;
    }
    return txn->store->ops->core->list_side_effects(txn, aggregate_id, out,
                                                    err);
}

int es__txn_savepoint(es_txn *txn, es_error *err)
{
    return txn->store->ops->txn->savepoint(txn, err);
}

int es__txn_rollback_to(es_txn *txn, es_error *err)
{
    return txn->store->ops->txn->rollback_to(txn, err);
}

int es__txn_release(es_txn *txn, es_error *err)
{
    return txn->store->ops->txn->release(txn, err);
}

int es__txn_insert_events(es_txn *txn, const char *type_name,
                          const es_uuid *aggregate_id, const es_event *events,
                          size_t n, bool *inserted, es_error *err)
{
    return txn->store->ops->core->insert_events(txn, type_name, aggregate_id,
                                          events, n, inserted, err);
}

int es__txn_insert_side_effects(es_txn *txn, const char *type_name,
                                const es_side_effect *items, size_t n,
                                es_error *err)
{
    if (n == 0) return 0;
    return txn->store->ops->core->insert_side_effects(txn, type_name, items, n,
                                                err);
}

void es__store_init(es_store *store, const es_store_ops *ops)
{
    store->ops = ops;
    atomic_init(&store->open_txns, 0);
    atomic_init(&store->closing, false);
    pthread_mutex_init(&store->listeners_lock, NULL);
    memset(store->listeners, 0, sizeof store->listeners);
    atomic_init(&store->n_event_listeners, 0);
    memset(store->event_listeners, 0, sizeof store->event_listeners);
}

void es__store_destroy(es_store *store)
{
    pthread_mutex_destroy(&store->listeners_lock);
}

int es__store_listen(es_store *store, es__commit_listener fn, void *ud)
{
    int rc = ES_EBUSY;
    pthread_mutex_lock(&store->listeners_lock);
    for (size_t i = 0; i < ES__MAX_LISTENERS; i++) {
        if (store->listeners[i].fn != NULL) continue;
        store->listeners[i].fn = fn;
        store->listeners[i].ud = ud;
        rc = 0;
        break;
    }
    pthread_mutex_unlock(&store->listeners_lock);
    return rc;
}

void es__store_unlisten(es_store *store, es__commit_listener fn, void *ud)
{
    pthread_mutex_lock(&store->listeners_lock);
    for (size_t i = 0; i < ES__MAX_LISTENERS; i++)
        if (store->listeners[i].fn == fn && store->listeners[i].ud == ud)
            store->listeners[i].fn = NULL;
    pthread_mutex_unlock(&store->listeners_lock);
}

void es__store_notify(es_store *store)
{
    /* Listeners only signal (a condition variable, an event): calling
     * them under the lock keeps unlisten simple and safe. */
    pthread_mutex_lock(&store->listeners_lock);
    for (size_t i = 0; i < ES__MAX_LISTENERS; i++)
        if (store->listeners[i].fn != NULL)
            store->listeners[i].fn(store->listeners[i].ud);
    pthread_mutex_unlock(&store->listeners_lock);
}

bool es__outbox_filter_match(const es__outbox_filter *filters, size_t n,
                             const char *type_name, int32_t kind)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(filters[i].type_name, type_name) == 0 &&
            (filters[i].kind == ES_OUTBOX_ANY_KIND || filters[i].kind == kind))
            return true;
    return false;
}

bool es__store_has_commands(const es_store *store)
{
    const es__command_ops *c = store != NULL ? store->ops->commands : NULL;
    return c != NULL && c->insert != NULL && c->get != NULL;
}

int es__txn_insert_commands(es_txn *txn, const es__command_record *recs,
                            size_t n, bool *inserted, es_error *err)
{
    if (!es__store_has_commands(txn->store))
        return es__error_set(err, ES_EINVAL, "store '%s' keeps no command "
                             "ids", txn->store->ops->name);
    if (n == 0) return 0;
    return txn->store->ops->commands->insert(txn, recs, n, inserted, err);
}

int es__txn_get_command(es_txn *txn, const es_uuid *command_id,
                        es__command_record **out, es_error *err)
{
    *out = NULL;
    if (!es__store_has_commands(txn->store))
        return es__error_set(err, ES_EINVAL, "store '%s' keeps no command "
                             "ids", txn->store->ops->name);
    return txn->store->ops->commands->get(txn, command_id, out, err);
}

es__command_record *es__command_record_dup(const es__command_record *rec)
{
    size_t rlen = rec->reason ? strlen(rec->reason) + 1 : 0;
    es__command_record *copy = es__malloc(sizeof *copy + rec->len + rlen);
    if (copy == NULL) return NULL;
    *copy = *rec;
    uint8_t *data = (uint8_t *)(copy + 1);
    if (rec->len > 0) memcpy(data, rec->payload, rec->len);
    copy->payload = data;
    if (rlen > 0) {
        memcpy(data + rec->len, rec->reason, rlen);
        copy->reason = (const char *)(data + rec->len);
    }
    return copy;
}

es_event *es__event_dup(const es_event *ev)
{
    es_event *copy = es__malloc(sizeof *copy + ev->len);
    if (copy == NULL) return NULL;
    *copy = *ev;
    uint8_t *data = (uint8_t *)(copy + 1);
    if (ev->len > 0) memcpy(data, ev->data, ev->len);
    copy->data = data;
    return copy;
}

es_snapshot *es__snapshot_dup(const es_snapshot *snap)
{
    es_snapshot *copy = es__malloc(sizeof *copy + snap->len);
    if (copy == NULL) return NULL;
    *copy = *snap;
    uint8_t *data = (uint8_t *)(copy + 1);
    if (snap->len > 0) memcpy(data, snap->data, snap->len);
    copy->data = data;
    return copy;
}

int es__side_effect_list_push(es_side_effect_list *list, size_t *cap,
                              const es_side_effect *se)
{
    void *items = list->items;
    if (es__grow(&items, cap, list->count + 1, sizeof *list->items) != 0)
        return ES_ENOMEM;
    list->items = items;
    uint8_t *data = es__memdup(se->data, se->len);
    if (data == NULL) return ES_ENOMEM;
    es_side_effect *dst = &list->items[list->count++];
    *dst = *se;
    dst->data = data;
    return 0;
}

void es_side_effect_list_free(es_side_effect_list *list)
{
    if (list == NULL) return;
    for (size_t i = 0; i < list->count; i++)
        es__free((void *)list->items[i].data);
    es__free(list->items);
    es__free(list);
}

void es__command_digest(int32_t kind, const void *payload, size_t len,
                        uint8_t digest[ES__COMMAND_DIGEST])
{
    crypto_generichash_state st;
    uint8_t k[4] = {(uint8_t)((uint32_t)kind >> 24),
                    (uint8_t)((uint32_t)kind >> 16),
                    (uint8_t)((uint32_t)kind >> 8), (uint8_t)kind};
    crypto_generichash_init(&st, NULL, 0, ES__COMMAND_DIGEST);
    crypto_generichash_update(&st, k, sizeof k);
    if (len > 0) crypto_generichash_update(&st, payload, len);
    crypto_generichash_final(&st, digest, ES__COMMAND_DIGEST);
}

bool es__command_matches(const es__command_record *rec, int32_t kind,
                         const void *payload, size_t len)
{
    if (rec->kind != kind) return false;
    if (rec->hashed) {
        uint8_t d[ES__COMMAND_DIGEST];
        es__command_digest(kind, payload, len, d);
        return rec->len == ES__COMMAND_DIGEST &&
               sodium_memcmp(rec->payload, d, ES__COMMAND_DIGEST) == 0;
    }
    return rec->len == len && (len == 0 || memcmp(rec->payload, payload,
                                                  len) == 0);
}

int es__store_purge_commands(es_store *store, int64_t before_ms,
                             size_t limit, size_t *count, es_error *err)
{
    if (count) *count = 0;
    if (store->ops->commands == NULL || store->ops->commands->purge == NULL)
        return 0; /* none kept */
    return store->ops->commands->purge(store, before_ms, limit, count, err);
}

int es_store_purge_commands(es_store *store, int64_t before_ms,
                            size_t *count, es_error *err)
{
    if (count) *count = 0;
    if (store == NULL)
        return es__error_set(err, ES_EINVAL, "store is NULL");
    if (atomic_load(&store->closing))
        return es__error_set(err, ES_ECLOSED, "store is closing");
    for (;;) {
        size_t n = 0;
        int rc = es__store_purge_commands(store, before_ms, ES__PURGE_BATCH,
                                          &n, err);
        if (count) *count += n;
        if (rc != 0 || n < ES__PURGE_BATCH) return rc;
    }
}

void es__commit_fail_group(es__commit_item **items, size_t n, size_t from,
                           int status)
{
    const void *group = items[from]->group;
    items[from]->status = status;
    for (size_t j = from + 1; j < n; j++)
        if (items[j]->group == group &&
            items[j]->status == ES__COMMIT_PENDING)
            items[j]->status = ES_ECONFLICT;
}

bool es__commit_any_pending(es__commit_item **items, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (items[i]->status == ES__COMMIT_PENDING) return true;
    return false;
}

/* ---- the function table, for the rest of the library ---- */

const char *es__store_name(const es_store *store) { return store->ops->name; }

int es__txn_store_snapshot(es_txn *txn, const es_snapshot *snap,
                           es_error *err)
{
    return txn->store->ops->core->store_snapshot(txn, snap, err);
}

bool es__store_has_batch_writer(const es_store *store)
{
    return store->ops->batch != NULL && store->ops->batch->write != NULL;
}

size_t es__store_write_batch(es_store *store, void **slot,
                             es__commit_item **items, size_t n)
{
    return store->ops->batch->write(store, slot, items, n);
}

unsigned es__store_batch_lanes(const es_store *store)
{
    return store->ops->batch != NULL ? store->ops->batch->lanes : 0;
}

int es__store_lane_open(es_store *store, struct event_base *base,
                        es__batch_lane **out, es_error *err)
{
    if (store->ops->batch == NULL || store->ops->batch->lane_open == NULL) {
        *out = NULL;
        return 0;
    }
    return store->ops->batch->lane_open(store, base, out, err);
}

void es__store_lane_write(es_store *store, es__batch_lane *lane,
                          es__commit_item **items, size_t n,
                          es__batch_done done, void *ud)
{
    store->ops->batch->lane_write(lane, items, n, done, ud);
}

void es__store_lane_close(es_store *store, es__batch_lane *lane)
{
    store->ops->batch->lane_close(lane);
}

bool es__store_has_outbox(const es_store *store)
{
    return store->ops->outbox != NULL;
}

int es__store_outbox_claim(es_store *store, const char *owner,
                           int64_t now_ms, int64_t lease_ms,
                           uint32_t max_attempts,
                           const es__outbox_filter *filters,
                           size_t n_filters, size_t max,
                           es_outbox_entry_list **out, es_error *err)
{
    return store->ops->outbox->claim(store, owner, now_ms, lease_ms,
                                    max_attempts, filters, n_filters, max,
                                    out, err);
}

int es__store_outbox_finish(es_store *store, const es_uuid *id,
                            const char *owner, es_outbox_status status,
                            int64_t now_ms, int64_t next_attempt_ms,
                            const char *error, es_error *err)
{
    return store->ops->outbox->finish(store, id, owner, status, now_ms,
                                     next_attempt_ms, error, err);
}

bool es__store_has_outbox_finish_many(const es_store *store)
{
    return store->ops->outbox != NULL &&
           store->ops->outbox->finish_many != NULL;
}

int es__store_outbox_finish_many(es_store *store, const char *owner,
                                 int64_t now_ms, const es__outbox_outcome *v,
                                 size_t n, size_t *lost, es_error *err)
{
    return store->ops->outbox->finish_many(store, owner, now_ms, v, n, lost,
                                          err);
}

int es__store_outbox_list(es_store *store, es_outbox_status status,
                          size_t limit, es_outbox_entry_list **out,
                          es_error *err)
{
    return store->ops->outbox->list(store, status, limit, out, err);
}

int es__store_outbox_get(es_store *store, const es_uuid *id,
                         es_outbox_entry **out, es_error *err)
{
    return store->ops->outbox->get(store, id, out, err);
}

int es__store_outbox_requeue(es_store *store, const es_uuid *id,
                             const char *type_name, int32_t kind,
                             int64_t now_ms, size_t *count, es_error *err)
{
    return store->ops->outbox->requeue(store, id, type_name, kind, now_ms,
                                      count, err);
}

int es__store_outbox_purge(es_store *store, int64_t before_ms, size_t limit,
                           size_t *count, es_error *err)
{
    return store->ops->outbox->purge(store, before_ms, limit, count, err);
}

int es__store_outbox_stats(es_store *store, int64_t now_ms,
                           es_outbox_stats *out, es_error *err)
{
    return store->ops->outbox->stats(store, now_ms, out, err);
}

bool es__store_has_outbox_watch(const es_store *store)
{
    return store->ops->outbox != NULL && store->ops->outbox->watch != NULL;
}

int es__store_outbox_watch(es_store *store, int64_t retry_max_ms,
                           es__watch_fn fn, void *ud, es__outbox_watch **out,
                           es_error *err)
{
    return store->ops->outbox->watch(store, retry_max_ms, fn, ud, out, err);
}

void es__store_outbox_unwatch(es_store *store, es__outbox_watch *watch)
{
    if (watch != NULL) store->ops->outbox->unwatch(watch);
}
