/*
 * The committer interface: how the host hands the writes of many
 * aggregates to the store as one batch.  The host queues items on its
 * commit lanes, which run batches on the host's commit loop;
 * es__commit_batch is the part that talks to the store.  A store with an
 * asynchronous batch writer (lane_write in store/batch_ops.h:
 * PostgreSQL) writes the same items with the same per-item statuses on
 * the host's commit loop, and es__commit_rest writes what it leaves
 * pending.  Never installed.
 *
 * What a replacement must keep (the host relies on it):
 * - items of one group (actor) are committed in the order they were
 *   handed over; with several lanes, a group's next batch waits for its
 *   previous one, or a group sticks to one lane;
 * - every item gets exactly one status, and 0 only once the transaction
 *   holding it committed (while the database cannot be reached, the lane
 *   keeps the items and tries again; ES_EUNKNOWN only when the host closes
 *   before the outcome could be read back);
 * - one group's failure never fails another group's items.
 */
#ifndef ES_HOST_COMMITTER_H
#define ES_HOST_COMMITTER_H

#include <stdbool.h>

#include "store/batch_ops.h"
#include "store/store_impl.h"

/* es__commit_item, ES__COMMIT_PENDING, es__commit_fail_group and
 * es__commit_any_pending live in store/batch_ops.h: a backend with a
 * batch writer (es__batch_ops.write) takes the same items. */

/* Rows an item adds to a batch (events and the command-id record). */
size_t es__commit_item_rows(const es__commit_item *item);

/*
 * Write items (status ES__COMMIT_PENDING on entry) in as few transactions
 * as it can: one, unless a part fails.  A part that fails (a version or an
 * event id taken: ES_ECONFLICT; a command id taken: ES_EIDEMPOTENCY; a
 * store error) is left out with its group's later items and the rest is
 * retried, so one aggregate's failure never fails another's commit.  When
 * a failed commit cannot be pinned on one aggregate, each group is
 * committed alone.  Sets every item's status; returns the number of
 * transactions that committed.  One try: items the database could not
 * take because it could not be reached come back ES__COMMIT_RETRY, and
 * items whose COMMIT answer was lost and not read back come back
 * ES__COMMIT_UNKNOWN (store/batch_ops.h); the caller waits and hands
 * the same items in again (they are read back before anything is
 * written).  *slot: the lane's own connection for the batch writer
 * (see write in store/batch_ops.h; NULL at first, closed with
 * es__store_background_close).  Thread: the commit loop's (blocking: only
 * a store without an asynchronous batch writer, e.g. memory).
 */
size_t es__commit_batch(es_store *store, void **slot, es__commit_item **items,
                        size_t n);

/* The part of es__commit_batch after the backend's batch writer: the
 * items still ES__COMMIT_PENDING, written the generic way (savepoint per
 * item, on pooled connections; blocking).  For the items an asynchronous
 * batch writer (lane_write) left pending.  Returns the number of
 * transactions that committed.  Thread: any; blocks on the database. */
size_t es__commit_rest(es_store *store, es__commit_item **items, size_t n);

#endif
