/*
 * The context: record, save, load, regenerate side effects.
 *
 * Idempotency and optimistic concurrency are decided here, the same way for
 * every store: a backend inserts, skips ids and versions that exist, and
 * says what it inserted; save then reads back what it skipped.
 */
#include <stdio.h>
#include <string.h>

#include "core/internal.h"
#include "core/context_internal.h"
#include "eventastic/context.h"
#include "store/store_impl.h"

/* An event or side effect the context owns (data allocated).  The events
 * carry an index by event id (open addressing, linear probing; a slot
 * holds item index + 1, 0 is empty; at most half full), so that record's
 * idempotency check does not make recording n events O(n^2). */
typedef struct ev_vec {
    es_event *items;
    size_t n, cap;
    size_t *slots;
    size_t n_slots; /* 0 or a power of two */
} ev_vec;

typedef struct se_vec {
    es_side_effect *items;
    size_t n, cap;
} se_vec;

struct es_context {
    const es_aggregate_type *type;
    es_uuid id;
    uint64_t version;
    void *state;
    ev_vec uncommitted;
    se_vec side_effects;
    bool has_clash;
    es_event *clash_saved;    /* es__event_dup allocation */
    es_event *clash_attempted;
};

struct es_side_effect_sink {
    const es_aggregate_type *type;
    es_uuid aggregate_id;
    es_uuid event_id;
    se_vec *out;
    es_error *err;
};

#define MAX_SAVE_REBUILDS 4

/* ---- small owned vectors ---- */

static size_t id_hash(const es_uuid *id)
{
    uint64_t a, b;
    memcpy(&a, id->bytes, 8);
    memcpy(&b, id->bytes + 8, 8);
    uint64_t h = a ^ (b * 0x9e3779b97f4a7c15ULL);
    h ^= h >> 31;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 29;
    return (size_t)h;
}

static void ev_index_put(ev_vec *v, size_t i)
{
    size_t mask = v->n_slots - 1;
    size_t at = id_hash(&v->items[i].id) & mask;
    while (v->slots[at] != 0) at = (at + 1) & mask;
    v->slots[at] = i + 1;
}

/* Rebuild the index from the items, in place. */
static void ev_index_rebuild(ev_vec *v)
{
    if (v->n_slots == 0) return;
    memset(v->slots, 0, v->n_slots * sizeof *v->slots);
    for (size_t i = 0; i < v->n; i++) ev_index_put(v, i);
}

/* Room in the index for `need` items.  Returns 0 or ES_ENOMEM (the
 * index is then unchanged). */
static int ev_index_reserve(ev_vec *v, size_t need)
{
    if (need <= v->n_slots / 2) return 0;
    size_t n = v->n_slots ? v->n_slots : 16;
    while (need > n / 2) {
        if (n > SIZE_MAX / 2 / sizeof(size_t)) return ES_ENOMEM;
        n *= 2;
    }
    size_t *slots = es__calloc(n, sizeof *slots);
    if (slots == NULL) return ES_ENOMEM;
    es__free(v->slots);
    v->slots = slots;
    v->n_slots = n;
    ev_index_rebuild(v);
    return 0;
}

/* The item with this event id, or NULL. */
static const es_event *ev_vec_find(const ev_vec *v, const es_uuid *id)
{
    if (v->n_slots == 0) return NULL;
    size_t mask = v->n_slots - 1;
    for (size_t at = id_hash(id) & mask; v->slots[at] != 0;
         at = (at + 1) & mask) {
        const es_event *e = &v->items[v->slots[at] - 1];
        if (es_uuid_equal(&e->id, id)) return e;
    }
    return NULL;
}

static void ev_vec_clear(ev_vec *v)
{
    for (size_t i = 0; i < v->n; i++) es__free((void *)v->items[i].data);
    v->n = 0;
    ev_index_rebuild(v);
}

/* Drop the newest item (its payload is freed). */
static void ev_vec_pop(ev_vec *v)
{
    es__free((void *)v->items[--v->n].data);
    ev_index_rebuild(v);
}

static void ev_vec_free(ev_vec *v)
{
    ev_vec_clear(v);
    es__free(v->items);
    es__free(v->slots);
    memset(v, 0, sizeof *v);
}

static void se_vec_clear(se_vec *v)
{
    for (size_t i = 0; i < v->n; i++) es__free((void *)v->items[i].data);
    v->n = 0;
}

static void se_vec_free(se_vec *v)
{
    se_vec_clear(v);
    es__free(v->items);
    memset(v, 0, sizeof *v);
}

/* Appends all of src to dst, moving the payloads; src ends empty. */
static int se_vec_move_all(se_vec *dst, se_vec *src)
{
    void *items = dst->items;
    if (es__grow(&items, &dst->cap, dst->n + src->n, sizeof(es_side_effect)))
        return ES_ENOMEM;
    dst->items = items;
    if (src->n > 0)
        memcpy(&dst->items[dst->n], src->items, src->n * sizeof *src->items);
    dst->n += src->n;
    src->n = 0;
    return 0;
}

