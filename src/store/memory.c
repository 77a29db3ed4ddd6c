/*
 * The in-memory store: committed data behind one mutex, each transaction's
 * writes kept aside until commit.
 *
 * Reads see the committed data plus the transaction's own writes.  Inserts
 * skip ids and versions taken in either (PostgreSQL's ON CONFLICT DO
 * NOTHING); a version or id taken by another transaction that commits first
 * is found at commit, which then fails with ES_ECONFLICT and applies
 * nothing.  Indexes are hash sets of pointers (store/ptrmap.h); they were
 * tsearch trees, a third of the host benchmark in perf.
 *
 * Lock rule: `lock` guards every committed structure; a transaction's
 * pending writes belong to its thread and need no lock.  User callbacks
 * (stream) never run with the lock held.
 */
#include <pthread.h>
#include <search.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "eventastic/memory.h"
#include "store/ptrmap.h"
#include "store/store_impl.h"

#define TYPE_NAME_MAX 64
#define STREAM_CHUNK 256

typedef struct mem_event {
    es_uuid id;
    uint64_t version;
    int32_t kind;
    uint8_t *data;
    size_t len;
} mem_event;

typedef struct mem_stream {
    es_uuid agg;
    char type[TYPE_NAME_MAX];
    mem_event *ev; /* sorted by version */
    size_t n, cap;
    uint64_t last; /* ev[n - 1].version when n > 0: no miss on ev */
    size_t want; /* commit_prepare's count; 0 outside it */
} mem_stream;

typedef struct mem_id {
    es_uuid id;
    es_uuid agg;
    uint64_t version;
} mem_id;

typedef struct mem_snap {
    uint64_t snapshot_version;
    uint64_t version;
    uint8_t *data;
    size_t len;
} mem_snap;

typedef struct mem_snapset {
    es_uuid agg;
    mem_snap *s;
    size_t n, cap;
    size_t want; /* commit_prepare's count; 0 outside it */
} mem_snapset;

typedef struct mem_se {
    es_side_effect se; /* data owned */
    char type[TYPE_NAME_MAX];
    es_outbox_status status;
    uint32_t attempts;
    int64_t created_ms, next_ms, finished_ms, claimed_until;
    char owner[64]; /* "" when unclaimed */
    char last_error[256];
} mem_se;

/* A command-id record; payload owned. */
typedef struct mem_cmd {
    es__command_record rec;
} mem_cmd;

typedef struct mem_store {
    struct es_store base;
    pthread_mutex_t lock;
    es__ptrmap streams; /* mem_stream*, by agg */
    es__ptrmap ids;     /* mem_id*, by event id */
    es__ptrmap snaps;   /* mem_snapset*, by agg */
    es__ptrmap se_ids;  /* mem_se*, by side-effect id */
    es__ptrmap cmds;    /* mem_cmd*, by command id */
    /* the same records in commit order, oldest first, with their commit
     * time (retention): cmd_log[log_head .. log_head + log_n) */
    struct cmd_entry {
        mem_cmd *cmd;
        int64_t at_ms;
    } *cmd_log;
    size_t log_head, log_n, log_cap;
    mem_se **se;     /* committed side effects, oldest first */
    size_t n_se, cap_se;
    size_t event_count;
} mem_store;

/* Pending writes of a transaction. */
typedef struct pend_event {
    es_uuid agg;
    char type[TYPE_NAME_MAX];
    mem_event ev;
} pend_event;

enum { SNAP_PUT, SNAP_DELETE };

typedef struct pend_snap {
    int op;
    es_uuid agg;
    mem_snap snap;
} pend_snap;

typedef struct mark {
    size_t n_ev, n_snap, n_se, n_cmd;
} mark;

typedef struct mem_txn {
    struct es_txn base;
    pend_event **ev; /* individually allocated: the maps point at them */
    size_t n_ev, cap_ev;
    es__ptrmap ev_ids;      /* pend_event*, by event id */
    es__ptrmap ev_versions; /* pend_event*, by (agg, version) */
    es__ptrmap ev_aggs;     /* pend_event*, the first one of each agg */
    pend_snap *snap;
    size_t n_snap, cap_snap;
    mem_se *se;
    size_t n_se, cap_se;
    mem_cmd **cmd; /* individually allocated: cmd_ids points at them */
    size_t n_cmd, cap_cmd;
    es__ptrmap cmd_ids; /* mem_cmd*, by command id */
    es__ptrmap se_ids;  /* es_uuid* (own allocation), the ids in se */
    mark *marks;
    size_t n_marks, cap_marks;
} mem_txn;

/* ---- index keys: hash and match ---- */

/* es_uuid_equal inlined: index lookups are the store's hot path. */
static inline bool same_uuid(const es_uuid *a, const es_uuid *b)
{
    return memcmp(a->bytes, b->bytes, 16) == 0;
}

#define KEYED_BY(name, type, field)                                        \
    static uint64_t hash_##name(const void *item)                          \
    {                                                                      \
        return es__uuid_hash(&((const type *)item)->field);                \
    }                                                                      \
    static bool match_##name(const void *item, const void *key)            \
    {                                                                      \
        return same_uuid(&((const type *)item)->field, key);               \
    }

KEYED_BY(stream, mem_stream, agg)
KEYED_BY(snapset, mem_snapset, agg)
KEYED_BY(se, mem_se, se.id)
KEYED_BY(cmd, mem_cmd, rec.command_id)
KEYED_BY(pend_agg, pend_event, agg)

/* Event ids are unique per aggregate, as in the PostgreSQL store, whose
 * keys include the aggregate id so that the tables can be distributed by
 * it.  Their maps hash the id alone and match the pair.  Command ids stay
 * unique across aggregates. */
