/**
 * @file status.h
 * @brief status codes and the es_error detail record.
 *
 * Every fallible function returns int: 0 on success, a negative es_status on
 * failure.  An optional, caller-owned es_error receives the details; it is
 * filled without allocating, so it works also when memory has run out.
 */
#ifndef EVENTASTIC_STATUS_H
#define EVENTASTIC_STATUS_H

#include "common.h"
#include "uuid.h"

#ifdef __cplusplus
extern "C" {
#endif

/** The one table of status codes: X(name, value, message).  It yields
 *  the es_status enum, es_strerror() and es_status_name(). */
#define ES_STATUS_MAP(X)                                                      \
    X(OK, 0, "success")                                                       \
    X(ENOMEM, -1, "out of memory")                                            \
    X(EINVAL, -2, "invalid argument")                                         \
    X(EMISUSE, -3, "library misuse")                                          \
    X(ENOTFOUND, -4, "not found")                                             \
    X(ECONFLICT, -5, "version already taken (stale state)")                   \
    X(EIDEMPOTENCY, -6, "id already used with other content")                 \
    X(EAPPLY, -7, "event could not be applied")                               \
    X(EDECODE, -8, "stored data could not be decoded")                        \
    X(EDECRYPT, -9, "stored data could not be decrypted")                     \
    X(EFORGOTTEN, -10, "data was forgotten (key destroyed)")                  \
    X(EBUSY, -11, "queue full, try again later")                              \
    X(ECLOSED, -12, "closed")                                                 \
    X(ETIMEDOUT, -13, "timed out")                                            \
    X(EDB, -14, "database error")                                             \
    X(EIO, -15, "input/output error")                                         \
    X(EREJECTED, -16, "command rejected")                                     \
    X(EUNKNOWN, -17, "outcome unknown")                                       \
    X(EWRONGTYPE, -18, "aggregate id belongs to another aggregate type")

/** Status codes: 0 is success, failures are negative. */
typedef enum es_status {
/** @cond internal */
#define ES__STATUS_ENUM(name, value, msg) ES_##name = value,
    ES_STATUS_MAP(ES__STATUS_ENUM)
#undef ES__STATUS_ENUM
/** @endcond */
} es_status;

/**
 * Details of a failure.  Caller-owned; pass NULL where details are not
 * wanted.  Fields that do not apply are zero (nil UUIDs, empty strings).
 */
typedef struct es_error {
    int code;              /**< the es_status returned */
    int sys_errno;         /**< errno where a system call failed, else 0 */
    char sqlstate[6];      /**< SQLSTATE where PostgreSQL answered, else "" */
    es_uuid aggregate_id;  /**< aggregate concerned (ECONFLICT, EAPPLY, ...) */
    es_uuid event_id;      /**< event concerned (EAPPLY, EIDEMPOTENCY) */
    uint64_t version;      /**< version concerned (ECONFLICT) */
    char message[256];     /**< human-readable, never holds secrets */
} es_error;

/** Message for a status code ("unknown status" for others).  Static string.
 *  Thread: any. */
ES_EXPORT ES_ANY_THREAD const char *es_strerror(int status);

/** Name of a status code, e.g. "ES_ECONFLICT" ("ES_UNKNOWN_STATUS" for
 *  others).  Static string.  Thread: any. */
ES_EXPORT ES_ANY_THREAD const char *es_status_name(int status);

/** Reset an es_error to "no error".  NULL is a no-op.  Thread: any. */
ES_EXPORT ES_ANY_THREAD void es_error_clear(es_error *err);

#ifdef __cplusplus
}
#endif
#endif
