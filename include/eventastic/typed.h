/**
 * @file typed.h
 * @brief a typed facade for one aggregate type.
 *
 *   ES_AGGREGATE_DECLARE(account, account_type, account_state,
 *                        account_event, account_side_effect)
 *
 * declares `account_context` and static inline functions
 * account_record_new, account_record, account_save, account_load,
 * account_store_load, account_state, account_version, account_context_free,
 * account_emit, account_event_decode and account_side_effect_decode that
 * take and return only that aggregate's own types.  Recording another
 * aggregate's event, saving another aggregate's context or reading the state
 * as another type is then a compile error (incompatible pointer types).
 * `account_type` must name the es_aggregate_type constant of the aggregate.
 * The functions have the semantics, errors and thread rules of the
 * es_context_* functions they wrap (eventastic/context.h).
 */
#ifndef EVENTASTIC_TYPED_H
#define EVENTASTIC_TYPED_H

#include "context.h"

/** Declare the typed facade P_* for one aggregate type (see the file
 *  comment).  Use at file scope, once per aggregate type. */
#define ES_AGGREGATE_DECLARE(P, TYPE, STATE, EVENT, SIDE_EFFECT)             \
    typedef struct P##_context P##_context;                                   \
    static inline es_context *P##_context_raw(P##_context *ctx)               \
    {                                                                         \
        return (es_context *)(void *)ctx;                                     \
    }                                                                         \
    static inline const es_context *P##_context_craw(const P##_context *ctx) \
    {                                                                         \
        return (const es_context *)(const void *)ctx;                         \
    }                                                                         \
    static inline int P##_record_new(const es_uuid *id, const EVENT *event,   \
                                     P##_context **out, es_error *err)        \
    {                                                                         \
        es_context *ctx = NULL;                                               \
        int rc = es_context_record_new(&(TYPE), id, event, &ctx, err);        \
        if (rc == 0) *out = (P##_context *)(void *)ctx;                       \
        return rc;                                                            \
    }                                                                         \
    static inline int P##_record(P##_context *ctx, const EVENT *event,        \
                                 es_error *err)                               \
    {                                                                         \
        return es_context_record(P##_context_raw(ctx), event, err);           \
    }                                                                         \
    static inline int P##_save(es_txn *txn, P##_context *ctx, es_error *err)  \
    {                                                                         \
        return es_context_save(txn, P##_context_raw(ctx), err);               \
    }                                                                         \
    static inline int P##_load(es_txn *txn, const es_uuid *id,                \
                               P##_context **out, es_error *err)              \
    {                                                                         \
        es_context *ctx = NULL;                                               \
        int rc = es_context_load(txn, &(TYPE), id, &ctx, err);                \
        if (rc == 0) *out = (P##_context *)(void *)ctx;                       \
        return rc;                                                            \
    }                                                                         \
    static inline int P##_store_load(es_store *store, const es_uuid *id,      \
                                     P##_context **out, es_error *err)        \
    {                                                                         \
        es_context *ctx = NULL;                                               \
        int rc = es_store_load(store, &(TYPE), id, &ctx, err);                \
        if (rc == 0) *out = (P##_context *)(void *)ctx;                       \
        return rc;                                                            \
    }                                                                         \
    static inline int P##_clone(const P##_context *ctx, P##_context **out,    \
                                es_error *err)                                \
    {                                                                         \
        es_context *copy = NULL;                                              \
        int rc = es_context_clone(P##_context_craw(ctx), &copy, err);         \
        if (rc == 0) *out = (P##_context *)(void *)copy;                      \
        return rc;                                                            \
    }                                                                         \
    static inline const STATE *P##_state(const P##_context *ctx)              \
    {                                                                         \
        return (const STATE *)es_context_state(P##_context_craw(ctx));        \
    }                                                                         \
    static inline uint64_t P##_version(const P##_context *ctx)                \
    {                                                                         \
        return es_context_version(P##_context_craw(ctx));                     \
    }                                                                         \
    static inline void P##_context_free(P##_context *ctx)                     \
    {                                                                         \
        es_context_free(P##_context_raw(ctx));                                \
    }                                                                         \
    static inline int P##_emit(es_side_effect_sink *sink,                     \
                               const SIDE_EFFECT *side_effect)                \
    {                                                                         \
        return es_side_effect_emit(sink, side_effect);                        \
    }                                                                         \
    static inline int P##_event_decode(const es_event *event, EVENT *out,     \
                                       es_error *err)                         \
    {                                                                         \
        return es_event_decode(&(TYPE), event, out, err);                     \
    }                                                                         \
    static inline int P##_side_effect_decode(const es_side_effect *se,        \
                                             SIDE_EFFECT *out, es_error *err) \
    {                                                                         \
        return es_side_effect_decode(&(TYPE), se, out, err);                  \
    }                                                                         \
    typedef int P##_es_declared_ /* swallows the caller's semicolon */

#endif
