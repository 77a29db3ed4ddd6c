/**
 * @file aggregate.h
 * @brief how an aggregate type is described to the library.
 *
 * An aggregate type is a table of callbacks (es_aggregate_type) that the
 * application defines once, as a static constant.  The library never looks
 * inside states, events or side effects: it keeps events and side effects
 * as bytes made by the type's codecs, and hands the application's own typed
 * values to apply and side_effects.  Use ES_AGGREGATE_DECLARE
 * (eventastic/typed.h) for a typed facade that the compiler checks.
 *
 * Content equality, the idempotency criterion, is "same kind and same
 * encoded bytes": codecs must be deterministic (equal values, equal bytes).
 */
#ifndef EVENTASTIC_AGGREGATE_H
#define EVENTASTIC_AGGREGATE_H

#include "common.h"
#include "status.h"
#include "uuid.h"

#ifdef __cplusplus
extern "C" {
#endif

/** A growable byte buffer that codecs append to. */
typedef struct es_buf {
    uint8_t *data; /**< owned by the buffer; library allocator */
    size_t len;    /**< bytes used */
    size_t cap;    /**< bytes allocated */
} es_buf;

/** Append n bytes.  Returns 0 or ES_ENOMEM (buf unchanged).  Thread: the
 *  buffer's owner. */
ES_EXPORT ES_OWNER_THREAD int es_buf_append(es_buf *buf, const void *data,
                                            size_t n);

/** Append a NUL-terminated string without its NUL.  Returns 0, ES_EINVAL
 *  (NULL) or ES_ENOMEM.  Thread: the buffer's owner. */
ES_EXPORT ES_OWNER_THREAD int es_buf_append_str(es_buf *buf, const char *s);

/** Free the buffer's memory and zero it.  NULL is a no-op. */
ES_EXPORT ES_OWNER_THREAD void es_buf_free(es_buf *buf);

/**
 * A stored or recorded event, as the library keeps it.  A borrowed view:
 * valid as long as the object that handed it out says.
 */
typedef struct es_event {
    es_uuid id;          /**< event id (idempotency key) */
    uint64_t version;    /**< 0 for the first event of an aggregate */
    int32_t kind;        /**< the application's event kind */
    const uint8_t *data; /**< encoded payload */
    size_t len;          /**< payload length in bytes */
} es_event;

/**
 * A side effect, as the library keeps it.  A borrowed view, like es_event.
 */
typedef struct es_side_effect {
    es_uuid id;           /**< stable id: handlers use it to act once */
    es_uuid aggregate_id; /**< aggregate whose event produced it */
    es_uuid event_id;     /**< event that produced it */
    int32_t kind;         /**< the application's side-effect kind */
    const uint8_t *data;  /**< encoded payload */
    size_t len;           /**< payload length in bytes */
} es_side_effect;

/** Where side_effects() puts the side effects of one event. */
typedef struct es_side_effect_sink es_side_effect_sink;

/**
 * Emit one side effect from inside an aggregate type's side_effects
 * callback.  The value is encoded with the type's side-effect codec at once
 * and not kept.  Returns 0, ES_EINVAL (NULL argument, nil id), ES_ENOMEM,
 * or what the codec returned.  Thread: the thread running the callback.
 */
ES_EXPORT ES_OWNER_THREAD int es_side_effect_emit(es_side_effect_sink *sink,
                                                  const void *side_effect);

/**
 * The description of an aggregate type.  All callbacks run on the thread
 * that called the library function that needs them, never concurrently for
 * one context.  Each returns 0 or a negative es_status, and may fill err.
 * Callbacks marked optional may be NULL.
 */
typedef struct es_aggregate_type {
    /** Name, stored with each event (1..63 characters). */
    const char *name;
    /** Version of the state's snapshot encoding; a stored snapshot of
     *  another version is ignored and the stream is replayed. */
    uint64_t snapshot_version;
    size_t state_size;       /**< sizeof the application's state type */
    size_t event_size;       /**< sizeof its event type */
    size_t side_effect_size; /**< sizeof its side-effect type */

    /** The id of an event value (its idempotency key). */
    es_uuid (*event_id)(const void *event);
    /** The kind of an event value. */
    int32_t (*event_kind)(const void *event);
    /** Name of an event kind, for messages (optional). */
    const char *(*event_kind_name)(int32_t kind);

    /** Build a state from a creation event.  state is zeroed memory of
     *  state_size bytes.  On failure the state is freed with state_free
     *  (if given) and discarded. */
    int (*apply_new)(void *state, const void *event, es_error *err);
    /** Apply a later event.  On failure the library restores the state as
     *  it was before the call (it applies to a copy). */
    int (*apply)(void *state, const void *event, es_error *err);
    /** Side effects of an event, called after the event was applied, with
     *  the new state.  Emit with es_side_effect_emit.  Optional. */
    int (*side_effects)(const void *state, const void *event,
                        es_side_effect_sink *sink, es_error *err);

    /** Deep copy of a state into zeroed dst (optional: memcpy). */
    int (*state_copy)(void *dst, const void *src, es_error *err);
    /** Free what a state owns, not the state itself (optional). */
    void (*state_free)(void *state);
    /** Snapshot codec: append the state's bytes to out. */
    int (*state_encode)(const void *state, es_buf *out, es_error *err);
    /** Snapshot codec: rebuild a state into zeroed memory; bad bytes give
     *  ES_EDECODE (the stream is then replayed). */
    int (*state_decode)(const uint8_t *data, size_t len, void *state,
                        es_error *err);

    /** Event codec: append the event's bytes to out (deterministic). */
    int (*event_encode)(const void *event, es_buf *out, es_error *err);
    /** Event codec: decode the stored kind and bytes into zeroed memory of
     *  event_size bytes; unknown kinds and bad bytes give ES_EDECODE. */
    int (*event_decode)(int32_t kind, const uint8_t *data, size_t len,
                        void *event, es_error *err);
    /** Free what a decoded event owns (optional). */
    void (*event_free)(void *event);

    /** Stable id of a side effect (required with side_effects). */
    es_uuid (*side_effect_id)(const void *side_effect);
    /** Kind of a side effect (required with side_effects). */
    int32_t (*side_effect_kind)(const void *side_effect);
    /** Side-effect codec: append its bytes (required with side_effects). */
    int (*side_effect_encode)(const void *side_effect, es_buf *out,
                              es_error *err);
    /** Side-effect codec: decode into zeroed memory of side_effect_size
     *  bytes; unknown kinds and bad bytes give ES_EDECODE. */
    int (*side_effect_decode)(int32_t kind, const uint8_t *data, size_t len,
                              void *side_effect, es_error *err);
    /** Free what a decoded side effect owns (optional). */
    void (*side_effect_free)(void *side_effect);
} es_aggregate_type;

/**
 * Check a type description: name length, sizes and required callbacks.
 * Returns 0 or ES_EINVAL with the reason in err.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_aggregate_type_check(
    const es_aggregate_type *type, es_error *err);

/**
 * Decode an event's payload into the application's value (zeroed by the
 * library first; event_size bytes).  Free it with es_event_value_free.
 * Returns 0, ES_EINVAL, or ES_EDECODE.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_event_decode(const es_aggregate_type *type,
                                            const es_event *event,
                                            void *value, es_error *err);

/** Free what a decoded event value owns (type->event_free).  Thread: any. */
ES_EXPORT ES_ANY_THREAD void es_event_value_free(
    const es_aggregate_type *type, void *value);

/**
 * Decode a side effect's payload, like es_event_decode.  Free it with
 * es_side_effect_value_free.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_side_effect_decode(
    const es_aggregate_type *type, const es_side_effect *side_effect,
    void *value, es_error *err);

/** Free what a decoded side-effect value owns.  Thread: any. */
ES_EXPORT ES_ANY_THREAD void es_side_effect_value_free(
    const es_aggregate_type *type, void *value);

#ifdef __cplusplus
}
#endif
#endif
