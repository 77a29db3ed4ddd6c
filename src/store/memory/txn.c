/*
 * The memory store's transactions: begin, savepoints, rollback, and the
 * commit that checks a transaction's pending writes against what
 * committed meanwhile and applies them all or nothing.
 */
#include <string.h>

#include "core/internal.h"
#include "store/memory/mem_int.h"

int es__mem_begin(es_store *store, es_txn **out, es_error *err)
{
    mem_txn *t = es__calloc(1, sizeof *t);
    if (t == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    t->base.store = store;
    es__store_txn_started(store);
    *out = &t->base;
    return 0;
}

static void truncate_pending(mem_txn *t, const mem_mark *m)
{
    while (t->n_ev > m->n_ev) {
        pend_event *pe = t->ev[--t->n_ev];
        es__ptrmap_remove(&t->ev_ids, pe, es__mem_hash_pend_id);
        es__ptrmap_remove(&t->ev_versions, pe, es__mem_hash_pend_version);
        /* the first of its aggregate: the later ones went before it */
        es__ptrmap_remove(&t->ev_aggs, pe, es__mem_hash_pend_agg);
        es__free(pe->ev.data);
        es__free(pe);
    }
    while (t->n_snap > m->n_snap) es__free(t->snap[--t->n_snap].snap.data);
    while (t->n_se > m->n_se) {
        mem_se *x = &t->se[--t->n_se];
        es_uuid *key = es__ptrmap_find(&t->se_ids, es__uuid_hash(&x->se.id),
                                       es__mem_match_uuid, &x->se.id);
        if (key != NULL) {
            es__ptrmap_remove(&t->se_ids, key, es__mem_hash_uuid);
            es__free(key);
        }
        es__free((void *)x->se.data);
    }
    while (t->n_cmd > m->n_cmd) {
        mem_cmd *c = t->cmd[--t->n_cmd];
        if (c == NULL) continue; /* moved to the store at commit */
        es__ptrmap_remove(&t->cmd_ids, c, es__mem_hash_cmd);
        es__free(c);
    }
    if (t->n_ckpt > m->n_ckpt) t->n_ckpt = m->n_ckpt; /* nothing owned */
}

static void txn_free(mem_txn *t)
{
    mem_mark zero = {0, 0, 0, 0, 0};
    truncate_pending(t, &zero);
    es__ptrmap_clear(&t->ev_ids, NULL);
    es__ptrmap_clear(&t->ev_versions, NULL);
    es__ptrmap_clear(&t->ev_aggs, NULL);
    es__ptrmap_clear(&t->cmd_ids, NULL);
    es__free(t->cmd);
    es__ptrmap_clear(&t->se_ids, NULL); /* empty: truncate_pending freed all */
    es__free(t->ev);
    es__free(t->snap);
    es__free(t->se);
    es__free(t->ckpt);
    es__free(t->marks);
    es_store *store = t->base.store;
    es__free(t);
    es__store_txn_ended(store);
}

void es__mem_rollback(es_txn *txn) { txn_free((mem_txn *)txn); }

int es__mem_savepoint(es_txn *txn, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    void *items = t->marks;
    if (es__grow(&items, &t->cap_marks, t->n_marks + 1, sizeof(mem_mark)) != 0)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    t->marks = items;
    t->marks[t->n_marks++] =
        (mem_mark){t->n_ev, t->n_snap, t->n_se, t->n_cmd, t->n_ckpt};
    return 0;
}

int es__mem_rollback_to(es_txn *txn, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    if (t->n_marks == 0)
        return es__error_set(err, ES_EMISUSE, "no savepoint");
    truncate_pending(t, &t->marks[--t->n_marks]);
    return 0;
}

int es__mem_release(es_txn *txn, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    if (t->n_marks == 0)
        return es__error_set(err, ES_EMISUSE, "no savepoint");
    t->n_marks--;
    return 0;
}

/* Check the pending events against what committed meanwhile. */
static int validate_commit(mem_store *s, mem_txn *t, es_error *err)
{
    for (size_t i = 0; i < t->n_ev; i++) {
        const pend_event *pe = t->ev[i];
        mem_stream *st = es__mem_find_stream(s, &pe->agg);
        if (es__mem_find_version(st, pe->ev.version) != NULL ||
            es__mem_find_id(s, &pe->agg, &pe->ev.id)) {
            int rc = es__error_set(err, ES_ECONFLICT,
                                   "version %llu or event id of the aggregate "
                                   "was taken by a concurrent transaction",
                                   (unsigned long long)pe->ev.version);
            if (err) {
                err->aggregate_id = pe->agg;
                err->event_id = pe->ev.id;
                err->version = pe->ev.version;
            }
            return rc;
        }
        if (st != NULL && strcmp(st->type, pe->type) != 0)
            return es__error_set(err, ES_EINVAL,
                                 "aggregate is of type '%s', not '%s'",
                                 st->type, pe->type);
    }
    for (size_t i = 0; i < t->n_cmd; i++) {
        const es__command_record *r = &t->cmd[i]->rec;
        if (es__mem_find_cmd(&s->cmds, &r->command_id) == NULL) continue;
        int rc = es__error_set(err, ES_ECONFLICT,
                               "command id was taken by a concurrent "
                               "transaction");
        if (err) err->aggregate_id = r->aggregate_id;
        return rc;
    }
    return 0;
}

/*
 * Commit in three phases, so that running out of memory leaves nothing of
 * the transaction behind:
 *   1. prepare: create missing streams and snapshot sets, reserve room in
 *      every array, allocate the index nodes.  Nothing is visible yet
 *      (streams created here are empty and removed again on failure).
 *   2. link: put the index nodes into the maps; an insert may fail, and
 *      what was linked is then taken out again (removal never allocates).
 *   3. apply: move events, snapshots and side effects into the reserved
 *      room.  This cannot fail.
 */
typedef struct commit_plan {
    mem_stream **stream;  /* per pending event */
    mem_id **id;          /* per pending event */
    mem_snapset **set;    /* per pending snapshot op */
    mem_se **se;          /* per pending side effect; NULL: exists */
    mem_stream **created; /* streams made by this commit */
    size_t n_created;
} commit_plan;

static void plan_free(mem_store *s, commit_plan *p, const mem_txn *t)
{
    for (size_t i = 0; p->stream && i < t->n_ev; i++)
        if (p->stream[i]) p->stream[i]->want = 0;
    for (size_t i = 0; p->set && i < t->n_snap; i++)
        if (p->set[i]) p->set[i]->want = 0;
    for (size_t i = 0; p->id && i < t->n_ev; i++) es__free(p->id[i]);
    for (size_t i = 0; p->se && i < t->n_se; i++) es__free(p->se[i]);
    for (size_t i = 0; i < p->n_created; i++) { /* still empty */
        es__ptrmap_remove(&s->streams, p->created[i], es__mem_hash_stream);
        es__free(p->created[i]->ev);
        es__free(p->created[i]);
    }
    es__free(p->stream);
    es__free(p->id);
    es__free(p->set);
    es__free(p->se);
    es__free(p->created);
    memset(p, 0, sizeof *p);
}

static mem_stream *stream_for(mem_store *s, commit_plan *p,
                              const pend_event *pe)
{
    mem_stream *st = es__mem_find_stream(s, &pe->agg);
    if (st != NULL) return st;
    st = es__calloc(1, sizeof *st);
    if (st == NULL) return NULL;
    st->agg = pe->agg;
    memcpy(st->type, pe->type, sizeof st->type);
    if (es__ptrmap_insert(&s->streams, st, es__mem_hash_stream) != 0) {
        es__free(st);
        return NULL;
    }
    p->created[p->n_created++] = st;
    return st;
}

static mem_snapset *snapset_for(mem_store *s, const es_uuid *agg)
{
    mem_snapset *set = es__mem_find_snapset(s, agg);
    if (set != NULL) return set;
    set = es__calloc(1, sizeof *set); /* an empty set is "no snapshot" */
    if (set == NULL) return NULL;
    set->agg = *agg;
    if (es__ptrmap_insert(&s->snaps, set, es__mem_hash_snapset) != 0) {
        es__free(set);
        return NULL;
    }
    return set;
}

static int commit_prepare(mem_store *s, mem_txn *t, commit_plan *p)
{
    size_t ne = t->n_ev ? t->n_ev : 1, ns = t->n_snap ? t->n_snap : 1;
    size_t nse = t->n_se ? t->n_se : 1;
    p->stream = es__calloc(ne, sizeof *p->stream);
    p->id = es__calloc(ne, sizeof *p->id);
    p->created = es__calloc(ne, sizeof *p->created);
    p->set = es__calloc(ns, sizeof *p->set);
    p->se = es__calloc(nse, sizeof *p->se);
    if (!p->stream || !p->id || !p->created || !p->set || !p->se)
        return ES_ENOMEM;

    /* Events: a stream each, room for all of them, an id node each.  The
     * per-stream count goes through `want`, zero again afterwards. */
    for (size_t i = 0; i < t->n_ev; i++) {
        p->stream[i] = stream_for(s, p, t->ev[i]);
        if (p->stream[i] == NULL) return ES_ENOMEM;
        p->stream[i]->want++;
        p->id[i] = es__malloc(sizeof(mem_id));
        if (p->id[i] == NULL) return ES_ENOMEM;
    }
    int rc = 0;
    for (size_t i = 0; i < t->n_ev; i++) {
        mem_stream *st = p->stream[i];
        if (st->want == 0) continue;
        void *items = st->ev;
        if (rc == 0 && es__grow(&items, &st->cap, st->n + st->want,
                                sizeof(mem_event)) != 0)
            rc = ES_ENOMEM;
        st->ev = items;
        st->want = 0;
    }
    if (rc != 0) return rc;

    /* Snapshots: a set each, room for every put. */
    for (size_t i = 0; i < t->n_snap; i++) {
        p->set[i] = snapset_for(s, &t->snap[i].agg);
        if (p->set[i] == NULL) return ES_ENOMEM;
        if (t->snap[i].op == ES__MEM_SNAP_PUT) p->set[i]->want++;
    }
    for (size_t i = 0; i < t->n_snap; i++) {
        mem_snapset *set = p->set[i];
        if (set->want == 0) continue;
        void *items = set->s;
        if (rc == 0 && es__grow(&items, &set->cap, set->n + set->want,
                                sizeof(mem_snap)) != 0)
            rc = ES_ENOMEM;
        set->s = items;
        set->want = 0;
    }
    if (rc != 0) return rc;

    /* Side effects: a node for each one not yet stored, room in the
     * list. */
    size_t fresh = 0;
    for (size_t i = 0; i < t->n_se; i++) {
        if (es__mem_committed_se_exists(s, &t->se[i].se.id)) continue;
        p->se[i] = es__malloc(sizeof(mem_se));
        if (p->se[i] == NULL) return ES_ENOMEM;
        fresh++;
    }
    void *items = s->se;
    if (es__grow(&items, &s->cap_se, s->n_se + fresh, sizeof(mem_se *)) != 0)
        return ES_ENOMEM;
    s->se = items;

    /* The global order and the checkpoints (log.c). */
    if (es__mem_order_reserve(s, t->n_ev) != 0) return ES_ENOMEM;
    return es__mem_ckpt_reserve(s, t);
}

static int commit_link(mem_store *s, mem_txn *t, commit_plan *p)
{
    size_t ids = 0, ses = 0, cmds = 0;
    for (; ids < t->n_ev; ids++) {
        const pend_event *pe = t->ev[ids];
        *p->id[ids] = (mem_id){pe->ev.id, pe->agg, pe->ev.version};
        if (es__ptrmap_insert(&s->ids, p->id[ids], es__mem_hash_id) != 0)
            goto undo;
    }
    for (; ses < t->n_se; ses++) {
        if (p->se[ses] == NULL) continue;
        *p->se[ses] = t->se[ses]; /* data moves in commit_apply */
        if (es__ptrmap_insert(&s->se_ids, p->se[ses], es__mem_hash_se) != 0)
            goto undo;
    }
    /* Command-id records: the transaction's records go into the store's
     * index as they are (validate_commit found none of their ids), and
     * into the commit-order log. */
    if (es__mem_cmd_log_reserve(s, t->n_cmd) != 0) goto undo;
    for (; cmds < t->n_cmd; cmds++)
        if (es__ptrmap_insert(&s->cmds, t->cmd[cmds], es__mem_hash_cmd) != 0)
            goto undo;
    int64_t now = es_clock_now_ms();
    for (size_t i = 0; i < t->n_cmd; i++)
        es__mem_cmd_log_push(s, t->cmd[i], now);
    return 0;
undo:
    while (ids-- > 0) es__ptrmap_remove(&s->ids, p->id[ids], es__mem_hash_id);
    while (ses-- > 0)
        if (p->se[ses])
            es__ptrmap_remove(&s->se_ids, p->se[ses], es__mem_hash_se);
    while (cmds-- > 0)
        es__ptrmap_remove(&s->cmds, t->cmd[cmds], es__mem_hash_cmd);
    return ES_ENOMEM;
}

static void apply_snap(mem_snapset *set, pend_snap *ps)
{
    if (ps->op == ES__MEM_SNAP_DELETE) {
        for (size_t i = 0; i < set->n; i++) es__free(set->s[i].data);
        set->n = 0;
        return;
    }
    for (size_t i = 0; i < set->n; i++) {
        if (set->s[i].snapshot_version != ps->snap.snapshot_version) continue;
        if (set->s[i].version > ps->snap.version) return; /* never back */
        es__free(set->s[i].data);
        set->s[i] = ps->snap;
        ps->snap.data = NULL;
        return;
    }
    set->s[set->n++] = ps->snap; /* room reserved */
    ps->snap.data = NULL;
}

static void commit_apply(mem_store *s, mem_txn *t, commit_plan *p,
                         int64_t now)
{
    uint64_t commit = t->n_ev > 0 ? es__mem_order_commit(s) : 0;
    for (size_t i = 0; i < t->n_ev; i++) {
        mem_stream *st = p->stream[i];
        pend_event *pe = t->ev[i];
        size_t pos = es__mem_lower_bound(st, pe->ev.version);
        memmove(&st->ev[pos + 1], &st->ev[pos],
                (st->n - pos) * sizeof(mem_event));
        st->ev[pos] = pe->ev;
        st->n++;
        st->last = st->ev[st->n - 1].version;
        pe->ev.data = NULL; /* moved */
        p->id[i] = NULL;    /* owned by the tree now */
        s->event_count++;
        es__mem_order_push(s, st, pe->ev.version, commit, now);
    }
    for (size_t i = 0; i < t->n_snap; i++) apply_snap(p->set[i], &t->snap[i]);
    for (size_t i = 0; i < t->n_se; i++) {
        if (p->se[i] == NULL) continue;
        s->se[s->n_se++] = p->se[i];
        t->se[i].se.data = NULL; /* moved */
        p->se[i] = NULL;
    }
    for (size_t i = 0; i < t->n_cmd; i++) { /* owned by s->cmds now */
        es__ptrmap_remove(&t->cmd_ids, t->cmd[i], es__mem_hash_cmd);
        t->cmd[i] = NULL;
    }
    es__mem_ckpt_apply(s, t, now);
    p->n_created = 0; /* they hold events now */
}

int es__mem_commit(es_txn *txn, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    commit_plan plan;
    memset(&plan, 0, sizeof plan);
    pthread_mutex_lock(&s->lock);
    int rc = validate_commit(s, t, err);
    int64_t now = es_clock_now_ms();
    for (size_t i = 0; i < t->n_se; i++) t->se[i].created_ms = now;
    if (rc == 0) {
        rc = commit_prepare(s, t, &plan);
        if (rc == 0) rc = commit_link(s, t, &plan);
        if (rc == 0)
            commit_apply(s, t, &plan, now);
        else
            rc = es__error_set(err, ES_ENOMEM, "out of memory in commit; "
                               "nothing was committed");
    }
    plan_free(s, &plan, t);
    pthread_mutex_unlock(&s->lock);
    bool notify = rc == 0 && t->n_se > 0;
    bool events = rc == 0 && t->n_ev > 0;
    txn_free(t);
    if (notify) es__store_notify(&s->base);
    if (events) es__store_notify_events(&s->base);
    return rc;
}
