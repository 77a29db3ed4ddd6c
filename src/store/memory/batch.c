/*
 * The memory store's batch writer (es__batch_ops.write): many
 * commands' items checked and linked under one hold of the lock, without
 * a transaction's pending copies.
 */
#include <stdio.h>
#include <string.h>

#include "core/internal.h"
#include "store/memory/mem_int.h"

/* What one item needs, allocated without the lock, linked under it. */
typedef struct item_plan {
    uint8_t **data; /* per event (data1 for one) */
    mem_id **id;    /* per event (id1 for one) */
    uint8_t *data1;
    mem_id *id1;
    mem_se **se;    /* per side effect; NULL once skipped */
    mem_cmd *cmd;
    int rc;         /* ES_ENOMEM when allocating failed */
} item_plan;

static void item_plan_free(const es__commit_item *it, item_plan *p)
{
    for (size_t i = 0; i < it->n_events; i++) {
        if (p->data) es__free(p->data[i]);
        if (p->id) es__free(p->id[i]);
    }
    for (size_t i = 0; p->se && i < it->n_side_effects; i++)
        if (p->se[i]) {
            es__free((void *)p->se[i]->se.data);
            es__free(p->se[i]);
        }
    if (p->data != &p->data1) es__free(p->data);
    if (p->id != &p->id1) es__free(p->id);
    es__free(p->se);
    es__free(p->cmd);
    memset(p, 0, sizeof *p);
}

static bool item_se_seen(const es__commit_item *it, size_t i)
{
    for (size_t j = 0; j < i; j++)
        if (es__mem_same_uuid(&it->side_effects[j].id, &it->side_effects[i].id))
            return true;
    return false;
}

/* Without the lock: copies of the item's events, side effects and
 * command record, so that the lock is held only to check and link (and
 * lanes can copy in parallel).  p->rc = ES_ENOMEM when short. */
static void item_alloc(const es__commit_item *it, bool cmds, int64_t now,
                       item_plan *p)
{
    memset(p, 0, sizeof *p);
    size_t ne = it->n_events, nse = it->n_side_effects;
    bool ok = true;
    if (ne == 1) { /* the common case, without two arrays */
        p->data = &p->data1;
        p->id = &p->id1;
    } else if (ne > 1) {
        p->data = es__calloc(ne, sizeof *p->data);
        p->id = es__calloc(ne, sizeof *p->id);
    }
    if (ne > 0) {
        ok = p->data && p->id;
        for (size_t i = 0; ok && i < ne; i++) {
            const es_event *e = &it->events[i];
            p->data[i] = es__memdup(e->data, e->len);
            p->id[i] = es__malloc(sizeof(mem_id));
            ok = p->id[i] && (p->data[i] || e->len == 0);
        }
    }
    if (ok && nse > 0) {
        p->se = es__calloc(nse, sizeof *p->se);
        ok = p->se != NULL;
        for (size_t i = 0; ok && i < nse; i++) {
            const es_side_effect *x = &it->side_effects[i];
            if (item_se_seen(it, i)) continue;
            mem_se *m = es__calloc(1, sizeof *m);
            uint8_t *data = m ? es__memdup(x->data, x->len) : NULL;
            if (m == NULL || (data == NULL && x->len > 0)) {
                es__free(m);
                es__free(data);
                ok = false;
                break;
            }
            m->se = *x;
            m->se.data = data;
            snprintf(m->type, sizeof m->type, "%s", it->type_name);
            m->status = ES_OUTBOX_PENDING;
            m->created_ms = now;
            p->se[i] = m;
        }
    }
    if (ok && cmds) {
        p->cmd = (mem_cmd *)(void *)es__command_record_dup(&it->record);
        ok = p->cmd != NULL;
    }
    if (!ok) {
        item_plan_free(it, p);
        p->rc = ES_ENOMEM;
    }
}

/* Lock held.  Check one item against what is stored, take the room it
 * needs, then link its copies: all or nothing.  Returns 0, ES_ECONFLICT
 * (a version or event id taken), ES_EIDEMPOTENCY (command id taken),
 * ES_EWRONGTYPE (other type), ES_EINVAL (name too long) or ES_ENOMEM.
 * What was linked belongs to the store; p keeps what was not (freed by
 * the caller).  Stored events join the global order as one commit, at
 * time now. */