/* ---- the aggregate type ---- */

int es_aggregate_type_check(const es_aggregate_type *t, es_error *err)
{
    if (t == NULL) return es__error_set(err, ES_EINVAL, "type is NULL");
    if (t->name == NULL || t->name[0] == '\0' || strlen(t->name) > 63)
        return es__error_set(err, ES_EINVAL,
                             "type name must have 1 to 63 characters");
    if (t->state_size == 0 || t->event_size == 0)
        return es__error_set(err, ES_EINVAL,
                             "type '%s': state_size and event_size must not "
                             "be 0", t->name);
    if (!t->event_id || !t->event_kind || !t->apply_new || !t->apply ||
        !t->state_encode || !t->state_decode || !t->event_encode ||
        !t->event_decode)
        return es__error_set(err, ES_EINVAL,
                             "type '%s': event_id, event_kind, apply_new, "
                             "apply and the state and event codecs are "
                             "required", t->name);
    if (t->side_effects &&
        (!t->side_effect_id || !t->side_effect_kind ||
         !t->side_effect_encode || !t->side_effect_decode ||
         t->side_effect_size == 0))
        return es__error_set(err, ES_EINVAL,
                             "type '%s': side_effects needs side_effect_size, "
                             "side_effect_id, side_effect_kind and the "
                             "side-effect codec", t->name);
    return 0;
}

static void state_release(const es_aggregate_type *t, void *state)
{
    if (state == NULL) return;
    if (t->state_free) t->state_free(state);
    es__free(state);
}

