/*
 * Saving a context (es_context_save): its events inserted under a
 * savepoint, then its snapshot and side effects.  The idempotency checks:
 * events the store skipped are read back; an equal one is a duplicate and
 * dropped, another with the same id is ES_EIDEMPOTENCY, a taken version is
 * ES_ECONFLICT unless the context can be rebuilt from the store and its
 * remaining events recorded on top, which is tried a few times.
 */
#include <string.h>

#include "core/context_internal.h"
#include "core/internal.h"
#include "store/store_impl.h"

#define MAX_SAVE_REBUILDS 4

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
    es_context *fresh = es__context_new(t, &ctx->id);
    if (fresh == NULL) { /* spelled out: the compiler sees rc != 0 */
        es__error_set(err, ES_ENOMEM, "out of memory");
        return ES_ENOMEM;
    }
    int rc = es__context_load_into(txn, fresh, true, err);
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
    es__state_release(ctx->type, ctx->state);
    ctx->state = fresh->state;
    ctx->version = fresh->version;
    fresh->state = NULL;
    es__ev_vec_clear(&ctx->uncommitted);
    es__se_vec_clear(&ctx->side_effects);
    es_context_free(fresh);
}

static int save_once(es_txn *txn, es_context *ctx, int depth, es_error *err);

/* Move a clash found in a rebuilt context to the caller's context. */
static void take_clash(es_context *ctx, es_context *fresh)
{
    if (!fresh->has_clash) return;
    es__context_clear_clash(ctx);
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
        bool equal =
            es__event_same_content(stored, ev->kind, ev->data, ev->len);
        if (!equal) {
            rc = es__context_set_clash(ctx, stored, ev, err);
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
            es__ev_vec_clear(&ctx->uncommitted);
            es__se_vec_clear(&ctx->side_effects);
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
    es__context_clear_clash(ctx);
    return save_once(txn, ctx, 0, err);
}
