/*
 * es__commit_batch: many aggregates' writes in one transaction, with the
 * failing part isolated.  A backend with a batch writer (batch->write: the
 * PostgreSQL store) does it with a constant number of statements; what it
 * leaves pending comes here.  Each item is written under a savepoint, so an
 * item whose versions, event ids or command id are taken is rolled back
 * alone and the others stay in the transaction.  A commit that fails as a
 * whole is retried without the aggregate it names, or group by group.
 */
#include <string.h>

#include "core/backoff.h"
#include "core/internal.h"
#include "host/committer.h"

size_t es__commit_item_rows(const es__commit_item *item)
{
    return item->n_events + 1;
}

static int write_item(es_txn *txn, es__commit_item *it, es_error *err)
{
    int rc = es__txn_savepoint(txn, err);
    if (rc != 0) return rc;
    if (it->n_events > 0) {
        bool stack[32];
        bool *ins = it->n_events <= 32
                        ? stack
                        : es__calloc(it->n_events, sizeof(bool));
        if (ins == NULL) rc = es__error_set(err, ES_ENOMEM, "out of memory");
        if (rc == 0)
            rc = es__txn_insert_events(txn, it->type_name, &it->aggregate_id,
                                       it->events, it->n_events, ins, err);
        for (size_t i = 0; rc == 0 && i < it->n_events; i++)
            if (!ins[i])
                rc = es__error_set(err, ES_ECONFLICT, "version %llu or its "
                                   "event id is taken",
                                   (unsigned long long)it->events[i].version);
        if (ins != stack) es__free(ins);
    }
    if (rc == 0)
        rc = es__txn_insert_side_effects(txn, it->type_name, it->side_effects,
                                         it->n_side_effects, err);
    if (rc == 0 && es__store_has_commands(txn->store)) {
        bool ok = false;
        rc = es__txn_insert_commands(txn, &it->record, 1, &ok, err);
        if (rc == 0 && !ok)
            rc = es__error_set(err, ES_EIDEMPOTENCY, "command id is taken");
    }
    if (rc == 0) return es__txn_release(txn, err);
    es_error ignored = {0};
    es__txn_rollback_to(txn, &ignored);
    return rc;
}

static void mark(es__commit_item **items, size_t n, int from, int to)
{
    for (size_t i = 0; i < n; i++)
        if (items[i]->status == from) items[i]->status = to;
}

/* One transaction over the pending items.  Returns 1 when it committed;
 * else 0 with *commit_rc and err set when the commit itself failed (the
 * written items are pending again). */
static size_t attempt(es_store *store, es__commit_item **items, size_t n,
                      bool *written, int *commit_rc, es_error *err)
{
    *commit_rc = 0;
    es_txn *txn = NULL;
    /* on the commit loop: no round trip may wait for ever */
    int rc = es__store_begin_bounded(store, &txn, err);
    if (rc != 0) {
        mark(items, n, ES__COMMIT_PENDING,
             es__unreachable(err) ? ES__COMMIT_RETRY : rc);
        return 0;
    }
    size_t n_written = 0;
    for (size_t i = 0; i < n; i++) {
        written[i] = false;
        if (items[i]->status != ES__COMMIT_PENDING) continue;
        es_error item_err = {0};
        rc = write_item(txn, items[i], &item_err);
        if (rc != 0 && es__unreachable(&item_err)) {
            es_txn_rollback(txn);
            mark(items, n, ES__COMMIT_PENDING, ES__COMMIT_RETRY);
            return 0;
        }
        if (rc != 0)
            es__commit_fail_group(items, n, i, rc);
        else {
            written[i] = true;
            n_written++;
        }
    }
    if (n_written == 0) {
        es_txn_rollback(txn);
        return 0;
    }
    rc = es_txn_commit(txn, err);
    for (size_t i = 0; i < n; i++)
        if (written[i] && rc == 0) items[i]->status = 0;
    if (rc == 0) return 1;
    if (rc == ES_EUNKNOWN && es__store_has_batch_writer(store)) {
        /* the batch writer reads them back when handed in again */
        for (size_t i = 0; i < n; i++)
            if (written[i]) items[i]->status = ES__COMMIT_UNKNOWN;
        mark(items, n, ES__COMMIT_PENDING, ES__COMMIT_RETRY);
        return 0;
    }
    if (rc != ES_EUNKNOWN && es__unreachable(err)) {
        mark(items, n, ES__COMMIT_PENDING, ES__COMMIT_RETRY);
        return 0;
    }
    *commit_rc = rc;
    return 0;
}

