/*
 * The data keys of a lane's batch (encryption at rest): read FOR SHARE in
 * one round trip, the missing ones made and stored in a second; a key
 * that cannot be had fails the items of its aggregate only.
 */
#include "store/pg/pg_int.h"

/* ---- the data keys (encryption at rest) ---- */

/* An item needs its aggregate's data key for its events, or for the
 * reason of its rejection (sealed like them). */
static bool item_needs_key(const es__commit_item *it)
{
    return it->n_events > 0 || it->record.rejected;
}

/* Fail the groups of the pending items that need agg's key. */
static void keys_fail(pg_lane *l, const es_uuid *agg, int status)
{
    for (size_t i = 0; i < l->n; i++) {
        es__commit_item *it = l->items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        bool uses = item_needs_key(it) &&
                    es_uuid_equal(&it->aggregate_id, agg);
        for (size_t j = 0; !uses && j < it->n_side_effects; j++)
            uses = es_uuid_equal(&it->side_effects[j].aggregate_id, agg);
        if (uses) es__pg_batch_fail_group(l->items, l->n, i, status);
    }
}

static int keys_add(pg_lane *l, const dek_entry *d)
{
    batch_keys *k = &l->keys;
    if (k->n == l->keys_cap) {
        size_t nc = l->keys_cap ? l->keys_cap * 2 : 16;
        dek_entry *e = es__calloc(nc, sizeof *e);
        if (e == NULL) return ES_ENOMEM;
        if (k->n) memcpy(e, k->e, k->n * sizeof *e);
        size_t n = k->n;
        es__pg_batch_keys_free(k);
        k->e = e;
        k->n = n;
        l->keys_cap = nc;
    }
    k->e[k->n++] = *d;
    return 0;
}

static int uuid_cmp(const void *a, const void *b)
{
    return memcmp(((const es_uuid *)a)->bytes, ((const es_uuid *)b)->bytes,
                  16);
}

static void keys_ask(pg_lane *l);

/* The keys are in (or their groups failed): sorted, then the writes. */
static void keys_done(pg_lane *l)
{
    if (l->keys.n > 1)
        qsort(l->keys.e, l->keys.n, sizeof *l->keys.e, es__pg_dek_cmp);
    es__pg_txn_write(l);
}

void es__pg_keys_stored(pg_lane *l, bool ok)
{
    if (!ok) {
        es__pg_lane_lost(l, "store data key");
        es__pg_txn_failed(l);
        return;
    }
    size_t m = 0, k = 0;
    for (size_t i = 0; i < l->n_need; i++) {
        if (es_uuid_is_nil(&l->made[i].agg)) continue; /* not made */
        const PGresult *r = es__pg_lane_res(l, k++);
        if (r == NULL || !es__pg_res_ok(r)) {
            es__pg_db_error(l->conn, r, &l->err, "store data key");
            es__pg_txn_rollback(l);
            return;
        }
        if (strcmp(PQcmdTuples((PGresult *)r), "1") != 0)
            l->need[m++] = l->need[i]; /* another made one first */
        else if (keys_add(l, &l->made[i]) != 0) {
            es__error_set(&l->err, ES_ENOMEM, "out of memory");
            es__pg_txn_rollback(l);
            return;
        }
    }
    sodium_memzero(l->made, l->n_need * sizeof *l->made);
    es__free(l->made);
    l->made = NULL;
    l->n_need = m;
    if (m == 0) {
        keys_done(l);
        return;
    }
    l->key_attempt++;
    keys_ask(l); /* read the ones another transaction made */
}

/* Make the missing keys and store them, in one round trip. */
static void keys_make(pg_lane *l)
{
    l->made = es__calloc(l->n_need, sizeof *l->made);
    if (l->made == NULL) {
        es__error_set(&l->err, ES_ENOMEM, "out of memory");
        es__pg_txn_rollback(l);
        return;
    }
    bool sent = es__pg_lane_rt_begin(l);
    for (size_t i = 0; sent && i < l->n_need; i++) {
        uint8_t wrapped[ES_PG_WRAPPED_MAX];
        size_t wlen = 0;
        es_error kerr = {0};
        int rc = es__pg_dek_new(l->s, &l->need[i], &l->made[i], wrapped, &wlen,
                                &kerr);
        if (rc != 0) {
            keys_fail(l, &l->need[i], rc);
            continue;
        }
        static const Oid types[3] = {OID_UUID, OID_TEXT, OID_BYTEA};
        const char *values[3] = {(const char *)l->need[i].bytes,
                                 l->made[i].kek, (const char *)wrapped};
        const int lens[3] = {16, (int)strlen(l->made[i].kek), (int)wlen};
        sent = PQsendQueryParams(l->conn, l->s->sql[SQL_PUT_KEY], 3, types,
                                 values, lens, es__pg_binary_formats, 1) == 1;
        sodium_memzero(wrapped, sizeof wrapped);
    }
    es__pg_lane_rt_go(l, sent, LANE_KEYS_STORING);
}

