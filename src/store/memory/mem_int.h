/*
 * The in-memory store's private header: its structures and the helpers
 * its files share (src/store/memory/).  Never installed.
 *
 * The store keeps committed data behind one mutex, each transaction's
 * writes kept aside until commit.  Reads see the committed data plus the
 * transaction's own writes.  Inserts skip ids and versions taken in
 * either (PostgreSQL's ON CONFLICT DO NOTHING); a version or id taken by
 * another transaction that commits first is found at commit, which then
 * fails with ES_ECONFLICT and applies nothing.  Indexes are hash sets of
 * pointers (store/ptrmap.h); they were tsearch trees, a third of the host
 * benchmark in perf.
 *
 * Lock rule: mem_store.lock guards every committed structure; a
 * transaction's pending writes belong to its thread and need no lock.
 * User callbacks (stream) never run with the lock held.
 *
 * The files:
 *   index.c   hash and match functions of the indexes, the finders
 *   txn.c     begin, savepoints, rollback, commit (the commit plan)
 *   read.c    reads in a transaction: stream, event, snapshot, lists
 *   write.c   writes in a transaction: events, side effects, snapshots,
 *             command-id records
 *   outbox.c  the outbox: claim, finish, list, requeue, purge, stats
 *   batch.c   the host's batch writer (batch_ops.h's write)
 *   log.c     the global order of events and the checkpoints (the read
 *             side, store/read_ops.h)
 *   store.c   open, close, retention of command ids, the ops table
 */
#ifndef ES_STORE_MEMORY_MEM_INT_H
#define ES_STORE_MEMORY_MEM_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "store/batch_ops.h"
#include "store/ptrmap.h"
#include "store/read_ops.h"
#include "store/store_impl.h"

#define ES__MEM_TYPE_NAME_MAX 64

typedef struct mem_event {
    es_uuid id;
    uint64_t version;
    int32_t kind;
    uint8_t *data;
    size_t len;
} mem_event;

/* Allocated one by one and never moved or freed before the store closes:
 * other structures may keep pointers to a stream. */
typedef struct mem_stream {
    es_uuid agg;
    char type[ES__MEM_TYPE_NAME_MAX];
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
    char type[ES__MEM_TYPE_NAME_MAX];
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

/* One event in the global order (log.c): 32 bytes, no payload (the
 * event is found in its stream by version).  Its position is
 * {commit, index + 1}. */
typedef struct mem_order {
    mem_stream *st;
    uint64_t version;
    uint64_t commit;    /* the commit number of its transaction */
    int64_t created_ms; /* when it committed */
} mem_order;

/* A pending checkpoint write of a transaction (log.c). */
typedef struct mem_ckpt_op {
    es_checkpoint c; /* name and position; updated_ms set at commit */
    bool del;
} mem_ckpt_op;

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
    struct es__mem_cmd_entry {
        mem_cmd *cmd;
        int64_t at_ms;
    } *cmd_log;
    size_t log_head, log_n, log_cap;
    mem_se **se;     /* committed side effects, oldest first */
    size_t n_se, cap_se;
    size_t event_count;
    /* The global order (log.c): every committed event, in commit order;
     * appended under the lock by each commit that stores events. */
    mem_order *order;
    size_t n_order, cap_order;
    uint64_t last_commit; /* commit number of the newest such commit */
    /* The projections' checkpoints, sorted by name. */
    es_checkpoint *ckpt;
    size_t n_ckpt, cap_ckpt;
} mem_store;

/* Pending writes of a transaction. */
typedef struct pend_event {
    es_uuid agg;
    char type[ES__MEM_TYPE_NAME_MAX];
    mem_event ev;
} pend_event;

enum { ES__MEM_SNAP_PUT, ES__MEM_SNAP_DELETE };

typedef struct pend_snap {
    int op;
    es_uuid agg;
    mem_snap snap;
} pend_snap;

typedef struct mem_mark {
    size_t n_ev, n_snap, n_se, n_cmd, n_ckpt;
} mem_mark;

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
    mem_ckpt_op *ckpt; /* checkpoint writes, in the order made */
    size_t n_ckpt, cap_ckpt;
    mem_mark *marks;
    size_t n_marks, cap_marks;
} mem_txn;