typedef struct agg_key {
    const es_uuid *agg;
    const es_uuid *id;
} agg_key;

static uint64_t hash_id(const void *item)
{
    return es__uuid_hash(&((const mem_id *)item)->id);
}
static bool match_id(const void *item, const void *key)
{
    const mem_id *m = item;
    const agg_key *k = key;
    return same_uuid(&m->id, k->id) && same_uuid(&m->agg, k->agg);
}
static uint64_t hash_pend_id(const void *item)
{
    return es__uuid_hash(&((const pend_event *)item)->ev.id);
}
static bool match_pend_id(const void *item, const void *key)
{
    const pend_event *pe = item;
    const agg_key *k = key;
    return same_uuid(&pe->ev.id, k->id) && same_uuid(&pe->agg, k->agg);
}

static uint64_t hash_uuid(const void *item) { return es__uuid_hash(item); }
static bool match_uuid(const void *item, const void *key)
{
    return same_uuid(item, key);
}

typedef struct version_key {
    const es_uuid *agg;
    uint64_t version;
} version_key;

static uint64_t version_hash(const es_uuid *agg, uint64_t version)
{
    return es__uuid_hash(agg) ^ (version * 0x9e3779b97f4a7c15u);
}

static uint64_t hash_pend_version(const void *item)
{
    const pend_event *pe = item;
    return version_hash(&pe->agg, pe->ev.version);
}

static bool match_pend_version(const void *item, const void *key)
{
    const pend_event *pe = item;
    const version_key *k = key;
    return pe->ev.version == k->version && same_uuid(&pe->agg, k->agg);
}

/* ---- committed lookups (lock held) ---- */

static mem_stream *find_stream(mem_store *s, const es_uuid *agg)
{
    return es__ptrmap_find(&s->streams, es__uuid_hash(agg), match_stream,
                           agg);
}