void es__pg_keys_read(pg_lane *l, bool ok)
{
    if (!ok) {
        es__pg_lane_lost(l, "read data key");
        es__pg_txn_failed(l);
        return;
    }
    size_t k = 0;
    if (!l->begun) {
        const PGresult *r = es__pg_lane_res(l, k++);
        if (r == NULL || !es__pg_res_ok(r)) {
            es__pg_db_error(l->conn, r, &l->err, "batch: begin");
            es__pg_txn_rollback(l);
            return;
        }
        l->begun = true;
    }
    size_t m = 0;
    for (size_t i = 0; i < l->n_need; i++) {
        const PGresult *r = es__pg_lane_res(l, k++);
        if (r == NULL || !es__pg_res_ok(r)) {
            es__pg_db_error(l->conn, r, &l->err, "read data key");
            es__pg_txn_rollback(l);
            return;
        }
        if (PQntuples(r) != 1) {
            l->need[m++] = l->need[i];
            continue;
        }
        dek_entry e;
        es_error kerr = {0};
        int rc = es__pg_dek_from_row(l->s, &l->need[i], r, 0, true, &e, &kerr);
        if (rc == 0 && keys_add(l, &e) != 0) rc = ES_ENOMEM;
        sodium_memzero(&e, sizeof e);
        if (rc != 0) keys_fail(l, &l->need[i], rc);
    }
    l->n_need = m;
    if (m == 0) {
        keys_done(l);
        return;
    }
    if (l->key_attempt > 0) { /* made by another, then gone: give up */
        for (size_t i = 0; i < m; i++) keys_fail(l, &l->need[i], ES_EDB);
        keys_done(l);
        return;
    }
    keys_make(l);
}

/* BEGIN (unless begun) and the keys in l->need, read FOR SHARE. */
static void keys_ask(pg_lane *l)
{
    bool sent = es__pg_lane_rt_begin(l);
    if (sent && !l->begun)
        sent = PQsendQueryParams(l->conn, "BEGIN ISOLATION LEVEL READ "
                                 "COMMITTED", 0, NULL, NULL, NULL, NULL,
                                 0) == 1;
    static const Oid types[1] = {OID_UUID};
    static const int lens[1] = {16};
    for (size_t i = 0; sent && i < l->n_need; i++) {
        const char *values[1] = {(const char *)l->need[i].bytes};
        sent = PQsendQueryParams(l->conn, l->s->sql[SQL_LOCK_KEY], 1, types,
                                 values, lens, es__pg_binary_formats, 1) == 1;
    }
    es__pg_lane_rt_go(l, sent, LANE_KEYS_READING);
}

/* The data keys of every aggregate the pending items write to (events,
 * side effects, a rejection's reason). */
void es__pg_keys_load(pg_lane *l)
{
    size_t cap = 0;
    for (size_t i = 0; i < l->n; i++)
        if (l->items[i]->status == ES__COMMIT_PENDING)
            cap += item_needs_key(l->items[i]) +
                   l->items[i]->n_side_effects;
    l->n_need = 0;
    if (cap > 0 && (l->need = es__calloc(cap, sizeof *l->need)) == NULL) {
        es__error_set(&l->err, ES_ENOMEM, "out of memory");
        es__pg_txn_failed(l);
        return;
    }
    for (size_t i = 0; i < l->n; i++) {
        es__commit_item *it = l->items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        if (item_needs_key(it)) l->need[l->n_need++] = it->aggregate_id;
        for (size_t j = 0; j < it->n_side_effects; j++)
            l->need[l->n_need++] = it->side_effects[j].aggregate_id;
    }
    if (l->n_need > 1) qsort(l->need, l->n_need, sizeof *l->need, uuid_cmp);
    size_t m = 0;
    for (size_t i = 0; i < l->n_need; i++)
        if (m == 0 || !es_uuid_equal(&l->need[m - 1], &l->need[i]))
            l->need[m++] = l->need[i];
    l->n_need = m;
    if (m == 0) {
        keys_done(l);
        return;
    }
    keys_ask(l);
}