/* ---- index keys: hash and match (index.c) ---- */

/* es_uuid_equal inlined: index lookups are the store's hot path. */
static inline bool es__mem_same_uuid(const es_uuid *a, const es_uuid *b)
{
    return memcmp(a->bytes, b->bytes, 16) == 0;
}

#define ES__MEM_KEYED(name)                                                \
    uint64_t es__mem_hash_##name(const void *item);                        \
    bool es__mem_match_##name(const void *item, const void *key);

ES__MEM_KEYED(stream)   /* mem_stream, by agg */
ES__MEM_KEYED(snapset)  /* mem_snapset, by agg */
ES__MEM_KEYED(se)       /* mem_se, by se.id */
ES__MEM_KEYED(cmd)      /* mem_cmd, by rec.command_id */
ES__MEM_KEYED(pend_agg) /* pend_event, by agg */
ES__MEM_KEYED(id)       /* mem_id, by (agg, id): key an es__mem_agg_key */
ES__MEM_KEYED(pend_id)  /* pend_event, the same */
ES__MEM_KEYED(uuid)     /* es_uuid, by itself */
ES__MEM_KEYED(pend_version) /* pend_event, by es__mem_version_key */

/* Event ids are unique per aggregate, as in the PostgreSQL store, whose
 * keys include the aggregate id so that the tables can be distributed by
 * it.  Their maps hash the id alone and match the pair.  Command ids stay
 * unique across aggregates. */
typedef struct es__mem_agg_key {
    const es_uuid *agg;
    const es_uuid *id;
} es__mem_agg_key;

typedef struct es__mem_version_key {
    const es_uuid *agg;
    uint64_t version;
} es__mem_version_key;

uint64_t es__mem_version_hash(const es_uuid *agg, uint64_t version);

/* ---- committed lookups (lock held; index.c) ---- */

mem_stream *es__mem_find_stream(mem_store *s, const es_uuid *agg);

/* Index of the first event with version >= v. */
static inline size_t es__mem_lower_bound(const mem_stream *st, uint64_t v)
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

static inline const mem_event *es__mem_find_version(const mem_stream *st,
                                                    uint64_t v)
{
    if (st == NULL) return NULL;
    size_t i = es__mem_lower_bound(st, v);
    return (i < st->n && st->ev[i].version == v) ? &st->ev[i] : NULL;
}

mem_id *es__mem_find_id(mem_store *s, const es_uuid *agg, const es_uuid *id);
mem_snapset *es__mem_find_snapset(mem_store *s, const es_uuid *agg);
bool es__mem_committed_se_exists(mem_store *s, const es_uuid *id);
mem_se *es__mem_find_se(mem_store *s, const es_uuid *id);
mem_cmd *es__mem_find_cmd(const es__ptrmap *map, const es_uuid *id);

/* Lock held.  Room for extra more records in the commit-order log of
 * command ids.  Returns 0 or ES_ENOMEM. */
int es__mem_cmd_log_reserve(mem_store *s, size_t extra);
/* Lock held, room reserved: a record committed now. */
void es__mem_cmd_log_push(mem_store *s, mem_cmd *c, int64_t now);

/* ---- pending lookups (transaction's thread; index.c) ---- */

pend_event *es__mem_pend_find_id(mem_txn *t, const es_uuid *agg,
                                 const es_uuid *id);
pend_event *es__mem_pend_find_version(mem_txn *t, const es_uuid *agg,
                                      uint64_t v);
/* The type of an aggregate that only this transaction has written. */
const char *es__mem_pend_stream_type(const mem_txn *t, const es_uuid *agg);
/* ES_EWRONGTYPE when type_name is given and the aggregate (stored, or
 * written by this transaction) is of another type.  Store lock held. */
int es__mem_check_type(const mem_txn *t, const mem_stream *st,
                       const es_uuid *agg, const char *type_name,
                       es_error *err);

/* ---- the backend's operations ---- */

