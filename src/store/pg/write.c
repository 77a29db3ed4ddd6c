/*
 * The PostgreSQL store's writes of one save (the per-save path, not the
 * batch writer): events, side effects, command ids, snapshots.
 */
#include "store/pg/pg_int.h"

/* ---- writes ---- */

static int too_large(es_error *err, size_t len)
{
    return es__error_set(err, ES_EINVAL, "payload of %zu bytes is larger "
                         "than PostgreSQL's 1 GiB field limit", len);
}

int es__pg_insert_events(es_txn *txn, const char *type_name, const es_uuid *agg,
                         const es_event *events, size_t n, bool *inserted,
                         es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    for (size_t i = 0; i < n; i++) inserted[i] = false;
    if (n == 0) return 0;
    if (n > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "too many events in one save");
    /* The data key first: it may be made now, in this savepoint. */
    dek_entry key;
    memset(&key, 0, sizeof key);
    if (s->encrypt) {
        const dek_entry *d = NULL;
        int rc = es__pg_get_dek(t, agg, true, &d, err);
        if (rc != 0) return rc;
        key = *d;
    }
    es_buf ver = {0}, ids = {0}, kinds = {0}, data = {0};
    int rc = es__pg_array_begin(&ver, OID_INT8, n);
    if (rc == 0) rc = es__pg_array_begin(&ids, OID_UUID, n);
    if (rc == 0) rc = es__pg_array_begin(&kinds, OID_INT4, n);
    if (rc == 0) rc = es__pg_array_begin(&data, OID_BYTEA, n);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const es_event *e = &events[i];
        if (e->version > INT64_MAX) {
            rc = ES_EINVAL;
            es__error_set(err, rc, "version %llu does not fit a bigint",
                          (unsigned long long)e->version);
            break;
        }
        if (e->len > MAX_PAYLOAD) {
            rc = too_large(err, e->len);
            break;
        }
        rc = es__pg_array_i64(&ver, (int64_t)e->version);
        if (rc == 0) rc = es__pg_array_item(&ids, e->id.bytes, 16);
        if (rc == 0) rc = es__pg_array_i32(&kinds, e->kind);
        if (rc == 0 && s->encrypt) {
            ad_buf ad;
            es__pg_ad_event(&ad, agg, e->version);
            rc = es__pg_array_sealed(&data, key.dek, &ad, e->data, e->len);
        } else if (rc == 0) {
            rc = es__pg_array_item(&data, e->data, e->len);
        }
    }
    sodium_memzero(key.dek, sizeof key.dek);
    if (rc == ES_ENOMEM) es__error_set(err, rc, "out of memory");
    PGresult *r = NULL;
    if (rc == 0 && (ver.len > INT32_MAX || data.len > INT32_MAX))
        rc = es__error_set(err, ES_EINVAL, "one save of %zu bytes is too "
                           "large for one statement", data.len);
    if (rc == 0) {
        const Oid types[7] = {OID_TEXT, OID_UUID, OID_INT8_ARRAY,
                              OID_UUID_ARRAY, OID_INT4_ARRAY,
                              OID_BYTEA_ARRAY, OID_TEXT};
        const char *values[7] = {type_name, (const char *)agg->bytes,
                                 (const char *)ver.data,
                                 (const char *)ids.data,
                                 (const char *)kinds.data,
                                 (const char *)data.data,
                                 s->encrypt ? key.kek : NULL};
        const int lens[7] = {(int)strlen(type_name), 16, (int)ver.len,
                             (int)ids.len, (int)kinds.len, (int)data.len,
                             (int)strlen(key.kek)};
        rc = es__pg_run(t->conn, "insert events", s->sql[SQL_INSERT_EVENTS], 7,
                        types, values, lens, &r, err);
    }
    es_buf_free(&ver);
    es_buf_free(&ids);
    es_buf_free(&kinds);
    es_buf_free(&data);
    if (rc != 0) return rc;
    int rows = PQntuples(r);
    if (rows > 0) t->wrote_events = true;
    for (int i = 0; rc == 0 && i < rows; i++) {
        if (!PQgetisnull(r, i, 2)) {
            rc = es__wrong_type(err, agg, PQgetvalue(r, i, 2), type_name);
            break;
        }
        uint64_t v;
        es_uuid id;
        if (!es__pg_col_u64(r, i, 0, &v) || !es__pg_col_uuid(r, i, 1, &id)) {
            rc = es__pg_bad_row(err, "insert events");
            break;
        }
        /* The events of a save have consecutive versions: look there
         * first, so 150,000 rows take linear time. */
        size_t k = (size_t)(v - events[0].version);
        if (v >= events[0].version && k < n && !inserted[k] &&
            es_uuid_equal(&events[k].id, &id)) {
            inserted[k] = true;
            continue;
        }
        for (k = 0; k < n; k++)
            if (!inserted[k] && events[k].version == v &&
                es_uuid_equal(&events[k].id, &id)) {
                inserted[k] = true;
                break;
            }
    }
    PQclear(r);
    if (rc != 0)
        for (size_t i = 0; i < n; i++) inserted[i] = false;
    return rc;
}

