/*
 * The memory store's read side (store/read_ops.h): the global order of
 * its events and the checkpoints of projections.
 *
 * The order is a log the commits append to under the store's lock (txn.c
 * and batch.c), 32 bytes an event: its stream, version, commit number and
 * commit time; the payload stays in the stream.  An event at log index i
 * of commit number c has the position {c, i + 1}.  Commits hold the lock,
 * so the log is in commit order and both fields grow along it: an event
 * is readable as soon as its commit returns, and nothing rolled back ever
 * takes a place in it.  Streams are allocated one by one and live until
 * the store closes, so a log entry's stream pointer stays valid, and a
 * stream's id and type never change after it is created.
 *
 * Readers copy a bounded chunk of events out under the lock and call the
 * user's function after releasing it: the function may call into the
 * store.
 *
 * Checkpoints are a sorted array of es_checkpoint in the store.  Writes
 * are kept in the transaction (mem_txn.ckpt, in the order made, cut back
 * by a rollback to a savepoint) and applied by its commit.
 */
#include <string.h>

#include "core/internal.h"
#include "store/memory/mem_int.h"

/* Events copied out per hold of the lock. */
#define READ_CHUNK 256

static int pos_cmp(uint64_t commit, uint64_t seq, const es_position *p)
{
    if (commit != p->commit) return commit < p->commit ? -1 : 1;
    if (seq != p->seq) return seq < p->seq ? -1 : 1;
    return 0;
}

/* Lock held.  Index of the first event after *after: a binary search, as
 * both fields of the positions grow along the log (any *after works, not
 * only positions this store gave). */
