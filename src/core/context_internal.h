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

#endif