int es__pg_insert_side_effects(es_txn *txn, const char *type_name,
                               const es_side_effect *items, size_t n,
                               es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    if (n == 0) return 0;
    if (n > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "too many side effects");
    es_buf ids = {0}, aggs = {0}, evs = {0}, kinds = {0}, data = {0};
    es_buf keys = {0};
    int rc = es__pg_array_begin(&ids, OID_UUID, n);
    if (rc == 0) rc = es__pg_array_begin(&aggs, OID_UUID, n);
    if (rc == 0) rc = es__pg_array_begin(&evs, OID_UUID, n);
    if (rc == 0) rc = es__pg_array_begin(&kinds, OID_INT4, n);
    if (rc == 0) rc = es__pg_array_begin(&data, OID_BYTEA, n);
    if (rc == 0) rc = es__pg_array_begin(&keys, OID_TEXT, n);
    if (rc == 0 && !s->encrypt) keys.data[7] = 1; /* has NULLs */
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const es_side_effect *e = &items[i];
        if (e->len > MAX_PAYLOAD) {
            rc = too_large(err, e->len);
            break;
        }
        rc = es__pg_array_item(&ids, e->id.bytes, 16);
        if (rc == 0) rc = es__pg_array_item(&aggs, e->aggregate_id.bytes, 16);
        if (rc == 0) rc = es__pg_array_item(&evs, e->event_id.bytes, 16);
        if (rc == 0) rc = es__pg_array_i32(&kinds, e->kind);
        if (rc != 0) break;
        if (!s->encrypt) {
            rc = es__pg_array_item(&data, e->data, e->len);
            if (rc == 0) rc = es__pg_put32(&keys, 0xffffffffu); /* NULL */
            continue;
        }
        const dek_entry *d = NULL;
        if ((rc = es__pg_get_dek(t, &e->aggregate_id, true, &d, err)) != 0)
            break;
        ad_buf ad;
        es__pg_ad_side_effect(&ad, e);
        rc = es__pg_array_sealed(&data, d->dek, &ad, e->data, e->len);
        if (rc == 0) rc = es__pg_array_item(&keys, d->kek, strlen(d->kek));
    }
    if (rc == ES_ENOMEM) es__error_set(err, rc, "out of memory");
    if (rc == 0 && data.len > INT32_MAX)
        rc = es__error_set(err, ES_EINVAL, "side effects too large for one "
                                           "statement");
    if (rc == 0) {
        const Oid types[8] = {OID_UUID_ARRAY, OID_UUID_ARRAY, OID_UUID_ARRAY,
                              OID_INT4_ARRAY, OID_BYTEA_ARRAY,
                              OID_TEXT_ARRAY, OID_TEXT, OID_TEXT};
        const char *values[8] = {(const char *)ids.data,
                                 (const char *)aggs.data,
                                 (const char *)evs.data,
                                 (const char *)kinds.data,
                                 (const char *)data.data,
                                 (const char *)keys.data, type_name,
                                 s->channel};
        const int lens[8] = {(int)ids.len, (int)aggs.len, (int)evs.len,
                             (int)kinds.len, (int)data.len, (int)keys.len,
                             (int)strlen(type_name), (int)strlen(s->channel)};
        PGresult *r = NULL;
        rc = es__pg_run(t->conn, "insert side effects",
                        s->sql[SQL_INSERT_SIDE_EFFECTS], 8, types, values, lens,
                        &r, err);
        if (rc == 0 && strcmp(PQcmdTuples(r), "0") != 0)
            t->wrote_side_effects = true;
        if (rc == 0) PQclear(r);
    }
    es_buf_free(&keys);
    es_buf_free(&ids);
    es_buf_free(&aggs);
    es_buf_free(&evs);
    es_buf_free(&kinds);
    es_buf_free(&data);
    return rc;
}

int es__pg_store_snapshot(es_txn *txn, const es_snapshot *snap, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    if (snap->version > INT64_MAX || snap->snapshot_version > INT64_MAX)
        return es__error_set(err, ES_EINVAL, "snapshot version or version "
                                             "does not fit a bigint");
    if (snap->len > MAX_PAYLOAD) return too_large(err, snap->len);
    uint8_t sv[8], v[8];
    es__pg_be64(sv, snap->snapshot_version);
    es__pg_be64(v, snap->version);
    static const uint8_t empty[1] = {0};
    const uint8_t *payload = snap->data ? snap->data : empty;
    size_t len = snap->len;
    es_buf sealed = {0};
    char kek[ES_PG_KEY_ID_MAX + 1] = "";
    if (s->encrypt) {
        const dek_entry *d = NULL;
        int rc = es__pg_get_dek(t, &snap->aggregate_id, true, &d, err);
        if (rc != 0) return rc;
        ad_buf ad;
        es__pg_ad_snapshot(&ad, &snap->aggregate_id, snap->snapshot_version,
                           snap->version);
        if (es__pg_seal_append(&sealed, d->dek, &ad, payload, len) != 0)
            return es__error_set(err, ES_ENOMEM, "out of memory");
        strcpy(kek, d->kek);
        payload = sealed.data;
        len = sealed.len;
    }
    const Oid types[5] = {OID_UUID, OID_INT8, OID_INT8, OID_BYTEA, OID_TEXT};
    const char *values[5] = {(const char *)snap->aggregate_id.bytes,
                             (const char *)sv, (const char *)v,
                             (const char *)payload,
                             s->encrypt ? kek : NULL};
    const int lens[5] = {16, 8, 8, (int)len, (int)strlen(kek)};
    int rc = es__pg_run(t->conn, "store snapshot", s->sql[SQL_STORE_SNAPSHOT],
                        5, types, values, lens, NULL, err);
    es_buf_free(&sealed);
    return rc;
}

int es__pg_delete_snapshots(es_txn *txn, const es_uuid *agg, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    const Oid types[1] = {OID_UUID};
    const char *values[1] = {(const char *)agg->bytes};
    const int lens[1] = {16};
    return es__pg_run(t->conn, "delete snapshots", s->sql[SQL_DELETE_SNAPSHOTS],
                      1, types, values, lens, NULL, err);
}