static size_t order_after(const mem_store *s, const es_position *after)
{
    size_t lo = 0, hi = s->n_order;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (pos_cmp(s->order[mid].commit, mid + 1, after) <= 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

int es__mem_order_reserve(mem_store *s, size_t extra)
{
    if (extra == 0) return 0;
    void *items = s->order;
    if (es__grow(&items, &s->cap_order, s->n_order + extra,
                 sizeof(mem_order)) != 0)
        return ES_ENOMEM;
    s->order = items;
    return 0;
}

/* ---- reads ---- */

/* Events copied out of the lock: views whose payloads point into bytes. */
typedef struct read_chunk {
    es_recorded_event ev[READ_CHUNK];
    size_t n;
    uint8_t *bytes;
    size_t cap_bytes;
} read_chunk;

/* Lock held.  Copy up to want events from log index i into c.  Returns
 * 0 or ES_ENOMEM (c->n 0). */
static int chunk_fill(const mem_store *s, size_t i, size_t want,
                      read_chunk *c)
{
    c->n = 0;
    size_t n = s->n_order - i < want ? s->n_order - i : want;
    const mem_event *ev[READ_CHUNK];
    size_t total = 0;
    for (size_t k = 0; k < n; k++) {
        const mem_order *o = &s->order[i + k];
        /* there: a stream keeps every event it was given */
        ev[k] = &o->st->ev[es__mem_lower_bound(o->st, o->version)];
        total += ev[k]->len;
    }
    if (total > c->cap_bytes) {
        uint8_t *b = es__realloc(c->bytes, total);
        if (b == NULL) return ES_ENOMEM;
        c->bytes = b;
        c->cap_bytes = total;
    }
    size_t off = 0;
    for (size_t k = 0; k < n; k++) {
        const mem_order *o = &s->order[i + k];
        const mem_event *e = ev[k];
        uint8_t *data = c->bytes ? c->bytes + off : NULL;
        if (e->len > 0) memcpy(data, e->data, e->len);
        off += e->len;
        c->ev[k] = (es_recorded_event){
            .position = {o->commit, i + k + 1},
            .type_name = o->st->type,
            .aggregate_id = o->st->agg,
            .event = {e->id, e->version, e->kind, data, e->len},
            .created_ms = o->created_ms,
            .forgotten = false,
        };
    }
    c->n = n;
    return 0;
}

static int mem_read_all(es_store *store, const es_position *after,
                        size_t max, es_read_fn fn, void *ud, size_t *count,
                        es_position *last, es_error *err)
{
    mem_store *s = (mem_store *)store;
    es_position at = *after; /* after and last may be one object */
    size_t n = 0;
    int rc = 0;
    read_chunk *c = es__calloc(1, sizeof *c);
    if (c == NULL) rc = es__error_set(err, ES_ENOMEM, "out of memory");
    while (rc == 0 && n < max) {
        size_t want = max - n < READ_CHUNK ? max - n : READ_CHUNK;
        pthread_mutex_lock(&s->lock);
        int fill = chunk_fill(s, order_after(s, &at), want, c);
        pthread_mutex_unlock(&s->lock);
        if (fill != 0) {
            rc = es__error_set(err, fill, "out of memory");
            break;
        }
        for (size_t k = 0; k < c->n; k++) {
            rc = fn(ud, &c->ev[k]);
            if (rc != 0) break;
            n++;
            at = c->ev[k].position;
        }
        if (c->n < want) break; /* at the head */
    }
    if (c != NULL) es__free(c->bytes);
    es__free(c);
    *count = n;
    *last = at;
    return rc;
}

static int mem_head(es_store *store, es_position *out, es_error *err)
{
    (void)err;
    mem_store *s = (mem_store *)store;
    pthread_mutex_lock(&s->lock);
    if (s->n_order > 0)
        *out = (es_position){s->order[s->n_order - 1].commit, s->n_order};
    else
        *out = (es_position){0, 0};
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int mem_lag(es_store *store, const es_position *after, uint64_t cap,
                   uint64_t *events, int64_t *oldest_ms, es_error *err)
{
    (void)err;
    mem_store *s = (mem_store *)store;
    pthread_mutex_lock(&s->lock);
    size_t i = order_after(s, after);
    uint64_t behind = s->n_order - i;
    *events = behind < cap ? behind : cap;
    *oldest_ms = i < s->n_order ? s->order[i].created_ms : 0;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

/* ---- checkpoints ---- */

/* Lock held.  Index of name in the sorted array, or where it would go
 * (*found says which). */
static size_t ckpt_find(const mem_store *s, const char *name, bool *found)
{
    size_t lo = 0, hi = s->n_ckpt;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(s->ckpt[mid].name, name);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = false;
    return lo;
}

int es__mem_ckpt_reserve(mem_store *s, const mem_txn *t)
{
    size_t puts = 0;
    for (size_t i = 0; i < t->n_ckpt; i++) puts += !t->ckpt[i].del;
    if (puts == 0) return 0;
    void *items = s->ckpt;
    if (es__grow(&items, &s->cap_ckpt, s->n_ckpt + puts,
                 sizeof(es_checkpoint)) != 0)
        return ES_ENOMEM;
    s->ckpt = items;
    return 0;
}

void es__mem_ckpt_apply(mem_store *s, const mem_txn *t, int64_t now)
{
    for (size_t k = 0; k < t->n_ckpt; k++) {
        const mem_ckpt_op *op = &t->ckpt[k];
        bool found;
        size_t i = ckpt_find(s, op->c.name, &found);
        if (op->del) {
            if (!found) continue;
            memmove(&s->ckpt[i], &s->ckpt[i + 1],
                    (s->n_ckpt - i - 1) * sizeof *s->ckpt);
            s->n_ckpt--;
            continue;
        }
        if (!found) { /* room reserved */
            memmove(&s->ckpt[i + 1], &s->ckpt[i],
                    (s->n_ckpt - i) * sizeof *s->ckpt);
            s->n_ckpt++;
        }
        s->ckpt[i] = op->c;
        s->ckpt[i].updated_ms = now;
    }
}

/* The newest pending write of name in t, or NULL. */
static const mem_ckpt_op *ckpt_pending(const mem_txn *t, const char *name)
{
    for (size_t i = t->n_ckpt; i-- > 0;)
        if (strcmp(t->ckpt[i].c.name, name) == 0) return &t->ckpt[i];
    return NULL;
}

static int ckpt_push(mem_txn *t, const char *name, const es_position *pos,
                     bool del, es_error *err)
{
    void *items = t->ckpt;
    if (es__grow(&items, &t->cap_ckpt, t->n_ckpt + 1, sizeof(mem_ckpt_op)))
        return es__error_set(err, ES_ENOMEM, "out of memory");
    t->ckpt = items;
    mem_ckpt_op *op = &t->ckpt[t->n_ckpt++];
    memset(op, 0, sizeof *op);
    memcpy(op->c.name, name, strlen(name) + 1); /* checked: fits */
    if (pos != NULL) op->c.position = *pos;
    op->del = del;
    return 0;
}

static int mem_checkpoint_get(es_store *store, const char *name,
                              es_position *out, bool *found, es_error *err)
{
    (void)err;
    mem_store *s = (mem_store *)store;
    pthread_mutex_lock(&s->lock);
    size_t i = ckpt_find(s, name, found);
    *out = *found ? s->ckpt[i].position : (es_position){0, 0};
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int mem_checkpoint_put(es_txn *txn, const char *name,
                              const es_position *pos, es_error *err)
{
    return ckpt_push((mem_txn *)txn, name, pos, false, err);
}

static int mem_checkpoint_delete(es_txn *txn, const char *name, bool *found,
                                 es_error *err)
{
    mem_txn *t = (mem_txn *)txn;
    const mem_ckpt_op *op = ckpt_pending(t, name);
    if (op != NULL) {
        *found = !op->del;
    } else {
        mem_store *s = (mem_store *)txn->store;
        pthread_mutex_lock(&s->lock);
        ckpt_find(s, name, found);
        pthread_mutex_unlock(&s->lock);
    }
    if (!*found) return 0;
    return ckpt_push(t, name, NULL, true, err);
}

static int mem_checkpoint_list(es_store *store, es_checkpoint **out,
                               size_t *n, es_error *err)
{
    mem_store *s = (mem_store *)store;
    int rc = 0;
    *out = NULL;
    *n = 0;
    pthread_mutex_lock(&s->lock);
    if (s->n_ckpt > 0) {
        *out = es__malloc(s->n_ckpt * sizeof **out);
        if (*out != NULL) {
            memcpy(*out, s->ckpt, s->n_ckpt * sizeof **out);
            *n = s->n_ckpt;
        } else {
            rc = ES_ENOMEM;
        }
    }
    pthread_mutex_unlock(&s->lock);
    if (rc != 0) return es__error_set(err, rc, "out of memory");
    return 0;
}

const es__read_ops es__mem_read_ops = {
    .read_all = mem_read_all,
    .head = mem_head,
    .lag = mem_lag,
    .checkpoint_get = mem_checkpoint_get,
    .checkpoint_put = mem_checkpoint_put,
    .checkpoint_delete = mem_checkpoint_delete,
    .checkpoint_list = mem_checkpoint_list,
};
