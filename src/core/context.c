/*
 * The context object: its events and side effects in owned vectors, the
 * aggregate type check, recording (the idempotency check of an event id
 * within the context), the accessors and the decoders.  Loading is in
 * load.c, saving in save.c; context_internal.h is the contract between
 * them.
 *
 * Idempotency and optimistic concurrency are decided in the core, the same
 * way for every store: a backend inserts, skips ids and versions that
 * exist, and says what it inserted; save then reads back what it skipped.
 */
#include <stdio.h>
#include <string.h>

#include "core/internal.h"
#include "core/context_internal.h"
#include "eventastic/context.h"
#include "store/store_impl.h"

struct es_side_effect_sink {
    const es_aggregate_type *type;
    es_uuid aggregate_id;
    es_uuid event_id;
    se_vec *out;
    es_error *err;
};

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

void es__ev_vec_clear(ev_vec *v)
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
    es__ev_vec_clear(v);
    es__free(v->items);
    es__free(v->slots);
    memset(v, 0, sizeof *v);
}

void es__se_vec_clear(se_vec *v)
{
    for (size_t i = 0; i < v->n; i++) es__free((void *)v->items[i].data);
    v->n = 0;
}

void es__se_vec_free(se_vec *v)
{
    es__se_vec_clear(v);
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

void es__state_release(const es_aggregate_type *t, void *state)
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

const char *es__event_kind_name(const es_aggregate_type *t, int32_t kind,
                                char buf[16])
{
    const char *name = t->event_kind_name ? t->event_kind_name(kind) : NULL;
    if (name != NULL) return name;
    snprintf(buf, 16, "%d", (int)kind);
    return buf;
}

int es__apply_error(es_error *err, const es_aggregate_type *t,
                    const es_uuid *agg, const es_uuid *event_id,
                    int32_t kind, const es_error *inner, int rc)
{
    char id[ES_UUID_STRLEN + 1], kb[16];
    int code = rc == ES_ENOMEM ? ES_ENOMEM : ES_EAPPLY;
    es__error_wrap(err, code, inner, "type '%s': event %s (%s) could not be "
                   "applied", t->name, es_uuid_format(event_id, id),
                   es__event_kind_name(t, kind, kb));
    if (err) {
        err->aggregate_id = *agg;
        err->event_id = *event_id;
    }
    return code;
}

es_context *es__context_new(const es_aggregate_type *t, const es_uuid *id)
{
    es_context *ctx = es__calloc(1, sizeof *ctx);
    if (ctx == NULL) return NULL;
    ctx->type = t;
    ctx->id = *id;
    return ctx;
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
int es__collect_side_effects(const es_aggregate_type *t,
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

bool es__event_same_content(const es_event *a, int32_t kind,
                            const uint8_t *data, size_t len)
{
    return a->kind == kind && a->len == len &&
           (len == 0 || memcmp(a->data, data, len) == 0);
}

void es__context_clear_clash(es_context *ctx)
{
    es__free(ctx->clash_saved);
    es__free(ctx->clash_attempted);
    ctx->clash_saved = ctx->clash_attempted = NULL;
    ctx->has_clash = false;
}

int es__context_set_clash(es_context *ctx, const es_event *saved,
                          const es_event *attempted, es_error *err)
{
    es__context_clear_clash(ctx);
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
        es__state_release(type, state);
        es__free(ctx);
        es_buf_free(&enc.buf);
        return es__apply_error(err, type, aggregate_id, &enc.id, enc.kind,
                               &inner,
                               rc);
    }
    ctx->state = state;
    rc = es__collect_side_effects(type, aggregate_id, state, event, &enc.id,
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
        if (es__event_same_content(u, enc.kind, enc.buf.data, enc.buf.len)) {
            es_buf_free(&enc.buf); /* the same event again: a no-op */
            return 0;
        }
        es_event attempted = {enc.id, ctx->version + 1, enc.kind,
                              enc.buf.data, enc.buf.len};
        rc = es__context_set_clash(ctx, u, &attempted, err);
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
        es__state_release(t, next);
        es_buf_free(&enc.buf);
        return es__apply_error(err, t, &ctx->id, &enc.id, enc.kind, &inner, rc);
    }
    se_vec fresh = {0};
    rc = es__collect_side_effects(t, &ctx->id, next, event, &enc.id, &fresh,
                                  err);
    if (rc == 0 && push_uncommitted(ctx, &enc, ctx->version + 1) != 0)
        rc = es__error_set(err, ES_ENOMEM, "out of memory");
    if (rc == 0 && se_vec_move_all(&ctx->side_effects, &fresh) != 0) {
        ev_vec_pop(&ctx->uncommitted);
        rc = es__error_set(err, ES_ENOMEM, "out of memory");
    }
    if (rc != 0) {
        es__se_vec_free(&fresh);
        es__state_release(t, next);
        es_buf_free(&enc.buf);
        return rc;
    }
    es__se_vec_free(&fresh);
    es__state_release(t, ctx->state);
    ctx->state = next;
    ctx->version++;
    return 0;
}

/* ---- accessors ---- */

int es_context_clone(const es_context *ctx, es_context **out, es_error *err)
{
    if (ctx == NULL || out == NULL)
        return es__error_set(err, ES_EINVAL, "context and out are required");
    es_context *c = es__context_new(ctx->type, &ctx->id);
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
    es__state_release(ctx->type, ctx->state);
    ev_vec_free(&ctx->uncommitted);
    es__se_vec_free(&ctx->side_effects);
    es__context_clear_clash(ctx);
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
    es_context *ctx = es__context_new(type, id);
    if (ctx == NULL) return NULL;
    ctx->state = state;
    ctx->version = version;
    return ctx;
}
