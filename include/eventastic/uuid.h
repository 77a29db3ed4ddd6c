/**
 * @file uuid.h
 * @brief 128-bit ids for aggregates, events, commands and side
 * effects.  Where the library makes ids it makes UUIDv7 (time-ordered).
 */
#ifndef EVENTASTIC_UUID_H
#define EVENTASTIC_UUID_H

#include <stdbool.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/** A UUID as 16 bytes in network order.  Plain value; copy freely. */
typedef struct es_uuid {
    uint8_t bytes[16]; /**< the id, most significant byte first */
} es_uuid;

/** Length of the text form without the terminating NUL. */
#define ES_UUID_STRLEN 36

/**
 * Make a new UUIDv7 (48-bit Unix milliseconds, then random bits; ids made in
 * one process are strictly increasing).  Returns 0, ES_EINVAL if out is
 * NULL, or ES_EIO if the system gave no random bytes.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_uuid_v7(es_uuid *out);

/**
 * Parse the canonical text form (36 characters, hex digits in either case,
 * hyphens at 8-13-18-23).  Returns 0, or ES_EINVAL for NULL or a string that
 * is not a UUID (out is then left unchanged).  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD int es_uuid_parse(const char *text, es_uuid *out);

/**
 * Write the lower-case canonical form and a NUL into out (at least
 * ES_UUID_STRLEN + 1 bytes).  Returns out.  Thread: any.
 */
ES_EXPORT ES_ANY_THREAD char *es_uuid_format(const es_uuid *id,
                                             char out[ES_UUID_STRLEN + 1]);

/** True if both are the same id.  Thread: any. */
ES_EXPORT ES_ANY_THREAD bool es_uuid_equal(const es_uuid *a,
                                           const es_uuid *b);

/** memcmp-like order of two ids.  Thread: any. */
ES_EXPORT ES_ANY_THREAD int es_uuid_compare(const es_uuid *a,
                                            const es_uuid *b);

/** True for the nil UUID (all zero).  Thread: any. */
ES_EXPORT ES_ANY_THREAD bool es_uuid_is_nil(const es_uuid *id);

#ifdef __cplusplus
}
#endif
#endif
