/*
 * The memory store's reads in a transaction: an aggregate's stream, one
 * event, a snapshot, the pending side effects and a command-id record.
 * Each sees the committed data plus the transaction's own writes.
 */
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "store/memory/mem_int.h"

#define STREAM_CHUNK 256

typedef struct chunk {
    es_event ev[STREAM_CHUNK];
    size_t n;
} chunk;

static int cmp_pend_by_version(const void *a, const void *b)
{
    const pend_event *x = *(pend_event *const *)a, *y = *(pend_event *const *)b;
    return (x->ev.version > y->ev.version) - (x->ev.version < y->ev.version);
}

int es__mem_stream(es_txn *txn, const char *type_name,
                   const es_uuid *agg, uint64_t from,
                   int (*fn)(void *ud, const es_event *event), void *ud,
                   es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    pthread_mutex_lock(&s->lock);
    int wrong =
        es__mem_check_type(t, es__mem_find_stream(s, agg), agg, type_name, err);
    pthread_mutex_unlock(&s->lock);
    if (wrong != 0) return wrong;

    /* The transaction's own events of this aggregate, by version. */
    pend_event **mine = NULL;
    size_t n_mine = 0;
    for (size_t i = 0; i < t->n_ev; i++)
        if (es_uuid_equal(&t->ev[i]->agg, agg) && t->ev[i]->ev.version >= from)
            n_mine++;
    if (n_mine > 0) {
        mine = es__malloc(n_mine * sizeof *mine);
        if (mine == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
        size_t k = 0;
        for (size_t i = 0; i < t->n_ev; i++)
            if (es_uuid_equal(&t->ev[i]->agg, agg) &&
                t->ev[i]->ev.version >= from)
                mine[k++] = t->ev[i];
        qsort(mine, n_mine, sizeof *mine, cmp_pend_by_version);
    }
    uint64_t limit = n_mine > 0 ? mine[0]->ev.version : UINT64_MAX;

    chunk *c = es__malloc(sizeof *c);
    if (c == NULL) {
        es__free(mine);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    int rc = 0;
    uint64_t next = from;
    for (;;) {
        c->n = 0;
        bool oom = false;
        pthread_mutex_lock(&s->lock);
        mem_stream *st = es__mem_find_stream(s, agg);
        if (st != NULL) {
            for (size_t i = es__mem_lower_bound(st, next);
                 i < st->n && c->n < STREAM_CHUNK; i++) {
                const mem_event *e = &st->ev[i];
                if (e->version >= limit) break;
                uint8_t *data = es__memdup(e->data, e->len);
                if (data == NULL) {
                    oom = true;
                    break;
                }
                c->ev[c->n++] = (es_event){e->id, e->version, e->kind, data,
                                           e->len};
            }
        }
        pthread_mutex_unlock(&s->lock);
        for (size_t i = 0; i < c->n; i++) {
            if (rc == 0 && !oom) rc = fn(ud, &c->ev[i]);
            es__free((void *)c->ev[i].data);
        }
        if (oom) rc = es__error_set(err, ES_ENOMEM, "out of memory");
        if (rc != 0 || c->n < STREAM_CHUNK) break;
        next = c->ev[c->n - 1].version + 1;
    }
    es__free(c);
    for (size_t i = 0; rc == 0 && i < n_mine; i++) {
        es_event ev = {mine[i]->ev.id, mine[i]->ev.version, mine[i]->ev.kind,
                       mine[i]->ev.data, mine[i]->ev.len};
        rc = fn(ud, &ev);
    }
    es__free(mine);
    return rc;
}

int es__mem_get_event(es_txn *txn, const es_uuid *agg,
                      const es_uuid *event_id, es_event **out,
                      es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    pend_event *pe = es__mem_pend_find_id(t, agg, event_id);
    if (pe != NULL) {
        es_event ev = {pe->ev.id, pe->ev.version, pe->ev.kind, pe->ev.data,
                       pe->ev.len};
        *out = es__event_dup(&ev);
        return *out ? 0 : es__error_set(err, ES_ENOMEM, "out of memory");
    }
    int rc = ES_ENOTFOUND;
    pthread_mutex_lock(&s->lock);
    mem_id *idx = es__mem_find_id(s, agg, event_id);
    if (idx != NULL) {
        const mem_event *e = es__mem_find_version(
            es__mem_find_stream(s, &idx->agg), idx->version);
        if (e != NULL) {
            es_event ev = {e->id, e->version, e->kind, e->data, e->len};
            *out = es__event_dup(&ev);
            rc = *out ? 0 : ES_ENOMEM;
        }
    }
    pthread_mutex_unlock(&s->lock);
    if (rc == ES_ENOTFOUND)
        return es__error_set(err, rc, "event not found");
    if (rc == ES_ENOMEM) return es__error_set(err, rc, "out of memory");
    return 0;
}

int es__mem_get_command(es_txn *txn, const es_uuid *command_id,
                        es__command_record **out, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    mem_cmd *c = es__mem_find_cmd(&t->cmd_ids, command_id);
    if (c != NULL) {
        *out = es__command_record_dup(&c->rec);
        return *out ? 0 : es__error_set(err, ES_ENOMEM, "out of memory");
    }
    int rc = ES_ENOTFOUND;
    pthread_mutex_lock(&s->lock);
    c = es__mem_find_cmd(&s->cmds, command_id);
    if (c != NULL) {
        *out = es__command_record_dup(&c->rec);
        rc = *out ? 0 : ES_ENOMEM;
    }
    pthread_mutex_unlock(&s->lock);
    if (rc == ES_ENOTFOUND) return es__error_set(err, rc, "command not found");
    if (rc != 0) return es__error_set(err, rc, "out of memory");
    return 0;
}

int es__mem_get_snapshot(es_txn *txn, const char *type_name,
                         const es_uuid *agg, uint64_t sv,
                         es_snapshot **out, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    pthread_mutex_lock(&s->lock);
    int wrong =
        es__mem_check_type(t, es__mem_find_stream(s, agg), agg, type_name, err);
    pthread_mutex_unlock(&s->lock);
    if (wrong != 0) return wrong;
    /* Newest pending write for this aggregate wins. */
    for (size_t i = t->n_snap; i-- > 0;) {
        const pend_snap *ps = &t->snap[i];
        if (!es_uuid_equal(&ps->agg, agg)) continue;
        if (ps->op == ES__MEM_SNAP_DELETE) break;
        if (ps->snap.snapshot_version != sv) continue;
        es_snapshot v = {*agg, ps->snap.version, sv, ps->snap.data,
                         ps->snap.len};
        *out = es__snapshot_dup(&v);
        return *out ? 0 : es__error_set(err, ES_ENOMEM, "out of memory");
    }
    for (size_t i = t->n_snap; i-- > 0;)
        if (t->snap[i].op == ES__MEM_SNAP_DELETE &&
            es_uuid_equal(&t->snap[i].agg, agg))
            return es__error_set(err, ES_ENOTFOUND, "no snapshot");
    int rc = ES_ENOTFOUND;
    pthread_mutex_lock(&s->lock);
    mem_snapset *set = es__mem_find_snapset(s, agg);
    for (size_t i = 0; set != NULL && i < set->n; i++) {
        if (set->s[i].snapshot_version != sv) continue;
        es_snapshot v = {*agg, set->s[i].version, sv, set->s[i].data,
                         set->s[i].len};
        *out = es__snapshot_dup(&v);
        rc = *out ? 0 : ES_ENOMEM;
        break;
    }
    pthread_mutex_unlock(&s->lock);
    if (rc == ES_ENOTFOUND) return es__error_set(err, rc, "no snapshot");
    if (rc != 0) return es__error_set(err, rc, "out of memory");
    return 0;
}

int es__mem_list_side_effects(es_txn *txn, const es_uuid *agg,
                              es_side_effect_list **out, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    es_side_effect_list *list = es__calloc(1, sizeof *list);
    if (list == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    size_t cap = 0;
    int rc = 0;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; rc == 0 && i < s->n_se; i++)
        if (s->se[i]->status == ES_OUTBOX_PENDING &&
            (agg == NULL || es_uuid_equal(agg, &s->se[i]->se.aggregate_id)))
            rc = es__side_effect_list_push(list, &cap, &s->se[i]->se);
    pthread_mutex_unlock(&s->lock);
    for (size_t i = 0; rc == 0 && i < t->n_se; i++)
        if (agg == NULL || es_uuid_equal(agg, &t->se[i].se.aggregate_id))
            rc = es__side_effect_list_push(list, &cap, &t->se[i].se);
    if (rc != 0) {
        es_side_effect_list_free(list);
        return es__error_set(err, rc, "out of memory");
    }
    *out = list;
    return 0;
}
