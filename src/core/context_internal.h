/*
 * What the host needs from a context beyond the public API (the first
 * three functions), and the contract between the files of the context:
 * context.c (the object, recording, accessors), load.c and save.c.
 * Never installed.
 */
#ifndef ES_CORE_CONTEXT_INTERNAL_H
#define ES_CORE_CONTEXT_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eventastic/context.h"
#include "eventastic/store.h"

/* Move the uncommitted events and the collected side effects out of ctx:
 * the arrays and every payload become the caller's (es__free each .data,
 * then the array).  ctx keeps its state and version, with empty lists.
 * Never fails. */
void es__context_take(es_context *ctx, es_event **events, size_t *n_events,
                      es_side_effect **side_effects, size_t *n_side_effects);

/* Free ctx but keep its state: returned, with its version in *version.
 * The uncommitted lists are dropped.  The host keeps idle aggregates like
 * this (a context costs 128 bytes of heap per resident aggregate). */
void *es__context_release(es_context *ctx, uint64_t *version);

/* A context around a state made by es__context_release (owned by the
 * context from then on).  NULL when out of memory (state untouched). */
es_context *es__context_adopt(const es_aggregate_type *type,
                              const es_uuid *id, uint64_t version,
                              void *state);

/* ---- between context.c, load.c and save.c ---- */

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

/* Empty a vector, freeing the payloads (the arrays stay). */
void es__ev_vec_clear(ev_vec *v);
void es__se_vec_clear(se_vec *v);
/* es__se_vec_clear, then the array. */
void es__se_vec_free(se_vec *v);

/* A context of type t for id with no state (version 0); NULL when out of
 * memory. */
es_context *es__context_new(const es_aggregate_type *t, const es_uuid *id);

/* Free a state of type t (state_free, then the memory); NULL is a no-op. */
void es__state_release(const es_aggregate_type *t, void *state);
/* The name of an event kind (event_kind_name), or its number in buf. */
const char *es__event_kind_name(const es_aggregate_type *t, int32_t kind,
                                char buf[16]);
/* Fill err for an event that could not be applied (ES_EAPPLY, or
 * ES_ENOMEM when rc says so) and return that code. */
int es__apply_error(es_error *err, const es_aggregate_type *t,
                    const es_uuid *agg, const es_uuid *event_id,
                    int32_t kind, const es_error *inner, int rc);
/* Side effects of one applied event into out (left empty on failure). */
int es__collect_side_effects(const es_aggregate_type *t,
                             const es_uuid *agg, const void *state,
                             const void *event, const es_uuid *event_id,
                             se_vec *out, es_error *err);

/* True when a stored event has the content (kind, data). */
bool es__event_same_content(const es_event *a, int32_t kind,
                            const uint8_t *data, size_t len);
/* Forget the context's idempotency clash (es_context_idempotency_clash). */
void es__context_clear_clash(es_context *ctx);
/* Keep copies of the saved and attempted events as the context's clash
 * and fill err: returns ES_EIDEMPOTENCY. */
int es__context_set_clash(es_context *ctx, const es_event *saved,
                          const es_event *attempted, es_error *err);

/* load.c: load the snapshot (when use_snapshot) and the stream after it
 * into ctx, a context without state.  ES_ENOTFOUND when there is no such
 * aggregate. */
int es__context_load_into(es_txn *txn, es_context *ctx, bool use_snapshot,
                          es_error *err);

#endif
