/*
 * Internal helpers shared by every part of the library.  Never installed.
 */
#ifndef ES_CORE_INTERNAL_H
#define ES_CORE_INTERNAL_H

#include <stdarg.h>
#include <stdbool.h>

#include "eventastic/aggregate.h"
#include "eventastic/common.h"
#include "eventastic/log.h"
#include "eventastic/status.h"

/* The allocator hook (es_set_allocator).  es__calloc zeroes. */
void *es__malloc(size_t n);
void *es__calloc(size_t count, size_t size);
void *es__realloc(void *p, size_t n);
void es__free(void *p);
char *es__strdup(const char *s);
void *es__memdup(const void *p, size_t n);

/* Fill err (if not NULL) with code and a printf-style message; returns
 * code, so that callers can write `return es__error_set(err, ...)`.  Never
 * allocates.  The other fields of err are cleared. */
int es__error_set(es_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Like es__error_set, but keeps a message a callback already wrote into
 * inner as the reason: "<prefix>: <inner message>". */
int es__error_wrap(es_error *err, int code, const es_error *inner,
                   const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* The monotonic clock (core/clock.c): durations, deadlines, metrics.
 * The wall clock is the public es_clock_now_ms. */
uint64_t es__mono_ns(void);
int64_t es__mono_ms(void);

/* Grow an array of elem-sized items to hold at least need items. */
int es__grow(void **items, size_t *cap, size_t need, size_t elem);

/* Log through es_log_set's callback (or stderr).  Never holds secrets. */
void es__log(es_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
bool es__log_enabled(es_log_level level);

#endif