static int batch_item(mem_store *s, es__commit_item *it, bool cmds,
                      item_plan *p, int64_t now)
{
    const es_uuid *agg = &it->aggregate_id;
    if (strlen(it->type_name) >= ES__MEM_TYPE_NAME_MAX) return ES_EINVAL;
    mem_stream *st = es__mem_find_stream(s, agg);
    if (st != NULL && strcmp(st->type, it->type_name) != 0)
        return ES_EWRONGTYPE;
    for (size_t i = 0; i < it->n_events; i++) {
        const es_event *e = &it->events[i];
        if (es__mem_find_version(st, e->version) ||
            es__mem_find_id(s, agg, &e->id))
            return ES_ECONFLICT;
        for (size_t j = 0; j < i; j++)
            if (it->events[j].version == e->version ||
                es__mem_same_uuid(&it->events[j].id, &e->id))
                return ES_ECONFLICT;
    }
    if (cmds && es__mem_find_cmd(&s->cmds, &it->record.command_id) != NULL)
        return ES_EIDEMPOTENCY;
    if (p->rc != 0) return p->rc;

    size_t ne = it->n_events, nse = it->n_side_effects, fresh = 0;
    for (size_t i = 0; i < nse; i++) {
        if (p->se[i] == NULL) continue;
        if (es__mem_committed_se_exists(s, &p->se[i]->se.id)) {
            es__free((void *)p->se[i]->se.data);
            es__free(p->se[i]);
            p->se[i] = NULL;
            continue;
        }
        fresh++;
    }
    mem_stream *created = NULL;
    if (st == NULL && ne > 0) {
        st = created = es__calloc(1, sizeof *st);
        if (st == NULL) return ES_ENOMEM;
        st->agg = *agg;
        memcpy(st->type, it->type_name, strlen(it->type_name) + 1);
    }
    bool ok = true;
    void *items = st ? st->ev : NULL;
    if (st && es__grow(&items, &st->cap, st->n + ne, sizeof(mem_event)))
        ok = false;
    if (st) st->ev = items;
    items = s->se;
    if (ok &&
        es__grow(&items, &s->cap_se, s->n_se + fresh, sizeof(mem_se *)))
        ok = false;
    s->se = items;
    ok = ok && es__ptrmap_reserve(&s->streams, 1, es__mem_hash_stream) == 0 &&
         es__ptrmap_reserve(&s->ids, ne, es__mem_hash_id) == 0 &&
         es__ptrmap_reserve(&s->se_ids, fresh, es__mem_hash_se) == 0 &&
         es__ptrmap_reserve(&s->cmds, 1, es__mem_hash_cmd) == 0 &&
         es__mem_cmd_log_reserve(s, 1) == 0 &&
         es__mem_order_reserve(s, ne) == 0;
    if (!ok) {
        if (created) {
            es__free(created->ev);
            es__free(created);
        }
        return ES_ENOMEM;
    }

    /* Link: nothing below allocates (room was reserved above). */
    if (created) es__ptrmap_insert(&s->streams, created, es__mem_hash_stream);
    uint64_t commit = ne > 0 ? es__mem_order_commit(s) : 0;
    for (size_t i = 0; i < ne; i++) {
        const es_event *e = &it->events[i];
        size_t pos = es__mem_lower_bound(st, e->version);
        memmove(&st->ev[pos + 1], &st->ev[pos],
                (st->n - pos) * sizeof(mem_event));
        st->ev[pos] = (mem_event){e->id, e->version, e->kind, p->data[i],
                                  e->len};
        st->n++;
        st->last = st->ev[st->n - 1].version;
        *p->id[i] = (mem_id){e->id, *agg, e->version};
        es__ptrmap_insert(&s->ids, p->id[i], es__mem_hash_id);
        p->data[i] = NULL;
        p->id[i] = NULL;
        s->event_count++;
        es__mem_order_push(s, st, e->version, commit, now);
    }
    for (size_t i = 0; i < nse; i++) {
        if (p->se[i] == NULL) continue;
        es__ptrmap_insert(&s->se_ids, p->se[i], es__mem_hash_se);
        s->se[s->n_se++] = p->se[i];
        p->se[i] = NULL;
    }
    if (p->cmd) {
        es__ptrmap_insert(&s->cmds, p->cmd, es__mem_hash_cmd);
        es__mem_cmd_log_push(s, p->cmd, es_clock_now_ms());
    }
    p->cmd = NULL;
    return 0;
}

/* The host's batch writer: every item under one hold of the lock, without
 * a transaction's pending copies.  An item that fails is left out with
 * the later items of its group (ES_ECONFLICT); the others are stored.
 * Readers take the same lock, so they see all of the batch or none.
 * Each item that stores events is a commit of its own in the global
 * order. */
size_t es__mem_write_batch(es_store *store, void **slot,
                           es__commit_item **items, size_t n)
{
    (void)slot; /* no connections */
    mem_store *s = (mem_store *)store;
    bool cmds = es__store_has_commands(store);
    int64_t now = es_clock_now_ms();
    size_t stored = 0;
    bool side_effects = false, events = false;
    item_plan *plans = es__calloc(n, sizeof *plans);
    if (plans == NULL) return 0; /* left pending: the generic way */
    for (size_t i = 0; i < n; i++)
        if (items[i]->status == ES__COMMIT_PENDING)
            item_alloc(items[i], cmds, now, &plans[i]);
    pthread_mutex_lock(&s->lock);
    int64_t at = es_clock_now_ms(); /* under the lock: in commit order */
    for (size_t i = 0; i < n; i++) {
        es__commit_item *it = items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        int rc = batch_item(s, it, cmds, &plans[i], at);
        it->status = rc;
        if (rc == 0) {
            stored++;
            side_effects = side_effects || it->n_side_effects > 0;
            events = events || it->n_events > 0;
            continue;
        }
        for (size_t j = i + 1; j < n; j++)
            if (items[j]->group == it->group &&
                items[j]->status == ES__COMMIT_PENDING)
                items[j]->status = ES_ECONFLICT;
    }
    pthread_mutex_unlock(&s->lock);
    for (size_t i = 0; i < n; i++) item_plan_free(items[i], &plans[i]);
    es__free(plans);
    if (side_effects) es__store_notify(store);
    if (events) es__store_notify_events(store);
    return stored > 0 ? 1 : 0;
}
