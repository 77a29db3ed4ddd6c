/*
 * The memory store's writes in a transaction: events, side effects,
 * command-id records and snapshots, kept aside in the transaction until
 * it commits (txn.c).
 */
#include <stdio.h>
#include <string.h>

#include "core/internal.h"
#include "store/memory/mem_int.h"

int es__mem_insert_events(es_txn *txn, const char *type_name,
                          const es_uuid *agg, const es_event *events,
                          size_t n, bool *inserted, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    if (strlen(type_name) >= ES__MEM_TYPE_NAME_MAX)
        return es__error_set(err, ES_EINVAL, "type name too long");
    void *items = t->ev;
    if (es__grow(&items, &t->cap_ev, t->n_ev + n, sizeof(pend_event *)) != 0)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    t->ev = items;

    int rc = 0;
    pthread_mutex_lock(&s->lock);
    mem_stream *st = es__mem_find_stream(s, agg);
    const char *owner_type = st ? st->type : es__mem_pend_stream_type(t, agg);
    rc = es__mem_check_type(t, st, agg, type_name, err);
    bool first = owner_type == NULL; /* the aggregate's first pending */
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const es_event *e = &events[i];
        inserted[i] = false;
        if (es__mem_find_id(s, agg, &e->id) ||
            es__mem_find_version(st, e->version) ||
            es__mem_pend_find_id(t, agg, &e->id) ||
            es__mem_pend_find_version(t, agg, e->version))
            continue;
        pend_event *pe = es__calloc(1, sizeof *pe);
        uint8_t *data = pe ? es__memdup(e->data, e->len) : NULL;
        if (data == NULL) {
            es__free(pe);
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
            break;
        }
        pe->agg = *agg;
        strcpy(pe->type, type_name);
        pe->ev = (mem_event){e->id, e->version, e->kind, data, e->len};
        if (es__ptrmap_insert(&t->ev_ids, pe, es__mem_hash_pend_id) != 0) {
            es__free(data);
            es__free(pe);
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
            break;
        }
        if (es__ptrmap_insert(&t->ev_versions, pe,
                              es__mem_hash_pend_version) != 0 ||
            (first &&
             es__ptrmap_insert(&t->ev_aggs, pe, es__mem_hash_pend_agg))) {
            es__ptrmap_remove(&t->ev_versions, pe, es__mem_hash_pend_version);
            es__ptrmap_remove(&t->ev_ids, pe, es__mem_hash_pend_id);
            es__free(data);
            es__free(pe);
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
            break;
        }
        t->ev[t->n_ev++] = pe;
        inserted[i] = true;
        first = false;
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

int es__mem_insert_side_effects(es_txn *txn, const char *type_name,
                                const es_side_effect *items, size_t n,
                                es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    void *arr = t->se;
    if (es__grow(&arr, &t->cap_se, t->n_se + n, sizeof(mem_se)) != 0)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    t->se = arr;
    for (size_t i = 0; i < n; i++) {
        bool seen = es__ptrmap_find(&t->se_ids, es__uuid_hash(&items[i].id),
                                    es__mem_match_uuid, &items[i].id) != NULL;
        if (!seen) {
            pthread_mutex_lock(&s->lock);
            seen = es__mem_committed_se_exists(s, &items[i].id);
            pthread_mutex_unlock(&s->lock);
        }
        if (seen) continue;
        es_uuid *key = es__memdup(&items[i].id, sizeof items[i].id);
        uint8_t *data = key ? es__memdup(items[i].data, items[i].len) : NULL;
        if (data == NULL ||
            es__ptrmap_insert(&t->se_ids, key, es__mem_hash_uuid) != 0) {
            es__free(key);
            es__free(data);
            return es__error_set(err, ES_ENOMEM, "out of memory");
        }
        mem_se *m = &t->se[t->n_se++];
        memset(m, 0, sizeof *m);
        m->se = items[i];
        m->se.data = data;
        snprintf(m->type, sizeof m->type, "%s", type_name);
        m->status = ES_OUTBOX_PENDING;
    }
    return 0;
}

int es__mem_insert_commands(es_txn *txn, const es__command_record *recs,
                            size_t n, bool *inserted, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    void *items = t->cmd;
    if (es__grow(&items, &t->cap_cmd, t->n_cmd + n, sizeof(mem_cmd *)) != 0)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    t->cmd = items;
    for (size_t i = 0; i < n; i++) {
        inserted[i] = false;
        if (es__mem_find_cmd(&t->cmd_ids, &recs[i].command_id) != NULL)
            continue;
        pthread_mutex_lock(&s->lock);
        bool seen = es__mem_find_cmd(&s->cmds, &recs[i].command_id) != NULL;
        pthread_mutex_unlock(&s->lock);
        if (seen) continue;
        es__command_record *copy = es__command_record_dup(&recs[i]);
        if (copy == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
        /* mem_cmd is a wrapper of the record: same allocation */
        mem_cmd *c = (mem_cmd *)(void *)copy;
        if (es__ptrmap_insert(&t->cmd_ids, c, es__mem_hash_cmd) != 0) {
            es__free(c);
            return es__error_set(err, ES_ENOMEM, "out of memory");
        }
        t->cmd[t->n_cmd++] = c;
        inserted[i] = true;
    }
    return 0;
}

static int push_snap(mem_txn *t, const pend_snap *ps, es_error *err)
{
    void *items = t->snap;
    if (es__grow(&items, &t->cap_snap, t->n_snap + 1, sizeof(pend_snap)) != 0)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    t->snap = items;
    t->snap[t->n_snap++] = *ps;
    return 0;
}

int es__mem_store_snapshot(es_txn *txn, const es_snapshot *snap,
                           es_error *err)
{
    uint8_t *data = es__memdup(snap->data, snap->len);
    if (data == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    pend_snap ps = {ES__MEM_SNAP_PUT, snap->aggregate_id,
                    {snap->snapshot_version, snap->version, data, snap->len}};
    int rc = push_snap((mem_txn *)txn, &ps, err);
    if (rc != 0) es__free(data);
    return rc;
}

int es__mem_delete_snapshots(es_txn *txn, const es_uuid *agg, es_error *err)
{
    pend_snap ps = {ES__MEM_SNAP_DELETE, *agg, {0, 0, NULL, 0}};
    return push_snap((mem_txn *)txn, &ps, err);
}