/* Index of the first event with version >= v. */
static size_t lower_bound(const mem_stream *st, uint64_t v)
{
    /* Streams grow at their end: past the last version, no search (the
     * binary search was a cache miss a step, 6% of the host bench). */
    if (st->n == 0 || st->last < v) return st->n;
    size_t lo = 0, hi = st->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (st->ev[mid].version < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static const mem_event *find_version(const mem_stream *st, uint64_t v)
{
    if (st == NULL) return NULL;
    size_t i = lower_bound(st, v);
    return (i < st->n && st->ev[i].version == v) ? &st->ev[i] : NULL;
}

static mem_id *find_id(mem_store *s, const es_uuid *agg, const es_uuid *id)
{
    agg_key key = {agg, id};
    return es__ptrmap_find(&s->ids, es__uuid_hash(id), match_id, &key);
}

static mem_snapset *find_snapset(mem_store *s, const es_uuid *agg)
{
    return es__ptrmap_find(&s->snaps, es__uuid_hash(agg), match_snapset,
                           agg);
}

static bool committed_se_exists(mem_store *s, const es_uuid *id)
{
    return es__ptrmap_find(&s->se_ids, es__uuid_hash(id), match_se, id) !=
           NULL;
}

static mem_cmd *find_cmd(const es__ptrmap *map, const es_uuid *id)
{
    return es__ptrmap_find(map, es__uuid_hash(id), match_cmd, id);
}

/* Lock held.  Room for extra more records in the commit-order log. */
static int cmd_log_reserve(mem_store *s, size_t extra)
{
    if (s->log_head + s->log_n + extra <= s->log_cap) return 0;
    if (s->log_head > 0) { /* purged ones left room at the front */
        memmove(s->cmd_log, s->cmd_log + s->log_head,
                s->log_n * sizeof *s->cmd_log);
        s->log_head = 0;
    }
    void *items = s->cmd_log;
    if (es__grow(&items, &s->log_cap, s->log_n + extra, sizeof *s->cmd_log))
        return ES_ENOMEM;
    s->cmd_log = items;
    return 0;
}

/* Lock held, room reserved: a record committed now. */
static void cmd_log_push(mem_store *s, mem_cmd *c, int64_t now)
{
    s->cmd_log[s->log_head + s->log_n++] = (struct cmd_entry){c, now};
}

/* ---- pending lookups (transaction's thread) ---- */

static pend_event *pend_find_id(mem_txn *t, const es_uuid *agg,
                                const es_uuid *id)
{
    agg_key key = {agg, id};
    return es__ptrmap_find(&t->ev_ids, es__uuid_hash(id), match_pend_id,
                           &key);
}

static pend_event *pend_find_version(mem_txn *t, const es_uuid *agg,
                                     uint64_t v)
{
    version_key key = {agg, v};
    return es__ptrmap_find(&t->ev_versions, version_hash(agg, v),
                           match_pend_version, &key);
}

/* ---- transactions ---- */

static const es_store_ops memory_ops;

static int mem_begin(es_store *store, es_txn **out, es_error *err)
{
    mem_txn *t = es__calloc(1, sizeof *t);
    if (t == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    t->base.store = store;
    es__store_txn_started(store);
    *out = &t->base;
    return 0;
}

static void noop_free(void *p) { (void)p; }

static void truncate_pending(mem_txn *t, const mark *m)
{
    while (t->n_ev > m->n_ev) {
        pend_event *pe = t->ev[--t->n_ev];
        es__ptrmap_remove(&t->ev_ids, pe, hash_pend_id);
        es__ptrmap_remove(&t->ev_versions, pe, hash_pend_version);
        /* the first of its aggregate: the later ones went before it */
        es__ptrmap_remove(&t->ev_aggs, pe, hash_pend_agg);
        es__free(pe->ev.data);
        es__free(pe);
    }
    while (t->n_snap > m->n_snap) es__free(t->snap[--t->n_snap].snap.data);
    while (t->n_se > m->n_se) {
        mem_se *x = &t->se[--t->n_se];
        es_uuid *key = es__ptrmap_find(&t->se_ids, es__uuid_hash(&x->se.id),
                                       match_uuid, &x->se.id);
        if (key != NULL) {
            es__ptrmap_remove(&t->se_ids, key, hash_uuid);
            es__free(key);
        }
        es__free((void *)x->se.data);
    }
    while (t->n_cmd > m->n_cmd) {
        mem_cmd *c = t->cmd[--t->n_cmd];
        if (c == NULL) continue; /* moved to the store at commit */
        es__ptrmap_remove(&t->cmd_ids, c, hash_cmd);
        es__free(c);
    }
}

static void txn_free(mem_txn *t)
{
    mark zero = {0, 0, 0, 0};
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
    es__free(t->marks);
    es_store *store = t->base.store;
    es__free(t);
    es__store_txn_ended(store);
}

static void mem_rollback(es_txn *txn) { txn_free((mem_txn *)txn); }

static int mem_savepoint(es_txn *txn, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    void *items = t->marks;
    if (es__grow(&items, &t->cap_marks, t->n_marks + 1, sizeof(mark)) != 0)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    t->marks = items;
    t->marks[t->n_marks++] = (mark){t->n_ev, t->n_snap, t->n_se, t->n_cmd};
    return 0;
}

static int mem_rollback_to(es_txn *txn, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    if (t->n_marks == 0)
        return es__error_set(err, ES_EMISUSE, "no savepoint");
    truncate_pending(t, &t->marks[--t->n_marks]);
    return 0;
}

static int mem_release(es_txn *txn, es_error *err)
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
        mem_stream *st = find_stream(s, &pe->agg);
        if (find_version(st, pe->ev.version) != NULL ||
            find_id(s, &pe->agg, &pe->ev.id)) {
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
        if (find_cmd(&s->cmds, &r->command_id) == NULL) continue;
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
        es__ptrmap_remove(&s->streams, p->created[i], hash_stream);
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
    mem_stream *st = find_stream(s, &pe->agg);
    if (st != NULL) return st;
    st = es__calloc(1, sizeof *st);
    if (st == NULL) return NULL;
    st->agg = pe->agg;
    memcpy(st->type, pe->type, sizeof st->type);
    if (es__ptrmap_insert(&s->streams, st, hash_stream) != 0) {
        es__free(st);
        return NULL;
    }
    p->created[p->n_created++] = st;
    return st;
}

static mem_snapset *snapset_for(mem_store *s, const es_uuid *agg)
{
    mem_snapset *set = find_snapset(s, agg);
    if (set != NULL) return set;
    set = es__calloc(1, sizeof *set); /* an empty set is "no snapshot" */
    if (set == NULL) return NULL;
    set->agg = *agg;
    if (es__ptrmap_insert(&s->snaps, set, hash_snapset) != 0) {
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
        if (t->snap[i].op == SNAP_PUT) p->set[i]->want++;
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
        if (committed_se_exists(s, &t->se[i].se.id)) continue;
        p->se[i] = es__malloc(sizeof(mem_se));
        if (p->se[i] == NULL) return ES_ENOMEM;
        fresh++;
    }
    void *items = s->se;
    if (es__grow(&items, &s->cap_se, s->n_se + fresh, sizeof(mem_se *)) != 0)
        return ES_ENOMEM;
    s->se = items;
    return 0;
}

static int commit_link(mem_store *s, mem_txn *t, commit_plan *p)
{
    size_t ids = 0, ses = 0, cmds = 0;
    for (; ids < t->n_ev; ids++) {
        const pend_event *pe = t->ev[ids];
        *p->id[ids] = (mem_id){pe->ev.id, pe->agg, pe->ev.version};
        if (es__ptrmap_insert(&s->ids, p->id[ids], hash_id) != 0) goto undo;
    }
    for (; ses < t->n_se; ses++) {
        if (p->se[ses] == NULL) continue;
        *p->se[ses] = t->se[ses]; /* data moves in commit_apply */
        if (es__ptrmap_insert(&s->se_ids, p->se[ses], hash_se) != 0)
            goto undo;
    }
    /* Command-id records: the transaction's records go into the store's
     * index as they are (validate_commit found none of their ids), and
     * into the commit-order log. */
    if (cmd_log_reserve(s, t->n_cmd) != 0) goto undo;
    for (; cmds < t->n_cmd; cmds++)
        if (es__ptrmap_insert(&s->cmds, t->cmd[cmds], hash_cmd) != 0)
            goto undo;
    int64_t now = es_clock_now_ms();
    for (size_t i = 0; i < t->n_cmd; i++) cmd_log_push(s, t->cmd[i], now);
    return 0;
undo:
    while (ids-- > 0) es__ptrmap_remove(&s->ids, p->id[ids], hash_id);
    while (ses-- > 0)
        if (p->se[ses]) es__ptrmap_remove(&s->se_ids, p->se[ses], hash_se);
    while (cmds-- > 0) es__ptrmap_remove(&s->cmds, t->cmd[cmds], hash_cmd);
    return ES_ENOMEM;
}

static void apply_snap(mem_snapset *set, pend_snap *ps)
{
    if (ps->op == SNAP_DELETE) {
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

static void commit_apply(mem_store *s, mem_txn *t, commit_plan *p)
{
    for (size_t i = 0; i < t->n_ev; i++) {
        mem_stream *st = p->stream[i];
        pend_event *pe = t->ev[i];
        size_t pos = lower_bound(st, pe->ev.version);
        memmove(&st->ev[pos + 1], &st->ev[pos],
                (st->n - pos) * sizeof(mem_event));
        st->ev[pos] = pe->ev;
        st->n++;
        st->last = st->ev[st->n - 1].version;
        pe->ev.data = NULL; /* moved */
        p->id[i] = NULL;    /* owned by the tree now */
        s->event_count++;
    }
    for (size_t i = 0; i < t->n_snap; i++) apply_snap(p->set[i], &t->snap[i]);
    for (size_t i = 0; i < t->n_se; i++) {
        if (p->se[i] == NULL) continue;
        s->se[s->n_se++] = p->se[i];
        t->se[i].se.data = NULL; /* moved */
        p->se[i] = NULL;
    }
    for (size_t i = 0; i < t->n_cmd; i++) { /* owned by s->cmds now */
        es__ptrmap_remove(&t->cmd_ids, t->cmd[i], hash_cmd);
        t->cmd[i] = NULL;
    }
    p->n_created = 0; /* they hold events now */
}

static int mem_commit(es_txn *txn, es_error *err)
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
            commit_apply(s, t, &plan);
        else
            rc = es__error_set(err, ES_ENOMEM, "out of memory in commit; "
                               "nothing was committed");
    }
    plan_free(s, &plan, t);
    pthread_mutex_unlock(&s->lock);
    bool notify = rc == 0 && t->n_se > 0;
    txn_free(t);
    if (notify) es__store_notify(&s->base);
    return rc;
}

/* ---- reads ---- */

/* The type of an aggregate that only this transaction has written. */
static const char *pend_stream_type(const mem_txn *t, const es_uuid *agg)
{
    const pend_event *pe = es__ptrmap_find(&t->ev_aggs, es__uuid_hash(agg),
                                           match_pend_agg, agg);
    return pe ? pe->type : NULL;
}

/* ES_EWRONGTYPE when type_name is given and the aggregate (stored, or
 * written by this transaction) is of another type.  Store lock held. */
static int check_type(const mem_txn *t, const mem_stream *st,
                      const es_uuid *agg, const char *type_name,
                      es_error *err)
{
    if (type_name == NULL) return 0;
    const char *owner = st ? st->type : pend_stream_type(t, agg);
    if (owner == NULL || strcmp(owner, type_name) == 0) return 0;
    return es__wrong_type(err, agg, owner, type_name);
}

typedef struct chunk {
    es_event ev[STREAM_CHUNK];
    size_t n;
} chunk;

static int cmp_pend_by_version(const void *a, const void *b)
{
    const pend_event *x = *(pend_event *const *)a, *y = *(pend_event *const *)b;
    return (x->ev.version > y->ev.version) - (x->ev.version < y->ev.version);
}

static int mem_stream_fn(es_txn *txn, const char *type_name,
                         const es_uuid *agg, uint64_t from,
                         int (*fn)(void *ud, const es_event *event), void *ud,
                         es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    pthread_mutex_lock(&s->lock);
    int wrong = check_type(t, find_stream(s, agg), agg, type_name, err);
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
        mem_stream *st = find_stream(s, agg);
        if (st != NULL) {
            for (size_t i = lower_bound(st, next);
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

static int mem_get_event(es_txn *txn, const es_uuid *agg,
                         const es_uuid *event_id, es_event **out,
                         es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    pend_event *pe = pend_find_id(t, agg, event_id);
    if (pe != NULL) {
        es_event ev = {pe->ev.id, pe->ev.version, pe->ev.kind, pe->ev.data,
                       pe->ev.len};
        *out = es__event_dup(&ev);
        return *out ? 0 : es__error_set(err, ES_ENOMEM, "out of memory");
    }
    int rc = ES_ENOTFOUND;
    pthread_mutex_lock(&s->lock);
    mem_id *idx = find_id(s, agg, event_id);
    if (idx != NULL) {
        const mem_event *e = find_version(find_stream(s, &idx->agg),
                                          idx->version);
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

static int mem_insert_events(es_txn *txn, const char *type_name,
                             const es_uuid *agg, const es_event *events,
                             size_t n, bool *inserted, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    if (strlen(type_name) >= TYPE_NAME_MAX)
        return es__error_set(err, ES_EINVAL, "type name too long");
    void *items = t->ev;
    if (es__grow(&items, &t->cap_ev, t->n_ev + n, sizeof(pend_event *)) != 0)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    t->ev = items;

    int rc = 0;
    pthread_mutex_lock(&s->lock);
    mem_stream *st = find_stream(s, agg);
    const char *owner_type = st ? st->type : pend_stream_type(t, agg);
    rc = check_type(t, st, agg, type_name, err);
    bool first = owner_type == NULL; /* the aggregate's first pending */
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const es_event *e = &events[i];
        inserted[i] = false;
        if (find_id(s, agg, &e->id) || find_version(st, e->version) ||
            pend_find_id(t, agg, &e->id) ||
            pend_find_version(t, agg, e->version))
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
        if (es__ptrmap_insert(&t->ev_ids, pe, hash_pend_id) != 0) {
            es__free(data);
            es__free(pe);
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
            break;
        }
        if (es__ptrmap_insert(&t->ev_versions, pe, hash_pend_version) != 0 ||
            (first && es__ptrmap_insert(&t->ev_aggs, pe, hash_pend_agg))) {
            es__ptrmap_remove(&t->ev_versions, pe, hash_pend_version);
            es__ptrmap_remove(&t->ev_ids, pe, hash_pend_id);
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

static int mem_insert_side_effects(es_txn *txn, const char *type_name,
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
                                    match_uuid, &items[i].id) != NULL;
        if (!seen) {
            pthread_mutex_lock(&s->lock);
            seen = committed_se_exists(s, &items[i].id);
            pthread_mutex_unlock(&s->lock);
        }
        if (seen) continue;
        es_uuid *key = es__memdup(&items[i].id, sizeof items[i].id);
        uint8_t *data = key ? es__memdup(items[i].data, items[i].len) : NULL;
        if (data == NULL ||
            es__ptrmap_insert(&t->se_ids, key, hash_uuid) != 0) {
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

static int mem_insert_commands(es_txn *txn, const es__command_record *recs,
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
        if (find_cmd(&t->cmd_ids, &recs[i].command_id) != NULL) continue;
        pthread_mutex_lock(&s->lock);
        bool seen = find_cmd(&s->cmds, &recs[i].command_id) != NULL;
        pthread_mutex_unlock(&s->lock);
        if (seen) continue;
        es__command_record *copy = es__command_record_dup(&recs[i]);
        if (copy == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
        /* mem_cmd is a wrapper of the record: same allocation */
        mem_cmd *c = (mem_cmd *)(void *)copy;
        if (es__ptrmap_insert(&t->cmd_ids, c, hash_cmd) != 0) {
            es__free(c);
            return es__error_set(err, ES_ENOMEM, "out of memory");
        }
        t->cmd[t->n_cmd++] = c;
        inserted[i] = true;
    }
    return 0;
}

static int mem_get_command(es_txn *txn, const es_uuid *command_id,
                           es__command_record **out, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    mem_cmd *c = find_cmd(&t->cmd_ids, command_id);
    if (c != NULL) {
        *out = es__command_record_dup(&c->rec);
        return *out ? 0 : es__error_set(err, ES_ENOMEM, "out of memory");
    }
    int rc = ES_ENOTFOUND;
    pthread_mutex_lock(&s->lock);
    c = find_cmd(&s->cmds, command_id);
    if (c != NULL) {
        *out = es__command_record_dup(&c->rec);
        rc = *out ? 0 : ES_ENOMEM;
    }
    pthread_mutex_unlock(&s->lock);
    if (rc == ES_ENOTFOUND) return es__error_set(err, rc, "command not found");
    if (rc != 0) return es__error_set(err, rc, "out of memory");
    return 0;
}

static int mem_purge_commands(es_store *store, int64_t before_ms,
                              size_t limit, size_t *count, es_error *err)
{
    (void)err;
    mem_store *s = (mem_store *)store;
    size_t n = 0;
    pthread_mutex_lock(&s->lock);
    while (n < limit && s->log_n > 0 &&
           s->cmd_log[s->log_head].at_ms < before_ms) {
        mem_cmd *c = s->cmd_log[s->log_head++].cmd;
        s->log_n--;
        es__ptrmap_remove(&s->cmds, c, hash_cmd);
        es__free(c);
        n++;
    }
    if (s->log_n == 0) s->log_head = 0;
    pthread_mutex_unlock(&s->lock);
    if (count) *count = n;
    return 0;
}

static int mem_get_snapshot(es_txn *txn, const char *type_name,
                            const es_uuid *agg, uint64_t sv,
                            es_snapshot **out, es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    mem_store *s = (mem_store *)txn->store;
    pthread_mutex_lock(&s->lock);
    int wrong = check_type(t, find_stream(s, agg), agg, type_name, err);
    pthread_mutex_unlock(&s->lock);
    if (wrong != 0) return wrong;
    /* Newest pending write for this aggregate wins. */
    for (size_t i = t->n_snap; i-- > 0;) {
        const pend_snap *ps = &t->snap[i];
        if (!es_uuid_equal(&ps->agg, agg)) continue;
        if (ps->op == SNAP_DELETE) break;
        if (ps->snap.snapshot_version != sv) continue;
        es_snapshot v = {*agg, ps->snap.version, sv, ps->snap.data,
                         ps->snap.len};
        *out = es__snapshot_dup(&v);
        return *out ? 0 : es__error_set(err, ES_ENOMEM, "out of memory");
    }
    for (size_t i = t->n_snap; i-- > 0;)
        if (t->snap[i].op == SNAP_DELETE && es_uuid_equal(&t->snap[i].agg, agg))
            return es__error_set(err, ES_ENOTFOUND, "no snapshot");
    int rc = ES_ENOTFOUND;
    pthread_mutex_lock(&s->lock);
    mem_snapset *set = find_snapset(s, agg);
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

static int push_snap(mem_txn *t, const pend_snap *ps, es_error *err)
{
    void *items = t->snap;
    if (es__grow(&items, &t->cap_snap, t->n_snap + 1, sizeof(pend_snap)) != 0)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    t->snap = items;
    t->snap[t->n_snap++] = *ps;
    return 0;
}

static int mem_store_snapshot(es_txn *txn, const es_snapshot *snap,
                              es_error *err)
{
    uint8_t *data = es__memdup(snap->data, snap->len);
    if (data == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    pend_snap ps = {SNAP_PUT, snap->aggregate_id,
                    {snap->snapshot_version, snap->version, data, snap->len}};
    int rc = push_snap((mem_txn *)txn, &ps, err);
    if (rc != 0) es__free(data);
    return rc;
}

static int mem_delete_snapshots(es_txn *txn, const es_uuid *agg, es_error *err)
{
    pend_snap ps = {SNAP_DELETE, *agg, {0, 0, NULL, 0}};
    return push_snap((mem_txn *)txn, &ps, err);
}

static int mem_list_side_effects(es_txn *txn, const es_uuid *agg,
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

static void free_stream(void *p)
{
    mem_stream *st = p;
    for (size_t i = 0; i < st->n; i++) es__free(st->ev[i].data);
    es__free(st->ev);
    es__free(st);
}

static void free_snapset(void *p)
{
    mem_snapset *set = p;
    for (size_t i = 0; i < set->n; i++) es__free(set->s[i].data);
    es__free(set->s);
    es__free(set);
}

static void free_se(void *p)
{
    mem_se *se = p;
    es__free((void *)se->se.data);
    es__free(se);
}

static void mem_close(es_store *store)
{
    mem_store *s = (mem_store *)store;
    es__ptrmap_clear(&s->streams, free_stream);
    es__ptrmap_clear(&s->ids, es__free);
    es__ptrmap_clear(&s->snaps, free_snapset);
    es__ptrmap_clear(&s->se_ids, free_se);
    es__ptrmap_clear(&s->cmds, es__free);
    es__free(s->cmd_log);
    es__free(s->se);
    pthread_mutex_destroy(&s->lock);
    es__store_destroy(&s->base);
    es__free(s);
}

/* ---- the outbox ---- */

static int cmp_uuid_ptr(const void *a, const void *b)
{
    return es_uuid_compare(a, b);
}

static mem_se *find_se(mem_store *s, const es_uuid *id)
{
    return es__ptrmap_find(&s->se_ids, es__uuid_hash(id), match_se, id);
}

static void entry_from(es_outbox_entry *e, const mem_se *m)
{
    memset(e, 0, sizeof *e);
    e->side_effect = m->se;
    memcpy(e->aggregate_type, m->type, sizeof e->aggregate_type);
    e->status = m->status;
    e->attempts = m->attempts;
    e->created_ms = m->created_ms;
    e->next_attempt_ms = m->next_ms;
    memcpy(e->last_error, m->last_error, sizeof e->last_error);
}

/* Append a copy of m (payload copied) to list. */
static int entry_push(es_outbox_entry_list *list, size_t *cap, const mem_se *m)
{
    void *items = list->items;
    if (es__grow(&items, cap, list->count + 1, sizeof(es_outbox_entry)))
        return ES_ENOMEM;
    list->items = items;
    uint8_t *data = es__memdup(m->se.data, m->se.len);
    if (data == NULL) return ES_ENOMEM;
    es_outbox_entry *e = &list->items[list->count++];
    entry_from(e, m);
    e->side_effect.data = data;
    return 0;
}

static void release_claim(mem_se *m)
{
    m->owner[0] = '\0';
    m->claimed_until = 0;
}

static int mem_outbox_claim(es_store *store, const char *owner, int64_t now,
                            int64_t lease_ms, uint32_t max_attempts,
                            const es__outbox_filter *filters, size_t nf,
                            size_t max, es_outbox_entry_list **out,
                            es_error *err)
{
    mem_store *s = (mem_store *)store;
    es_outbox_entry_list *list = es__calloc(1, sizeof *list);
    if (list == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    size_t cap = 0;
    int rc = 0;
    void *heads = NULL; /* aggregates whose first pending message is seen */
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->n_se && list->count < max; i++) {
        mem_se *m = s->se[i];
        if (m->status != ES_OUTBOX_PENDING) continue;
        if (!es__outbox_filter_match(filters, nf, m->type, m->se.kind))
            continue;
        if (tfind(&m->se.aggregate_id, &heads, cmp_uuid_ptr)) continue;
        if (tsearch(&m->se.aggregate_id, &heads, cmp_uuid_ptr) == NULL) {
            rc = ES_ENOMEM;
            break;
        }
        if (m->owner[0] != '\0' && m->claimed_until > now) continue;
        if (m->owner[0] != '\0' && m->attempts >= max_attempts) {
            /* Its dispatcher died (or stalled) on every attempt. */
            m->status = ES_OUTBOX_DEAD;
            snprintf(m->last_error, sizeof m->last_error,
                     "attempt %u abandoned: claim of '%.63s' expired",
                     m->attempts, m->owner);
            release_claim(m);
            tdelete(&m->se.aggregate_id, &heads, cmp_uuid_ptr);
            continue;
        }
        if (m->next_ms > now) continue;
        m->attempts++;
        snprintf(m->owner, sizeof m->owner, "%s", owner);
        m->claimed_until = now + lease_ms;
        if ((rc = entry_push(list, &cap, m)) != 0) {
            m->attempts--;
            release_claim(m);
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    tdestroy(heads, noop_free);
    if (rc != 0) {
        /* The claims already taken simply expire. */
        es_outbox_entry_list_free(list);
        return es__error_set(err, rc, "out of memory");
    }
    *out = list;
    return 0;
}

static int mem_outbox_finish(es_store *store, const es_uuid *id,
                             const char *owner, es_outbox_status status,
                             int64_t now, int64_t next_ms, const char *error,
                             es_error *err)
{
    mem_store *s = (mem_store *)store;
    int rc = 0;
    pthread_mutex_lock(&s->lock);
    mem_se *m = find_se(s, id);
    if (m == NULL)
        rc = ES_ENOTFOUND;
    else if (m->status != ES_OUTBOX_PENDING || strcmp(m->owner, owner) != 0)
        rc = ES_ECONFLICT;
    else {
        m->status = status;
        if (status == ES_OUTBOX_PENDING) m->next_ms = next_ms;
        if (status == ES_OUTBOX_DONE) m->finished_ms = now;
        if (error != NULL)
            snprintf(m->last_error, sizeof m->last_error, "%s", error);
        release_claim(m);
    }
    pthread_mutex_unlock(&s->lock);
    if (rc == ES_ENOTFOUND)
        return es__error_set(err, rc, "outbox message not found");
    if (rc == ES_ECONFLICT)
        return es__error_set(err, rc, "claim on the outbox message was lost "
                                      "(lease expired and taken by another)");
    return 0;
}

static int mem_outbox_list(es_store *store, es_outbox_status status,
                           size_t limit, es_outbox_entry_list **out,
                           es_error *err)
{
    mem_store *s = (mem_store *)store;
    es_outbox_entry_list *list = es__calloc(1, sizeof *list);
    if (list == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    size_t cap = 0;
    int rc = 0;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; rc == 0 && i < s->n_se && list->count < limit; i++)
        if (s->se[i]->status == status)
            rc = entry_push(list, &cap, s->se[i]);
    pthread_mutex_unlock(&s->lock);
    if (rc != 0) {
        es_outbox_entry_list_free(list);
        return es__error_set(err, rc, "out of memory");
    }
    *out = list;
    return 0;
}

static int mem_outbox_get(es_store *store, const es_uuid *id,
                          es_outbox_entry **out, es_error *err)
{
    mem_store *s = (mem_store *)store;
    int rc = ES_ENOTFOUND;
    pthread_mutex_lock(&s->lock);
    mem_se *m = find_se(s, id);
    if (m != NULL) {
        es_outbox_entry *e = es__malloc(sizeof *e + m->se.len);
        if (e == NULL) {
            rc = ES_ENOMEM;
        } else {
            entry_from(e, m);
            uint8_t *data = (uint8_t *)(e + 1);
            if (m->se.len > 0) memcpy(data, m->se.data, m->se.len);
            e->side_effect.data = data;
            *out = e;
            rc = 0;
        }
    }
    pthread_mutex_unlock(&s->lock);
    if (rc == ES_ENOTFOUND)
        return es__error_set(err, rc, "outbox message not found");
    if (rc != 0) return es__error_set(err, rc, "out of memory");
    return 0;
}

static void requeue_one(mem_se *m, int64_t now)
{
    m->status = ES_OUTBOX_PENDING;
    m->attempts = 0;
    m->next_ms = now;
    release_claim(m);
}

static int mem_outbox_requeue(es_store *store, const es_uuid *id,
                              const char *type_name, int32_t kind,
                              int64_t now, size_t *count, es_error *err)
{
    mem_store *s = (mem_store *)store;
    size_t n = 0;
    pthread_mutex_lock(&s->lock);
    if (id != NULL) {
        mem_se *m = find_se(s, id);
        if (m != NULL && m->status == ES_OUTBOX_DEAD) {
            requeue_one(m, now);
            n = 1;
        }
    } else {
        es__outbox_filter f = {type_name, kind};
        for (size_t i = 0; i < s->n_se; i++)
            if (s->se[i]->status == ES_OUTBOX_DEAD &&
                es__outbox_filter_match(&f, 1, s->se[i]->type,
                                        s->se[i]->se.kind)) {
                requeue_one(s->se[i], now);
                n++;
            }
    }
    pthread_mutex_unlock(&s->lock);
    if (count) *count = n;
    if (id != NULL && n == 0)
        return es__error_set(err, ES_ENOTFOUND, "no dead letter with that id");
    if (n > 0) es__store_notify(store);
    return 0;
}

static int mem_outbox_purge(es_store *store, int64_t before_ms, size_t limit,
                            size_t *count, es_error *err)
{
    (void)err;
    mem_store *s = (mem_store *)store;
    size_t kept = 0, n = 0;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->n_se; i++) {
        mem_se *m = s->se[i];
        if (n < limit && m->status == ES_OUTBOX_DONE &&
            m->finished_ms < before_ms) {
            es__ptrmap_remove(&s->se_ids, m, hash_se);
            free_se(m);
            n++;
        } else {
            s->se[kept++] = m;
        }
    }
    s->n_se = kept;
    pthread_mutex_unlock(&s->lock);
    if (count) *count = n;
    return 0;
}

static int mem_outbox_stats(es_store *store, int64_t now,
                            es_outbox_stats *out, es_error *err)
{
    (void)err;
    mem_store *s = (mem_store *)store;
    memset(out, 0, sizeof *out);
    int64_t oldest = INT64_MAX;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->n_se; i++) {
        const mem_se *m = s->se[i];
        switch (m->status) {
        case ES_OUTBOX_PENDING:
            out->pending++;
            if (m->created_ms < oldest) oldest = m->created_ms;
            break;
        case ES_OUTBOX_DONE:
            out->done++;
            break;
        case ES_OUTBOX_DEAD:
            out->dead++;
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    if (out->pending > 0 && now > oldest) out->oldest_pending_age_ms = now - oldest;
    return 0;
}

/* ---- the host's batches ---- */

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
        if (same_uuid(&it->side_effects[j].id, &it->side_effects[i].id))
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
 * ES_EWRONGTYPE (other type), ES_EINVAL (name too long) or ES_ENOMEM.  What was linked
 * belongs to the store; p keeps what was not (freed by the caller). */
static int batch_item(mem_store *s, es__commit_item *it, bool cmds,
                      item_plan *p)
{
    const es_uuid *agg = &it->aggregate_id;
    if (strlen(it->type_name) >= TYPE_NAME_MAX) return ES_EINVAL;
    mem_stream *st = find_stream(s, agg);
    if (st != NULL && strcmp(st->type, it->type_name) != 0)
        return ES_EWRONGTYPE;
    for (size_t i = 0; i < it->n_events; i++) {
        const es_event *e = &it->events[i];
        if (find_version(st, e->version) || find_id(s, agg, &e->id))
            return ES_ECONFLICT;
        for (size_t j = 0; j < i; j++)
            if (it->events[j].version == e->version ||
                same_uuid(&it->events[j].id, &e->id))
                return ES_ECONFLICT;
    }
    if (cmds && find_cmd(&s->cmds, &it->record.command_id) != NULL)
        return ES_EIDEMPOTENCY;
    if (p->rc != 0) return p->rc;

    size_t ne = it->n_events, nse = it->n_side_effects, fresh = 0;
    for (size_t i = 0; i < nse; i++) {
        if (p->se[i] == NULL) continue;
        if (committed_se_exists(s, &p->se[i]->se.id)) {
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
    ok = ok && es__ptrmap_reserve(&s->streams, 1, hash_stream) == 0 &&
         es__ptrmap_reserve(&s->ids, ne, hash_id) == 0 &&
         es__ptrmap_reserve(&s->se_ids, fresh, hash_se) == 0 &&
         es__ptrmap_reserve(&s->cmds, 1, hash_cmd) == 0 &&
         cmd_log_reserve(s, 1) == 0;
    if (!ok) {
        if (created) {
            es__free(created->ev);
            es__free(created);
        }
        return ES_ENOMEM;
    }

    /* Link: nothing below allocates (room was reserved above). */
    if (created) es__ptrmap_insert(&s->streams, created, hash_stream);
    for (size_t i = 0; i < ne; i++) {
        const es_event *e = &it->events[i];
        size_t pos = lower_bound(st, e->version);
        memmove(&st->ev[pos + 1], &st->ev[pos],
                (st->n - pos) * sizeof(mem_event));
        st->ev[pos] = (mem_event){e->id, e->version, e->kind, p->data[i],
                                  e->len};
        st->n++;
        st->last = st->ev[st->n - 1].version;
        *p->id[i] = (mem_id){e->id, *agg, e->version};
        es__ptrmap_insert(&s->ids, p->id[i], hash_id);
        p->data[i] = NULL;
        p->id[i] = NULL;
        s->event_count++;
    }
    for (size_t i = 0; i < nse; i++) {
        if (p->se[i] == NULL) continue;
        es__ptrmap_insert(&s->se_ids, p->se[i], hash_se);
        s->se[s->n_se++] = p->se[i];
        p->se[i] = NULL;
    }
    if (p->cmd) {
        es__ptrmap_insert(&s->cmds, p->cmd, hash_cmd);
        cmd_log_push(s, p->cmd, es_clock_now_ms());
    }
    p->cmd = NULL;
    return 0;
}

/* The host's batch writer: every item under one hold of the lock, without
 * a transaction's pending copies.  An item that fails is left out with
 * the later items of its group (ES_ECONFLICT); the others are stored.
 * Readers take the same lock, so they see all of the batch or none. */
static size_t mem_write_batch(es_store *store, void **slot,
                              es__commit_item **items, size_t n)
{
    (void)slot; /* no connections */
    mem_store *s = (mem_store *)store;
    bool cmds = es__store_has_commands(store);
    int64_t now = es_clock_now_ms();
    size_t stored = 0;
    bool side_effects = false;
    item_plan *plans = es__calloc(n, sizeof *plans);
    if (plans == NULL) return 0; /* left pending: the generic way */
    for (size_t i = 0; i < n; i++)
        if (items[i]->status == ES__COMMIT_PENDING)
            item_alloc(items[i], cmds, now, &plans[i]);
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < n; i++) {
        es__commit_item *it = items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        int rc = batch_item(s, it, cmds, &plans[i]);
        it->status = rc;
        if (rc == 0) {
            stored++;
            side_effects = side_effects || it->n_side_effects > 0;
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
    return stored > 0 ? 1 : 0;
}

static const es_store_ops memory_ops = {
    .name = "memory",
    .begin = mem_begin,
    .commit = mem_commit,
    .rollback = mem_rollback,
    .savepoint = mem_savepoint,
    .rollback_to = mem_rollback_to,
    .release = mem_release,
    .stream = mem_stream_fn,
    .get_event = mem_get_event,
    .insert_events = mem_insert_events,
    .insert_side_effects = mem_insert_side_effects,
    .get_snapshot = mem_get_snapshot,
    .store_snapshot = mem_store_snapshot,
    .delete_snapshots = mem_delete_snapshots,
    .list_side_effects = mem_list_side_effects,
    .insert_commands = mem_insert_commands,
    .get_command = mem_get_command,
    .write_batch = mem_write_batch,
    .batch_lanes = 1,
    .outbox_claim = mem_outbox_claim,
    .outbox_finish = mem_outbox_finish,
    .outbox_list = mem_outbox_list,
    .outbox_get = mem_outbox_get,
    .outbox_requeue = mem_outbox_requeue,
    .outbox_purge = mem_outbox_purge,
    .purge_commands = mem_purge_commands,
    .outbox_stats = mem_outbox_stats,
    .close = mem_close,
};

int es_memory_store_open(es_store **out, es_error *err)
{
    if (out == NULL) return es__error_set(err, ES_EINVAL, "out is NULL");
    mem_store *s = es__calloc(1, sizeof *s);
    if (s == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    es__store_init(&s->base, &memory_ops);
    pthread_mutex_init(&s->lock, NULL);
    *out = &s->base;
    return 0;
}

size_t es_memory_store_event_count(es_store *store)
{
    if (store == NULL || store->ops != &memory_ops) return 0;
    mem_store *s = (mem_store *)store;
    pthread_mutex_lock(&s->lock);
    size_t n = s->event_count;
    pthread_mutex_unlock(&s->lock);
    return n;
}
