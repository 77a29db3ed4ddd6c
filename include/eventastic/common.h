/**
 * @file common.h
 * @brief export macro, thread markers, allocator hook.
 *
 * Thread markers expand to nothing; they say where a function may be called:
 *   ES_ANY_THREAD   from any thread, concurrently with other calls
 *   ES_SETUP_ONLY   before any other use of the library, from one thread
 *   ES_OWNER_THREAD from one thread at a time per object (not thread-safe
 *                   for one object; distinct objects may be used at once)
 */
#ifndef EVENTASTIC_COMMON_H
#define EVENTASTIC_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Marks the public API: the only symbols the shared library exports. */
#if defined(__GNUC__) && __GNUC__ >= 4
#define ES_EXPORT __attribute__((visibility("default")))
#else
#define ES_EXPORT
#endif

/** Thread marker: callable from any thread, concurrently. */
#define ES_ANY_THREAD
/** Thread marker: setup only, before any other use, from one thread. */
#define ES_SETUP_ONLY
/** Thread marker: one thread at a time per object. */
#define ES_OWNER_THREAD

/** Major version: changes when the API or ABI breaks. */
#define ES_VERSION_MAJOR 0
/** Minor version: additions only; existing symbols and layouts stay. */
#define ES_VERSION_MINOR 1
/** Patch version: fixes only. */
#define ES_VERSION_PATCH 0
/** The version as text. */
#define ES_VERSION_STRING "0.1.0"

/**
 * Run-time version string of the linked library, e.g. "0.1.0".
 * Thread: any.  Returns a static string; never NULL.
 */
ES_EXPORT ES_ANY_THREAD const char *es_version(void);

/**
 * Replace the allocator used for everything the library allocates.
 *
 * All three functions must be given and behave like malloc, realloc and
 * free.  Returns 0, or ES_EINVAL if one is NULL (nothing is changed).
 * Thread: setup only, before any other call; memory allocated before the
 * change must not be freed after it.
 */
ES_EXPORT ES_SETUP_ONLY int es_set_allocator(void *(*malloc_fn)(size_t),
                                             void *(*realloc_fn)(void *,
                                                                 size_t),
                                             void (*free_fn)(void *));

/** Free memory the library handed to the caller (where a header says so).
 *  NULL is a no-op.  Thread: any. */
ES_EXPORT ES_ANY_THREAD void es_free(void *ptr);

#ifdef __cplusplus
}
#endif
#endif
