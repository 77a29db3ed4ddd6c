/*
 * What the host needs from a context beyond the public API.  Never
 * installed.
 */
#ifndef ES_CORE_CONTEXT_INTERNAL_H
#define ES_CORE_CONTEXT_INTERNAL_H

#include "eventastic/context.h"

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

#endif
