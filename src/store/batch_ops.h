/*
 * The batch writer of a backend, for the host: the commit items (one
 * command's writes each) with their statuses, and the table through which
 * the host's commit lanes hand many aggregates' items to the store, in as
 * few transactions as it can, blocking (write) or on a libevent loop
 * (lane_write).  A backend that has one points es_store_ops.batch at an
 * es__batch_ops; only store.c calls through it.  Kept out of
 * store_impl.h: lanes and event loops are the host's concepts, and only
 * the host and the backends' batch writers need them.  Never installed.
 */
#ifndef ES_BATCH_OPS_H
#define ES_BATCH_OPS_H

#include <stdbool.h>
#include <stddef.h>

#include "store/store_impl.h"

/* A commit lane of a backend's asynchronous batch writer (lane_open). */
typedef struct es__batch_lane es__batch_lane;
struct event_base;
/* Where a lane_write's time went, for the host's metrics (zero where a
 * writer does not know). */
typedef struct es__batch_timing {
    uint64_t commit_ns;   /* COMMIT sent -> its answer, summed */
    unsigned round_trips; /* round trips to the database */
} es__batch_timing;
/* A lane_write has set every item's status; committed: transactions;
 * timing: borrowed for the call. */
typedef void (*es__batch_done)(void *ud, size_t committed,
                               const es__batch_timing *timing);

/* Status of an item not written yet. */
#define ES__COMMIT_PENDING 1
/* Not committed: the database could not be reached (connection refused,
 * or lost before COMMIT was sent).  The caller hands the same items to
 * the batch writer again later (the writer takes them as pending). */
#define ES__COMMIT_RETRY 2
/* The answer to COMMIT was lost and reading the batch back did not
 * answer either: the transaction may or may not have committed.  Handed
 * to the batch writer again, the items are read back before anything is
 * written; never written again unread. */
#define ES__COMMIT_UNKNOWN 3

/* One command's writes: its events, their side effects and its command-id
 * record.  Items of one group (one actor) depend on the earlier items of
 * the group in the same batch: when one fails, the later ones fail with
 * ES_ECONFLICT unwritten. */
typedef struct es__commit_item {
    const char *type_name;
    es_uuid aggregate_id;
    const void *group;
    es_event *events; /* payloads owned by the item's owner */
    size_t n_events;
    es_side_effect *side_effects;
    size_t n_side_effects;
    es__command_record record; /* written when the store keeps them */
    int status; /* out: 0, or why the item was not committed */
    const char *why; /* out: a static message for a failed status, or NULL
                      * (the status name says it all) */
} es__commit_item;

/* items[from] failed with status: so do the later items of its group,
 * still ES__COMMIT_PENDING (ES_ECONFLICT: they were decided on its
 * events).  The one copy for every batch writer.  Thread: any. */
void es__commit_fail_group(es__commit_item **items, size_t n, size_t from,
                           int status);

/* True while some item is still ES__COMMIT_PENDING.  Thread: any. */
bool es__commit_any_pending(es__commit_item **items, size_t n);

typedef struct es__batch_ops {
    /* Commit lanes the host uses by default with write; 0: the host's
     * default for a database (several lanes overlap round trips).  The
     * memory store says 1: its writes hold one lock, and more lane
     * threads only contend for it (bench/bench_host.c). */
    unsigned lanes;
    /* Write many aggregates' items in as few transactions as it can,
     * with a constant number of statements each; the contract of
     * es__commit_batch (host/committer.h).  Items it could not place on
     * an aggregate are left ES__COMMIT_PENDING, and the caller writes
     * them the generic way.  One try, no waiting: when the database
     * cannot be reached the items come back ES__COMMIT_RETRY or
     * ES__COMMIT_UNKNOWN (above), and the caller decides when to hand
     * them in again.  Items ES__COMMIT_UNKNOWN on entry (all from one
     * transaction) are read back first.  *slot is the caller's own
     * connection, kept between calls (NULL at first; a broken one is
     * closed and replaced; closed with the txn table's
     * background_close), never one of the pool's; a backend without
     * connections ignores it.  Returns the number of transactions
     * committed.  Optional (NULL: the host writes every item the
     * generic way). */
    size_t (*write)(es_store *store, void **slot, es__commit_item **items,
                    size_t n);
    /* Optional: write on a libevent loop, without blocking it
     * (non-blocking libpq on the PostgreSQL store).  lane_open makes a
     * commit lane of the backend's on base (no I/O yet: it connects on
     * its first batch).  lane_write starts one write of items (same
     * contract, same statuses; items stay the caller's and untouched by
     * anyone else until done) and returns at once; done(ud, committed)
     * runs on the loop's thread when every item has its status, possibly
     * before lane_write returns.  One batch at a time per lane.
     * lane_close frees an idle lane and closes its connection, from any
     * thread once the loop no longer runs its events.  Called only on the
     * loop's thread, except lane_close. */
    int (*lane_open)(es_store *store, struct event_base *base,
                     es__batch_lane **out, es_error *err);
    void (*lane_write)(es__batch_lane *lane, es__commit_item **items,
                       size_t n, es__batch_done done, void *ud);
    void (*lane_close)(es__batch_lane *lane);
} es__batch_ops;

/* ---- the batch table, for the host (store.c calls through it) ---- */

/* True when the backend has a batch writer (batch->write). */
bool es__store_has_batch_writer(const es_store *store);
/* batch->write; only when es__store_has_batch_writer. */
size_t es__store_write_batch(es_store *store, void **slot,
                             es__commit_item **items, size_t n);
/* The backend's default number of commit lanes (0: the host's). */
unsigned es__store_batch_lanes(const es_store *store);
/* batch->lane_open; *out = NULL and 0 on a backend without asynchronous
 * lanes. */
int es__store_lane_open(es_store *store, struct event_base *base,
                        es__batch_lane **out, es_error *err);
/* lane_write and lane_close of a lane es__store_lane_open made. */
void es__store_lane_write(es_store *store, es__batch_lane *lane,
                          es__commit_item **items, size_t n,
                          es__batch_done done, void *ud);
void es__store_lane_close(es_store *store, es__batch_lane *lane);

#endif
