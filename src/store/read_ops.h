/*
 * The read side of a backend (eventastic/subscription.h): the global
 * order of events and the checkpoints of projections.  A backend that
 * has them points es_store_ops.read at a table of these; only
 * src/read/ and store.c call them.  Never installed.
 */
#ifndef ES_READ_OPS_H
#define ES_READ_OPS_H

#include <stdbool.h>
#include <stdint.h>

#include "eventastic/subscription.h"
#include "store/store_impl.h"

/* Longest projection name, in bytes (es_checkpoint.name holds it). */
#define ES__CHECKPOINT_NAME_MAX 63

typedef struct es__read_ops {
    /* es_store_read_all's contract, arguments already checked (after is
     * never NULL; max >= 1; count and last never NULL).  An event of a
     * forgotten aggregate is handed over with forgotten set, never as an
     * error. */
    int (*read_all)(es_store *store, const es_position *after, size_t max,
                    es_read_fn fn, void *ud, size_t *count,
                    es_position *last, es_error *err);
    /* es_store_head's contract. */
    int (*head)(es_store *store, es_position *out, es_error *err);
    /* Readable events after *after: *events counts them up to cap (exact
     * below it), *oldest_ms is the created time of the first of them (0
     * when none). */
    int (*lag)(es_store *store, const es_position *after, uint64_t cap,
               uint64_t *events, int64_t *oldest_ms, es_error *err);
    /* A checkpoint by name (checked: 1..63 bytes of [A-Za-z0-9_.-]).
     * get: *found false (and *out zero) when there is none. */
    int (*checkpoint_get)(es_store *store, const char *name,
                          es_position *out, bool *found, es_error *err);
    /* Insert or update, inside txn: it commits with txn. */
    int (*checkpoint_put)(es_txn *txn, const char *name,
                          const es_position *pos, es_error *err);
    /* Delete inside txn; *found says whether there was one. */
    int (*checkpoint_delete)(es_txn *txn, const char *name, bool *found,
                             es_error *err);
    /* All, by name; *out: es__malloc'd array (es_free), NULL when n 0. */
    int (*checkpoint_list)(es_store *store, es_checkpoint **out, size_t *n,
                           es_error *err);
    /* Optional (NULL: commits of this process only, through the event
     * listeners below): hear of commits of events by any process, with
     * the contract of the outbox's watch (store_impl.h): the PostgreSQL
     * store LISTENs on its events channel, which every writing process's
     * announcer notifies. */
    int (*watch)(es_store *store, int64_t retry_max_ms, es__watch_fn fn,
                 void *ud, es__outbox_watch **out, es_error *err);
    void (*unwatch)(es__outbox_watch *watch);
} es__read_ops;

/* Event listeners: called after a commit of this process stored events
 * (backends call es__store_notify_events; the memory store and the
 * batch writers after each commit that stored any).  The callback runs
 * on the committing thread and must only signal (no calls into the
 * store).  add: ES_EBUSY when full. */
typedef void (*es__event_listener)(void *ud);
int es__store_listen_events(es_store *store, es__event_listener fn,
                            void *ud);
void es__store_unlisten_events(es_store *store, es__event_listener fn,
                               void *ud);
void es__store_notify_events(es_store *store);

/* True when name is a valid checkpoint name; else fills err
 * (ES_EINVAL, saying which rule failed). */
bool es__checkpoint_name_ok(const char *name, es_error *err);

#endif