static int state_dup(const es_aggregate_type *t, const void *src, void **out,
                     es_error *err)
{
    void *dst = es__calloc(1, t->state_size);
    if (dst == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    if (t->state_copy) {
        es_error inner = {0};
        int rc = t->state_copy(dst, src, &inner);
        if (rc != 0) {
            es__free(dst);
            return es__error_wrap(err, rc < 0 ? rc : ES_ENOMEM, &inner,
                                  "type '%s': state_copy failed", t->name);
        }
    } else {
        memcpy(dst, src, t->state_size);
    }
    *out = dst;
    return 0;
}

static const char *kind_name(const es_aggregate_type *t, int32_t kind,
                             char buf[16])
{
    const char *name = t->event_kind_name ? t->event_kind_name(kind) : NULL;
    if (name != NULL) return name;
    snprintf(buf, 16, "%d", (int)kind);
    return buf;
}

static int apply_error(es_error *err, const es_aggregate_type *t,
                       const es_uuid *agg, const es_uuid *event_id,
                       int32_t kind, const es_error *inner, int rc)
{
    char id[ES_UUID_STRLEN + 1], kb[16];
    int code = rc == ES_ENOMEM ? ES_ENOMEM : ES_EAPPLY;
    es__error_wrap(err, code, inner, "type '%s': event %s (%s) could not be "
                   "applied", t->name, es_uuid_format(event_id, id),
                   kind_name(t, kind, kb));
    if (err) {
        err->aggregate_id = *agg;
        err->event_id = *event_id;
    }
    return code;
}

/* ---- side effects ---- */

int es_side_effect_emit(es_side_effect_sink *sink, const void *side_effect)
{
    if (sink == NULL || side_effect == NULL) return ES_EINVAL;
    const es_aggregate_type *t = sink->type;
    es_side_effect se;
    memset(&se, 0, sizeof se);
    se.id = t->side_effect_id(side_effect);
    if (es_uuid_is_nil(&se.id))
        return es__error_set(sink->err, ES_EINVAL,
                             "type '%s': side effect has a nil id", t->name);
    se.aggregate_id = sink->aggregate_id;
    se.event_id = sink->event_id;
    se.kind = t->side_effect_kind(side_effect);
    es_buf buf = {0};
    es_error inner = {0};
    int rc = t->side_effect_encode(side_effect, &buf, &inner);
    if (rc != 0) {
        es_buf_free(&buf);
        return es__error_wrap(sink->err, rc < 0 ? rc : ES_EINVAL, &inner,
                              "type '%s': side effect could not be encoded",
                              t->name);
    }
    void *items = sink->out->items;
    if (es__grow(&items, &sink->out->cap, sink->out->n + 1, sizeof se)) {
        es_buf_free(&buf);
        return es__error_set(sink->err, ES_ENOMEM, "out of memory");
    }
    sink->out->items = items;
    se.data = buf.data;
    se.len = buf.len;
    sink->out->items[sink->out->n++] = se;
    return 0;
}

/* Side effects of one applied event into out (left empty on failure). */
static int collect_side_effects(const es_aggregate_type *t,
                                const es_uuid *agg, const void *state,
                                const void *event, const es_uuid *event_id,
                                se_vec *out, es_error *err)
{
    if (t->side_effects == NULL) return 0;
    es_error inner = {0};
    es_side_effect_sink sink = {t, *agg, *event_id, out, &inner};
    size_t before = out->n;
    int rc = t->side_effects(state, event, &sink, &inner);
    if (rc != 0) {
        while (out->n > before) es__free((void *)out->items[--out->n].data);
        return es__error_wrap(err, rc < 0 ? rc : ES_EINVAL, &inner,
                              "type '%s': side_effects failed", t->name);
    }
    return 0;
}

/* ---- recording ---- */

typedef struct encoded {
    es_uuid id;
    int32_t kind;
    es_buf buf;
} encoded;

static int encode_event(const es_aggregate_type *t, const void *event,
                        encoded *out, es_error *err)
{
    memset(out, 0, sizeof *out);
    out->id = t->event_id(event);
    if (es_uuid_is_nil(&out->id))
        return es__error_set(err, ES_EINVAL, "type '%s': event has a nil id",
                             t->name);
    out->kind = t->event_kind(event);
    es_error inner = {0};
    int rc = t->event_encode(event, &out->buf, &inner);
    if (rc != 0) {
        es_buf_free(&out->buf);
        return es__error_wrap(err, rc < 0 ? rc : ES_EINVAL, &inner,
                              "type '%s': event could not be encoded",
                              t->name);
    }
    return 0;
}

static bool same_content(const es_event *a, int32_t kind, const uint8_t *data,
                         size_t len)
{
    return a->kind == kind && a->len == len &&
           (len == 0 || memcmp(a->data, data, len) == 0);
}

static void clear_clash(es_context *ctx)
{
    es__free(ctx->clash_saved);
    es__free(ctx->clash_attempted);
    ctx->clash_saved = ctx->clash_attempted = NULL;
    ctx->has_clash = false;
}

static int set_clash(es_context *ctx, const es_event *saved,
                     const es_event *attempted, es_error *err)
{
    clear_clash(ctx);
    ctx->clash_saved = es__event_dup(saved);
    ctx->clash_attempted = es__event_dup(attempted);
    ctx->has_clash = ctx->clash_saved && ctx->clash_attempted;
    char id[ES_UUID_STRLEN + 1];
    es__error_set(err, ES_EIDEMPOTENCY,
                  "type '%s': event id %s is already used with other content",
                  ctx->type->name, es_uuid_format(&attempted->id, id));
    if (err) {
        err->aggregate_id = ctx->id;
        err->event_id = attempted->id;
        err->version = saved->version;
    }
    return ES_EIDEMPOTENCY;
}

static int push_uncommitted(es_context *ctx, encoded *enc, uint64_t version)
{
    ev_vec *v = &ctx->uncommitted;
    void *items = v->items;
    if (es__grow(&items, &v->cap, v->n + 1, sizeof(es_event)))
        return ES_ENOMEM;
    v->items = items;
    if (ev_index_reserve(v, v->n + 1) != 0) return ES_ENOMEM;
    v->items[v->n] =
        (es_event){enc->id, version, enc->kind, enc->buf.data, enc->buf.len};
    ev_index_put(v, v->n);
    v->n++;
    memset(&enc->buf, 0, sizeof enc->buf); /* moved */
    return 0;
}

int es_context_record_new(const es_aggregate_type *type,
                          const es_uuid *aggregate_id, const void *event,
                          es_context **out, es_error *err)
{
    if (out == NULL || aggregate_id == NULL || event == NULL)
        return es__error_set(err, ES_EINVAL,
                             "aggregate id, event and out are required");
    int rc = es_aggregate_type_check(type, err);
    if (rc != 0) return rc;
    if (es_uuid_is_nil(aggregate_id))
        return es__error_set(err, ES_EINVAL, "aggregate id is nil");
    encoded enc;
    if ((rc = encode_event(type, event, &enc, err)) != 0) return rc;
    es_context *ctx = es__calloc(1, sizeof *ctx);
    void *state = es__calloc(1, type->state_size);
    if (ctx == NULL || state == NULL) {
        es__free(ctx);
        es__free(state);
        es_buf_free(&enc.buf);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    ctx->type = type;
    ctx->id = *aggregate_id;
    es_error inner = {0};
    rc = type->apply_new(state, event, &inner);
    if (rc != 0) {
        state_release(type, state);
        es__free(ctx);
        es_buf_free(&enc.buf);
        return apply_error(err, type, aggregate_id, &enc.id, enc.kind, &inner,
                           rc);
    }
    ctx->state = state;
    rc = collect_side_effects(type, aggregate_id, state, event, &enc.id,
                              &ctx->side_effects, err);
    if (rc == 0 && push_uncommitted(ctx, &enc, 0) != 0)
        rc = es__error_set(err, ES_ENOMEM, "out of memory");
    if (rc != 0) {
        es_buf_free(&enc.buf);
        es_context_free(ctx);
        return rc;
    }
    ctx->version = 0;
    *out = ctx;
    return 0;
}

int es_context_record(es_context *ctx, const void *event, es_error *err)
{
    if (ctx == NULL || event == NULL)
        return es__error_set(err, ES_EINVAL, "context and event are "
                                             "required");
    const es_aggregate_type *t = ctx->type;
    encoded enc;
    int rc = encode_event(t, event, &enc, err);
    if (rc != 0) return rc;

    const es_event *u = ev_vec_find(&ctx->uncommitted, &enc.id);
    if (u != NULL) {
        if (same_content(u, enc.kind, enc.buf.data, enc.buf.len)) {
            es_buf_free(&enc.buf); /* the same event again: a no-op */
            return 0;
        }
        es_event attempted = {enc.id, ctx->version + 1, enc.kind,
                              enc.buf.data, enc.buf.len};
        rc = set_clash(ctx, u, &attempted, err);
        es_buf_free(&enc.buf);
        return rc;
    }
    if (ctx->version == UINT64_MAX - 1) {
        es_buf_free(&enc.buf);
        return es__error_set(err, ES_EINVAL, "version would overflow");
    }

    /* Apply to a copy, so that a failing apply or side_effects leaves the
     * state as it was. */
    void *next = NULL;
    if ((rc = state_dup(t, ctx->state, &next, err)) != 0) {
        es_buf_free(&enc.buf);
        return rc;
    }
    es_error inner = {0};
    rc = t->apply(next, event, &inner);
    if (rc != 0) {
        state_release(t, next);
        es_buf_free(&enc.buf);
        return apply_error(err, t, &ctx->id, &enc.id, enc.kind, &inner, rc);
    }
    se_vec fresh = {0};
    rc = collect_side_effects(t, &ctx->id, next, event, &enc.id, &fresh, err);
    if (rc == 0 && push_uncommitted(ctx, &enc, ctx->version + 1) != 0)
        rc = es__error_set(err, ES_ENOMEM, "out of memory");
    if (rc == 0 && se_vec_move_all(&ctx->side_effects, &fresh) != 0) {
        ev_vec_pop(&ctx->uncommitted);
        rc = es__error_set(err, ES_ENOMEM, "out of memory");
    }
    if (rc != 0) {
        se_vec_free(&fresh);
        state_release(t, next);
        es_buf_free(&enc.buf);
        return rc;
    }
    se_vec_free(&fresh);
    state_release(t, ctx->state);
    ctx->state = next;
    ctx->version++;
    return 0;
}

/* ---- loading ---- */

typedef struct fold {
    es_context *ctx;
    void *value;      /* decoded event, event_size bytes */
    uint64_t until;   /* stop after this version (regenerate) */
    const es_uuid *target;
    se_vec *target_effects;
    bool reached;
    es_error *err;
    /* Loading from a snapshot: the stream starts at the snapshot's own
     * event, which must be there (else the snapshot is not of this
     * stream) and is not applied again. */
    bool check_snapshot;
    bool snapshot_seen;
} fold;

#define FOLD_STOP 1
#define FOLD_STALE_SNAPSHOT 2

static int fold_event(void *ud, const es_event *ev)
{
    fold *f = ud;
    es_context *ctx = f->ctx;
    const es_aggregate_type *t = ctx->type;
    char id[ES_UUID_STRLEN + 1], kb[16];
    if (f->check_snapshot) {
        f->check_snapshot = false;
        if (ev->version != ctx->version) return FOLD_STALE_SNAPSHOT;
        f->snapshot_seen = true;
        return 0;
    }
    uint64_t expect = ctx->state ? ctx->version + 1 : 0;
    if (ev->version != expect) {
        es__error_set(f->err, ES_EDECODE,
                      "type '%s': stream has version %llu where %llu was "
                      "expected", t->name, (unsigned long long)ev->version,
                      (unsigned long long)expect);
        if (f->err) f->err->aggregate_id = ctx->id;
        return ES_EDECODE;
    }
    memset(f->value, 0, t->event_size);
    es_error inner = {0};
    int rc = t->event_decode(ev->kind, ev->data, ev->len, f->value, &inner);
    if (rc != 0) {
        if (t->event_free) t->event_free(f->value);
        es__error_wrap(f->err, rc == ES_ENOMEM ? rc : ES_EDECODE, &inner,
                       "type '%s': event %s (kind %s) could not be decoded",
                       t->name, es_uuid_format(&ev->id, id),
                       kind_name(t, ev->kind, kb));
        if (f->err) {
            f->err->aggregate_id = ctx->id;
            f->err->event_id = ev->id;
        }
        return rc == ES_ENOMEM ? rc : ES_EDECODE;
    }
    if (ctx->state == NULL) {
        void *state = es__calloc(1, t->state_size);
        if (state == NULL) rc = ES_ENOMEM;
        else if ((rc = t->apply_new(state, f->value, &inner)) != 0)
            state_release(t, state);
        else
            ctx->state = state;
    } else {
        rc = t->apply(ctx->state, f->value, &inner);
    }
    if (rc != 0) {
        if (t->event_free) t->event_free(f->value);
        return apply_error(f->err, t, &ctx->id, &ev->id, ev->kind, &inner, rc);
    }
    ctx->version = ev->version;
    if (f->target && es_uuid_equal(f->target, &ev->id)) {
        f->reached = true;
        rc = collect_side_effects(t, &ctx->id, ctx->state, f->value, &ev->id,
                                  f->target_effects, f->err);
    }
    if (t->event_free) t->event_free(f->value);
    if (rc != 0) return rc;
    return ev->version >= f->until ? FOLD_STOP : 0;
}

static es_context *context_new(const es_aggregate_type *t, const es_uuid *id)
{
    es_context *ctx = es__calloc(1, sizeof *ctx);
    if (ctx == NULL) return NULL;
    ctx->type = t;
    ctx->id = *id;
    return ctx;
}

/* Use the snapshot if there is a decodable one of the type's version. */
static int load_snapshot(es_txn *txn, es_context *ctx, es_error *err)
{
    const es_aggregate_type *t = ctx->type;
    es_snapshot *snap = NULL;
    es_error ignored = {0};
    int rc = es__txn_get_snapshot(txn, t->name, &ctx->id,
                                  t->snapshot_version, &snap, &ignored);
    if (rc == ES_ENOTFOUND) return 0;
    if (rc == ES_EDECODE || rc == ES_EDECRYPT || rc == ES_EFORGOTTEN)
        return 0; /* a cache: replay instead */
    if (rc == ES_EWRONGTYPE) { /* the stored type, not the cache's */
        if (err) *err = ignored;
        return rc;
    }
    if (rc != 0) return es__error_wrap(err, rc, &ignored, "snapshot read");
    void *state = es__calloc(1, t->state_size);
    if (state == NULL) {
        es__free(snap);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    rc = t->state_decode(snap->data, snap->len, state, &ignored);
    if (rc == 0) {
        ctx->state = state;
        ctx->version = snap->version;
    } else {
        state_release(t, state); /* corrupt: replay from version 0 */
        rc = rc == ES_ENOMEM ? es__error_set(err, rc, "out of memory") : 0;
    }
    es__free(snap);
    return rc;
}

static int load_into(es_txn *txn, es_context *ctx, bool use_snapshot,
                     es_error *err)
{
    int rc = use_snapshot ? load_snapshot(txn, ctx, err) : 0;
    if (rc != 0) return rc;
    fold f = {ctx, NULL, UINT64_MAX, NULL, NULL, false, err, false, false};
    f.value = es__calloc(1, ctx->type->event_size);
    if (f.value == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    bool from_snapshot = ctx->state != NULL;
    f.check_snapshot = from_snapshot;
    rc = es__txn_stream(txn, ctx->type->name, &ctx->id,
                        from_snapshot ? ctx->version : 0, fold_event, &f,
                        err);
    if (from_snapshot &&
        (rc == FOLD_STALE_SNAPSHOT || (rc == 0 && !f.snapshot_seen))) {
        /* The snapshot claims a version the stream does not have: it is
         * not a cache of this stream.  Replay from version 0. */
        state_release(ctx->type, ctx->state);
        ctx->state = NULL;
        ctx->version = 0;
        f.check_snapshot = false;
        rc = es__txn_stream(txn, ctx->type->name, &ctx->id, 0, fold_event,
                            &f, err);
    }
    es__free(f.value);
    if (rc == FOLD_STOP) rc = 0;
    if (rc == 0 && ctx->state == NULL) {
        char id[ES_UUID_STRLEN + 1];
        rc = es__error_set(err, ES_ENOTFOUND, "type '%s': aggregate %s not "
                           "found", ctx->type->name,
                           es_uuid_format(&ctx->id, id));
        if (err) err->aggregate_id = ctx->id;
    }
    return rc;
}

int es_context_load(es_txn *txn, const es_aggregate_type *type,
                    const es_uuid *aggregate_id, es_context **out,
                    es_error *err)
{
    if (txn == NULL || aggregate_id == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL,
                             "transaction, aggregate id and out are "
                             "required");
    int rc = es_aggregate_type_check(type, err);
    if (rc != 0) return rc;
    if (es_uuid_is_nil(aggregate_id))
        return es__error_set(err, ES_EINVAL, "aggregate id is nil");
    es_context *ctx = context_new(type, aggregate_id);
    if (ctx == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    if ((rc = load_into(txn, ctx, true, err)) != 0) {
        es_context_free(ctx);
        return rc;
    }
    *out = ctx;
    return 0;
}

int es_store_load(es_store *store, const es_aggregate_type *type,
                  const es_uuid *aggregate_id, es_context **out,
                  es_error *err)
{
    es_txn *txn = NULL;
    int rc = es_store_begin(store, &txn, err);
    if (rc != 0) return rc;
    rc = es_context_load(txn, type, aggregate_id, out, err);
    es_txn_rollback(txn);
    return rc;
}

int es_context_regenerate_side_effects(es_txn *txn,
                                       const es_aggregate_type *type,
                                       const es_uuid *aggregate_id,
                                       const es_uuid *event_id,
                                       es_side_effect_list **out,
                                       es_error *err)
{
    if (txn == NULL || aggregate_id == NULL || event_id == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "all arguments are required");
    *out = NULL;
    int rc = es_aggregate_type_check(type, err);
    if (rc != 0) return rc;
    if (es_uuid_is_nil(aggregate_id) || es_uuid_is_nil(event_id))
        return es__error_set(err, ES_EINVAL, "aggregate id and event id "
                                             "must not be nil");
    es_event *target = NULL;
    rc = es_txn_get_event(txn, aggregate_id, event_id, &target, err);
    if (rc == ES_ENOTFOUND) {
        es_error_clear(err);
        return 0;
    }
    if (rc != 0) return rc;
    es_context *ctx = context_new(type, aggregate_id);
    se_vec effects = {0};
    fold f = {ctx,   NULL, target->version, event_id, &effects,
              false, err,  false,           false};
    f.value = ctx ? es__calloc(1, type->event_size) : NULL;
    if (f.value == NULL) rc = es__error_set(err, ES_ENOMEM, "out of memory");
    else
        rc = es__txn_stream(txn, type->name, aggregate_id, 0, fold_event,
                            &f, err);
    if (rc == FOLD_STOP) rc = 0;
    es__free(f.value);
    es__free(target);
    es_context_free(ctx);
    if (rc == 0 && effects.n > 0) {
        es_side_effect_list *list = es__calloc(1, sizeof *list);
        if (list == NULL) {
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
        } else {
            list->count = effects.n;
            list->items = effects.items; /* moved */
            memset(&effects, 0, sizeof effects);
            *out = list;
        }
    }
    se_vec_free(&effects);
    return rc;
}

/* ---- saving ---- */

static int write_snapshot_and_effects(es_txn *txn, es_context *ctx,
                                      es_error *err)
{
    const es_aggregate_type *t = ctx->type;
    es_buf state = {0};
    es_error inner = {0};
    int rc = t->state_encode(ctx->state, &state, &inner);
    if (rc != 0) {
        es_buf_free(&state);
        return es__error_wrap(err, rc < 0 ? rc : ES_EINVAL, &inner,
                              "type '%s': state could not be encoded",
                              t->name);
    }
    es_snapshot snap = {ctx->id, ctx->version, t->snapshot_version,
                        state.data, state.len};
    rc = es__txn_store_snapshot(txn, &snap, err);
    es_buf_free(&state);
    if (rc != 0) return rc;
    return es__txn_insert_side_effects(txn, t->name, ctx->side_effects.items,
                                       ctx->side_effects.n, err);
}

static int conflict_error(es_error *err, const es_context *ctx,
                          uint64_t version)
{
    char id[ES_UUID_STRLEN + 1];
    es__error_set(err, ES_ECONFLICT,
                  "type '%s': version %llu of aggregate %s already exists",
                  ctx->type->name, (unsigned long long)version,
                  es_uuid_format(&ctx->id, id));
    if (err) {
        err->aggregate_id = ctx->id;
        err->version = version;
    }
    return ES_ECONFLICT;
}

/* Rebuild a context from the store (within txn) and record the events of
 * ctx that are not duplicates on top of it.  *out on success. */
static int rebuild(es_txn *txn, es_context *ctx, const bool *dup,
                   es_context **out, es_error *err)
{
    const es_aggregate_type *t = ctx->type;
    es_context *fresh = context_new(t, &ctx->id);
    if (fresh == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    int rc = load_into(txn, fresh, true, err);
    void *value = rc == 0 ? es__calloc(1, t->event_size) : NULL;
    if (rc == 0 && value == NULL)
        rc = es__error_set(err, ES_ENOMEM, "out of memory");
    for (size_t i = 0; rc == 0 && i < ctx->uncommitted.n; i++) {
        if (dup[i]) continue;
        const es_event *ev = &ctx->uncommitted.items[i];
        if (ev->version == 0) { /* a creation event on a stream that exists */
            rc = conflict_error(err, ctx, 0);
            break;
        }
        memset(value, 0, t->event_size);
        es_error inner = {0};
        rc = t->event_decode(ev->kind, ev->data, ev->len, value, &inner);
        if (rc != 0)
            rc = es__error_wrap(err, ES_EDECODE, &inner, "type '%s': "
                                "uncommitted event could not be decoded",
                                t->name);
        else
            rc = es_context_record(fresh, value, err);
        if (t->event_free) t->event_free(value);
    }
    es__free(value);
    if (rc != 0) {
        es_context_free(fresh);
        return rc;
    }
    *out = fresh;
    return 0;
}

/* Move fresh's content into ctx (after a successful save of fresh). */
static void adopt(es_context *ctx, es_context *fresh)
{
    state_release(ctx->type, ctx->state);
    ctx->state = fresh->state;
    ctx->version = fresh->version;
    fresh->state = NULL;
    ev_vec_clear(&ctx->uncommitted);
    se_vec_clear(&ctx->side_effects);
    es_context_free(fresh);
}

static int save_once(es_txn *txn, es_context *ctx, int depth, es_error *err);

/* Move a clash found in a rebuilt context to the caller's context. */
static void take_clash(es_context *ctx, es_context *fresh)
{
    if (!fresh->has_clash) return;
    clear_clash(ctx);
    ctx->clash_saved = fresh->clash_saved;
    ctx->clash_attempted = fresh->clash_attempted;
    ctx->has_clash = true;
    fresh->clash_saved = fresh->clash_attempted = NULL;
    fresh->has_clash = false;
}

/* Sort out the events the store skipped.  Returns 0 when every skipped
 * event was an equal duplicate (dup[] says which), or an error. */
static int classify_skipped(es_txn *txn, es_context *ctx, const bool *inserted,
                            bool *dup, es_error *err)
{
    for (size_t i = 0; i < ctx->uncommitted.n; i++) {
        dup[i] = false;
        if (inserted[i]) continue;
        const es_event *ev = &ctx->uncommitted.items[i];
        es_event *stored = NULL;
        es_error inner = {0};
        int rc = es_txn_get_event(txn, &ctx->id, &ev->id, &stored, &inner);
        if (rc == ES_ENOTFOUND) return conflict_error(err, ctx, ev->version);
        if (rc != 0) return es__error_wrap(err, rc, &inner, "read back");
        bool equal = same_content(stored, ev->kind, ev->data, ev->len);
        if (!equal) {
            rc = set_clash(ctx, stored, ev, err);
            es__free(stored);
            return rc;
        }
        es__free(stored);
        dup[i] = true;
    }
    return 0;
}

static int save_once(es_txn *txn, es_context *ctx, int depth, es_error *err)
{
    size_t n = ctx->uncommitted.n;
    if (n == 0) return 0;
    bool *flags = es__calloc(2 * n, sizeof(bool));
    if (flags == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    bool *inserted = flags, *dup = flags + n;
    int rc = es__txn_savepoint(txn, err);
    if (rc != 0) {
        es__free(flags);
        return rc;
    }
    rc = es__txn_insert_events(txn, ctx->type->name, &ctx->id,
                               ctx->uncommitted.items, n, inserted, err);
    bool all = true;
    for (size_t i = 0; rc == 0 && i < n; i++) all = all && inserted[i];
    if (rc == 0 && all) {
        rc = write_snapshot_and_effects(txn, ctx, err);
        if (rc == 0) rc = es__txn_release(txn, err);
        if (rc == 0) {
            ev_vec_clear(&ctx->uncommitted);
            se_vec_clear(&ctx->side_effects);
            es__free(flags);
            return 0;
        }
    } else if (rc == 0) {
        rc = classify_skipped(txn, ctx, inserted, dup, err);
    }
    /* Either a failure, or duplicates to drop: back to the savepoint. */
    es_error ignored = {0};
    es__txn_rollback_to(txn, &ignored);
    if (rc == 0 && depth >= MAX_SAVE_REBUILDS)
        rc = es__error_set(err, ES_ECONFLICT, "aggregate changed while "
                           "saving, %d times", depth);
    if (rc == 0) {
        es_context *fresh = NULL;
        rc = rebuild(txn, ctx, dup, &fresh, err);
        if (rc == 0) rc = save_once(txn, fresh, depth + 1, err);
        if (rc == 0) {
            adopt(ctx, fresh);
        } else if (fresh != NULL) {
            take_clash(ctx, fresh); /* the caller asks ctx, not fresh */
            es_context_free(fresh);
        }
    }
    es__free(flags);
    return rc;
}

int es_context_save(es_txn *txn, es_context *ctx, es_error *err)
{
    if (txn == NULL || ctx == NULL)
        return es__error_set(err, ES_EINVAL, "transaction and context are "
                                             "required");
    clear_clash(ctx);
    return save_once(txn, ctx, 0, err);
}

/* ---- accessors ---- */

int es_context_clone(const es_context *ctx, es_context **out, es_error *err)
{
    if (ctx == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "context and out are required");
    es_context *c = context_new(ctx->type, &ctx->id);
    if (c == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    c->version = ctx->version;
    int rc = state_dup(ctx->type, ctx->state, &c->state, err);
    for (size_t i = 0; rc == 0 && i < ctx->uncommitted.n; i++) {
        const es_event *e = &ctx->uncommitted.items[i];
        encoded enc = {e->id, e->kind, {0}};
        if (es_buf_append(&enc.buf, e->data, e->len) != 0 ||
            push_uncommitted(c, &enc, e->version) != 0) {
            es_buf_free(&enc.buf);
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
        }
    }
    for (size_t i = 0; rc == 0 && i < ctx->side_effects.n; i++) {
        es_side_effect se = ctx->side_effects.items[i];
        void *items = c->side_effects.items;
        se.data = es__memdup(se.data, se.len);
        if (se.data == NULL ||
            es__grow(&items, &c->side_effects.cap, c->side_effects.n + 1,
                     sizeof se) != 0) {
            es__free((void *)se.data);
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
            break;
        }
        c->side_effects.items = items;
        c->side_effects.items[c->side_effects.n++] = se;
    }
    if (rc != 0) {
        es_context_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

void es_context_free(es_context *ctx)
{
    if (ctx == NULL) return;
    state_release(ctx->type, ctx->state);
    ev_vec_free(&ctx->uncommitted);
    se_vec_free(&ctx->side_effects);
    clear_clash(ctx);
    es__free(ctx);
}

uint64_t es_context_version(const es_context *ctx)
{
    return ctx ? ctx->version : 0;
}

const void *es_context_state(const es_context *ctx)
{
    return ctx ? ctx->state : NULL;
}

const es_aggregate_type *es_context_type(const es_context *ctx)
{
    return ctx ? ctx->type : NULL;
}

const es_uuid *es_context_aggregate_id(const es_context *ctx)
{
    return ctx ? &ctx->id : NULL;
}

uint64_t es_context_snapshot_version(const es_context *ctx)
{
    return ctx ? ctx->type->snapshot_version : 0;
}

size_t es_context_uncommitted_count(const es_context *ctx)
{
    return ctx ? ctx->uncommitted.n : 0;
}

const es_event *es_context_uncommitted(const es_context *ctx, size_t i)
{
    return (ctx && i < ctx->uncommitted.n) ? &ctx->uncommitted.items[i]
                                           : NULL;
}

size_t es_context_side_effect_count(const es_context *ctx)
{
    return ctx ? ctx->side_effects.n : 0;
}

const es_side_effect *es_context_side_effect(const es_context *ctx, size_t i)
{
    return (ctx && i < ctx->side_effects.n) ? &ctx->side_effects.items[i]
                                            : NULL;
}

int es_context_idempotency_clash(const es_context *ctx,
                                 const es_event **saved,
                                 const es_event **attempted)
{
    if (ctx == NULL || !ctx->has_clash) return ES_ENOTFOUND;
    if (saved) *saved = ctx->clash_saved;
    if (attempted) *attempted = ctx->clash_attempted;
    return 0;
}

/* ---- decoding helpers ---- */

int es_event_decode(const es_aggregate_type *type, const es_event *event,
                    void *value, es_error *err)
{
    if (type == NULL || event == NULL || value == NULL)
        return es__error_set(err, ES_EINVAL, "all arguments are required");
    int rc = es_aggregate_type_check(type, err);
    if (rc != 0) return rc;
    memset(value, 0, type->event_size);
    es_error inner = {0};
    rc = type->event_decode(event->kind, event->data, event->len, value,
                            &inner);
    if (rc != 0) {
        if (type->event_free) type->event_free(value);
        return es__error_wrap(err, rc == ES_ENOMEM ? rc : ES_EDECODE, &inner,
                              "type '%s': event could not be decoded",
                              type->name);
    }
    return 0;
}

void es_event_value_free(const es_aggregate_type *type, void *value)
{
    if (type && value && type->event_free) type->event_free(value);
}

int es_side_effect_decode(const es_aggregate_type *type,
                          const es_side_effect *se, void *value,
                          es_error *err)
{
    if (type == NULL || se == NULL || value == NULL)
        return es__error_set(err, ES_EINVAL, "all arguments are required");
    if (type->side_effect_decode == NULL || type->side_effect_size == 0)
        return es__error_set(err, ES_EINVAL, "type has no side-effect "
                                             "codec");
    memset(value, 0, type->side_effect_size);
    es_error inner = {0};
    int rc = type->side_effect_decode(se->kind, se->data, se->len, value,
                                      &inner);
    if (rc != 0) {
        if (type->side_effect_free) type->side_effect_free(value);
        return es__error_wrap(err, rc == ES_ENOMEM ? rc : ES_EDECODE, &inner,
                              "type '%s': side effect could not be decoded",
                              type->name);
    }
    return 0;
}

void es_side_effect_value_free(const es_aggregate_type *type, void *value)
{
    if (type && value && type->side_effect_free) type->side_effect_free(value);
}

/* ---- for the host ---- */

void es__context_take(es_context *ctx, es_event **events, size_t *n_events,
                      es_side_effect **side_effects, size_t *n_side_effects)
{
    *events = ctx->uncommitted.items;
    *n_events = ctx->uncommitted.n;
    *side_effects = ctx->side_effects.items;
    *n_side_effects = ctx->side_effects.n;
    ctx->uncommitted.items = NULL; /* the id index stays, emptied */
    ctx->uncommitted.n = ctx->uncommitted.cap = 0;
    ev_index_rebuild(&ctx->uncommitted);
    memset(&ctx->side_effects, 0, sizeof ctx->side_effects);
}

void *es__context_release(es_context *ctx, uint64_t *version)
{
    void *state = ctx->state;
    *version = ctx->version;
    ctx->state = NULL;
    es_context_free(ctx);
    return state;
}

es_context *es__context_adopt(const es_aggregate_type *type,
                              const es_uuid *id, uint64_t version,
                              void *state)
{
    es_context *ctx = context_new(type, id);
    if (ctx == NULL) return NULL;
    ctx->state = state;
    ctx->version = version;
    return ctx;
}