size_t es__commit_batch(es_store *store, void **slot, es__commit_item **items,
                        size_t n)
{
    if (n == 0) return 0;
    size_t batched = 0;
    if (es__store_has_batch_writer(store)) {
        /* The backend's batch writer; what it leaves pending (a failure it
         * could not pin on an item) is written the generic way below, on
         * a pooled connection (rare: only such failures). */
        batched = es__store_write_batch(store, slot, items, n);
        if (!es__commit_any_pending(items, n)) return batched;
    }
    return batched + es__commit_rest(store, items, n);
}

size_t es__commit_rest(es_store *store, es__commit_item **items, size_t n)
{
    if (!es__commit_any_pending(items, n)) return 0;
    bool *written = es__calloc(n, sizeof(bool));
    es__commit_item **sub = es__calloc(n, sizeof *sub);
    if (written == NULL || sub == NULL) {
        es__free(written);
        es__free(sub);
        for (size_t i = 0; i < n; i++)
            if (items[i]->status == ES__COMMIT_PENDING)
                items[i]->status = ES_ENOMEM;
        return 0;
    }
    size_t committed = 0;
    while (es__commit_any_pending(items, n)) {
        int crc = 0;
        es_error err = {0};
        committed += attempt(store, items, n, written, &crc, &err);
        if (crc == 0) break;
        /* It may have committed: writing it again would find its own
         * command id taken and pass it off as a duplicate.  The host reads
         * the outcome back instead. */
        if (crc == ES_EUNKNOWN) {
            for (size_t i = 0; i < n; i++)
                if (written[i] && items[i]->status == ES__COMMIT_PENDING)
                    items[i]->status = ES_EUNKNOWN;
            continue;
        }
        /* The commit failed as a whole.  Pinned on one aggregate: retry
         * without it. */
        bool pinned = false;
        if (crc == ES_ECONFLICT && !es_uuid_is_nil(&err.aggregate_id)) {
            for (size_t i = 0; i < n; i++)
                if (items[i]->status == ES__COMMIT_PENDING &&
                    es_uuid_equal(&items[i]->aggregate_id,
                                  &err.aggregate_id)) {
                    es__commit_fail_group(items, n, i, ES_ECONFLICT);
                    pinned = true;
                }
        }
        if (pinned) continue;
        /* Otherwise each group alone, so only the guilty one fails. */
        for (size_t i = 0; i < n; i++) {
            if (items[i]->status != ES__COMMIT_PENDING) continue;
            size_t k = 0;
            for (size_t j = i; j < n; j++)
                if (items[j]->group == items[i]->group &&
                    items[j]->status == ES__COMMIT_PENDING)
                    sub[k++] = items[j];
            int grc = 0;
            es_error gerr = {0};
            committed += attempt(store, sub, k, written, &grc, &gerr);
            bool away = false;
            for (size_t j = 0; j < k; j++) {
                if (sub[j]->status == ES__COMMIT_PENDING)
                    sub[j]->status = grc != 0 ? grc : ES_ECONFLICT;
                away = away || sub[j]->status == ES__COMMIT_RETRY ||
                       sub[j]->status == ES__COMMIT_UNKNOWN;
            }
            /* The database went away: the rest waits with the lane (and
             * only one transaction's items may be unknown at a time:
             * one read-back answers for them all). */
            if (away) {
                mark(items, n, ES__COMMIT_PENDING, ES__COMMIT_RETRY);
                break;
            }
        }
        break;
    }
    es__free(written);
    es__free(sub);
    return committed;
}