/* txn.c */
int es__mem_begin(es_store *store, es_txn **out, es_error *err);
int es__mem_commit(es_txn *txn, es_error *err);
void es__mem_rollback(es_txn *txn);
int es__mem_savepoint(es_txn *txn, es_error *err);
int es__mem_rollback_to(es_txn *txn, es_error *err);
int es__mem_release(es_txn *txn, es_error *err);

/* read.c */
int es__mem_stream(es_txn *txn, const char *type_name, const es_uuid *agg,
                   uint64_t from, int (*fn)(void *ud, const es_event *event),
                   void *ud, es_error *err);
int es__mem_get_event(es_txn *txn, const es_uuid *agg,
                      const es_uuid *event_id, es_event **out,
                      es_error *err);
int es__mem_get_snapshot(es_txn *txn, const char *type_name,
                         const es_uuid *agg, uint64_t sv, es_snapshot **out,
                         es_error *err);
int es__mem_list_side_effects(es_txn *txn, const es_uuid *agg,
                              es_side_effect_list **out, es_error *err);
int es__mem_get_command(es_txn *txn, const es_uuid *command_id,
                        es__command_record **out, es_error *err);

/* write.c */
int es__mem_insert_events(es_txn *txn, const char *type_name,
                          const es_uuid *agg, const es_event *events,
                          size_t n, bool *inserted, es_error *err);
int es__mem_insert_side_effects(es_txn *txn, const char *type_name,
                                const es_side_effect *items, size_t n,
                                es_error *err);
int es__mem_insert_commands(es_txn *txn, const es__command_record *recs,
                            size_t n, bool *inserted, es_error *err);
int es__mem_store_snapshot(es_txn *txn, const es_snapshot *snap,
                           es_error *err);
int es__mem_delete_snapshots(es_txn *txn, const es_uuid *agg,
                             es_error *err);

/* outbox.c */
void es__mem_se_free(void *p);
int es__mem_outbox_claim(es_store *store, const char *owner, int64_t now,
                         int64_t lease_ms, uint32_t max_attempts,
                         const es__outbox_filter *filters, size_t nf,
                         size_t max, es_outbox_entry_list **out,
                         es_error *err);
int es__mem_outbox_finish(es_store *store, const es_uuid *id,
                          const char *owner, es_outbox_status status,
                          int64_t now, int64_t next_ms, const char *error,
                          es_error *err);
int es__mem_outbox_list(es_store *store, es_outbox_status status,
                        size_t limit, es_outbox_entry_list **out,
                        es_error *err);
int es__mem_outbox_get(es_store *store, const es_uuid *id,
                       es_outbox_entry **out, es_error *err);
int es__mem_outbox_requeue(es_store *store, const es_uuid *id,
                           const char *type_name, int32_t kind, int64_t now,
                           size_t *count, es_error *err);
int es__mem_outbox_purge(es_store *store, int64_t before_ms, size_t limit,
                         size_t *count, es_error *err);
int es__mem_outbox_stats(es_store *store, int64_t now, es_outbox_stats *out,
                         es_error *err);

/* batch.c */
size_t es__mem_write_batch(es_store *store, void **slot,
                           es__commit_item **items, size_t n);

/* log.c: the global order and the checkpoints (store/read_ops.h). */
extern const struct es__read_ops es__mem_read_ops;
/* Lock held.  Room for extra more events in the global order, and for
 * the checkpoints a transaction's pending writes may add.  Returns 0 or
 * ES_ENOMEM (nothing changed that anyone sees). */
int es__mem_order_reserve(mem_store *s, size_t extra);
int es__mem_ckpt_reserve(mem_store *s, const mem_txn *t);
/* Lock held, room reserved: the next commit number, for a commit that
 * stores events; then each of its events, in order. */
static inline uint64_t es__mem_order_commit(mem_store *s)
{
    return ++s->last_commit;
}
static inline void es__mem_order_push(mem_store *s, mem_stream *st,
                                      uint64_t version, uint64_t commit,
                                      int64_t now)
{
    s->order[s->n_order++] = (mem_order){st, version, commit, now};
}
/* Lock held, room reserved: apply a transaction's checkpoint writes
 * (cannot fail). */
void es__mem_ckpt_apply(mem_store *s, const mem_txn *t, int64_t now);

#endif
