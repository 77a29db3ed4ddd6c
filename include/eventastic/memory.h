/**
 * @file memory.h
 * @brief the in-memory store, for tests and development.
 *
 * It has real transactions: writes are invisible to other transactions until
 * commit, rollback undoes them, commit is atomic, and it reports the same
 * errors as the PostgreSQL store for the same situations (a version or event
 * id taken by a concurrent transaction that committed first: ES_ECONFLICT at
 * commit).  Nothing is kept after es_store_close.
 */
#ifndef EVENTASTIC_MEMORY_H
#define EVENTASTIC_MEMORY_H

#include "store.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * Open an empty in-memory store.  *out is the caller's; close it with
 * es_store_close.  Errors: ES_EINVAL (out NULL), ES_ENOMEM.
 * Thread: any; the store may then be used from many threads at once.
 */
ES_EXPORT ES_ANY_THREAD int es_memory_store_open(es_store **out,
                                                 es_error *err);

/** Number of committed events in the store.  Thread: any. */
ES_EXPORT ES_ANY_THREAD size_t es_memory_store_event_count(es_store *store);

#ifdef __cplusplus
}
#endif
#endif
