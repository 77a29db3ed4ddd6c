/* The benchmarks' null store (see null_store.h): the backend interface
 * (store/store_impl.h) with nothing behind it. */
#include <stdlib.h>

#include "null_store.h"
#include "store/batch_ops.h"
#include "store/store_impl.h"

static int n_begin(es_store *store, es_txn **out, es_error *err)
{
    (void)err;
    es_txn *t = calloc(1, sizeof *t);
    if (t == NULL) return ES_ENOMEM;
    t->store = store;
    es__store_txn_started(store);
    *out = t;
    return 0;
}

static void n_end(es_txn *txn)
{
    es__store_txn_ended(txn->store);
    free(txn);
}

static int n_commit(es_txn *txn, es_error *err)
{
    (void)err;
    n_end(txn);
    return 0;
}

static int n_ok(es_txn *txn, es_error *err)
{
    (void)txn;
    (void)err;
    return 0;
}

/* No stream: every aggregate is new. */
static int n_stream(es_txn *txn, const char *type_name, const es_uuid *agg,
                    uint64_t from, int (*fn)(void *, const es_event *),
                    void *ud, es_error *err)
{
    (void)txn, (void)type_name, (void)agg, (void)from, (void)fn, (void)ud;
    (void)err;
    return 0;
}

static int n_get_event(es_txn *txn, const es_uuid *agg, const es_uuid *id,
                       es_event **out, es_error *err)
{
    (void)txn, (void)agg, (void)id, (void)out, (void)err;
    return ES_ENOTFOUND;
}

static int n_insert_events(es_txn *txn, const char *type_name,
                           const es_uuid *agg, const es_event *events,
                           size_t n, bool *inserted, es_error *err)
{
    (void)txn, (void)type_name, (void)agg, (void)events, (void)err;
    for (size_t i = 0; i < n; i++) inserted[i] = true;
    return 0;
}

static int n_insert_side_effects(es_txn *txn, const char *type_name,
                                 const es_side_effect *items, size_t n,
                                 es_error *err)
{
    (void)txn, (void)type_name, (void)items, (void)n, (void)err;
    return 0;
}

static int n_get_snapshot(es_txn *txn, const char *type_name,
                          const es_uuid *agg, uint64_t sv, es_snapshot **out,
                          es_error *err)
{
    (void)txn, (void)type_name, (void)agg, (void)sv, (void)out, (void)err;
    return ES_ENOTFOUND;
}

static int n_store_snapshot(es_txn *txn, const es_snapshot *snap,
                            es_error *err)
{
    (void)txn, (void)snap, (void)err;
    return 0;
}

static int n_delete_snapshots(es_txn *txn, const es_uuid *agg, es_error *err)
{
    (void)txn, (void)agg, (void)err;
    return 0;
}

static int n_list_side_effects(es_txn *txn, const es_uuid *agg,
                               es_side_effect_list **out, es_error *err)
{
    (void)txn, (void)agg, (void)out, (void)err;
    return ES_ENOTFOUND;
}

/* Every item committed, in one "transaction". */
static size_t n_write(es_store *store, void **slot, es__commit_item **items,
                      size_t n)
{
    (void)store, (void)slot;
    for (size_t i = 0; i < n; i++)
        if (items[i]->status == ES__COMMIT_PENDING) items[i]->status = 0;
    return 1;
}

static void n_close(es_store *store)
{
    es__store_destroy(store);
    free(store);
}

static const es__txn_ops null_txn = {
    .begin = n_begin,
    .commit = n_commit,
    .rollback = n_end,
    .savepoint = n_ok,
    .rollback_to = n_ok,
    .release = n_ok,
};

static const es__core_ops null_core = {
    .stream = n_stream,
    .get_event = n_get_event,
    .insert_events = n_insert_events,
    .insert_side_effects = n_insert_side_effects,
    .get_snapshot = n_get_snapshot,
    .store_snapshot = n_store_snapshot,
    .delete_snapshots = n_delete_snapshots,
    .list_side_effects = n_list_side_effects,
};

static const es__batch_ops null_batch = {.lanes = 1, .write = n_write};

static const es_store_ops null_ops = {
    .name = "null",
    .version = ES__STORE_OPS_VERSION,
    .txn = &null_txn,
    .core = &null_core,
    .batch = &null_batch,
    .close = n_close,
};

int bench_null_store_open(es_store **out)
{
    es_store *s = calloc(1, sizeof *s);
    if (s == NULL) return ES_ENOMEM;
    es__store_init(s, &null_ops);
    *out = s;
    return 0;
}
