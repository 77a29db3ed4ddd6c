/*
 * The PostgreSQL store's outbox (eventastic/outbox.h): claim, finish,
 * list, get, requeue, purge and the statistics of side effects.
 */
#include "store/pg/pg_int.h"

/* ---- the outbox (see eventastic/outbox.h) ---- */

static const char *status_text(es_outbox_status st)
{
    switch (st) {
    case ES_OUTBOX_PENDING:
        return "pending";
    case ES_OUTBOX_DONE:
        return "done";
    case ES_OUTBOX_DEAD:
        return "dead";
    }
    return "pending";
}

static bool status_parse(const char *text, es_outbox_status *out)
{
    if (strcmp(text, "pending") == 0)
        *out = ES_OUTBOX_PENDING;
    else if (strcmp(text, "done") == 0)
        *out = ES_OUTBOX_DONE;
    else if (strcmp(text, "dead") == 0)
        *out = ES_OUTBOX_DEAD;
    else
        return false;
    return true;
}

/* A time in Unix ms, inside what timestamptz holds (4713 BC to 294276
 * AD), so that "before the end of time" (INT64_MAX) works as meant. */
static void be64_ms(uint8_t *p, int64_t ms)
{
    const int64_t lo = -200000000000000, hi = 9000000000000000;
    es__pg_be64(p, (uint64_t)(ms < lo ? lo : ms > hi ? hi : ms));
}

bool es__pg_col_i64(const PGresult *r, int row, int col, int64_t *out)
{
    if (PQgetisnull(r, row, col) || PQgetlength(r, row, col) != 8)
        return false;
    *out = (int64_t)es__pg_get64((const uint8_t *)PQgetvalue(r, row, col));
    return true;
}

/* The outbox operations run outside the caller's transactions: each takes
 * a pooled connection (statements commit one by one) and a data key cache
 * of its own, in a pg_txn that never BEGINs. */
static int ob_begin(pg_store *s, pg_txn *t, es_error *err)
{
    memset(t, 0, sizeof *t);
    t->base.store = &s->base;
    return es__pg_pool_get(s, &t->conn, false, err);
}

static void ob_end(pg_store *s, pg_txn *t)
{
    sodium_memzero(t->dek, sizeof t->dek);
    es__pg_pool_put(s, t->conn);
}

/* One row of OB_COLS into e; the payload (opened when sealed) stays in r
 * or plain.  On an error of the payload alone (ES_EDECRYPT,
 * ES_EFORGOTTEN) the rest of e is filled and the payload is empty. */
int es__pg_entry_read(pg_txn *t, const PGresult *r, int row, es_outbox_entry *e,
                      es_buf *plain, es_error *err)
{
    memset(e, 0, sizeof *e);
    es_side_effect *se = &e->side_effect;
    int32_t attempts;
    if (!es__pg_col_uuid(r, row, 0, &se->id) ||
        !es__pg_col_uuid(r, row, 1, &se->aggregate_id) ||
        !es__pg_col_uuid(r, row, 2, &se->event_id) ||
        !es__pg_col_i32(r, row, 3, &se->kind) ||
        !es__pg_col_bytes(r, row, 4, &se->data, &se->len) ||
        !es__pg_col_i32(r, row, 8, &attempts) || attempts < 0 ||
        !es__pg_col_i64(r, row, 9, &e->created_ms) ||
        !es__pg_col_i64(r, row, 10, &e->next_attempt_ms) ||
        !status_parse(PQgetvalue(r, row, 7), &e->status))
        return es__pg_bad_row(err, "outbox");
    e->attempts = (uint32_t)attempts;
    snprintf(e->aggregate_type, sizeof e->aggregate_type, "%s",
             PQgetvalue(r, row, 6));
    snprintf(e->last_error, sizeof e->last_error, "%s",
             PQgetvalue(r, row, 11));
    ad_buf ad;
    es__pg_ad_side_effect(&ad, se);
    int rc = es__pg_open_row(t, &se->aggregate_id, r, row, 5, &ad, plain,
                             &se->data, &se->len, err);
    if (rc != 0) {
        se->data = NULL;
        se->len = 0;
    }
    return rc;
}

static int entry_push_copy(es_outbox_entry_list *list, size_t *cap,
                           const es_outbox_entry *e)
{
    void *items = list->items;
    if (es__grow(&items, cap, list->count + 1, sizeof *list->items) != 0)
        return ES_ENOMEM;
    list->items = items;
    uint8_t *data = es__memdup(e->side_effect.data, e->side_effect.len);
    if (data == NULL) return ES_ENOMEM;
    list->items[list->count] = *e;
    list->items[list->count++].side_effect.data = data;
    return 0;
}

static int filter_arrays(const es__outbox_filter *f, size_t n, es_buf *types,
                         es_buf *kinds)
{
    int rc = es__pg_array_begin(types, OID_TEXT, n);
    if (rc == 0) rc = es__pg_array_begin(kinds, OID_INT4, n);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        rc = es__pg_array_item(types, f[i].type_name, strlen(f[i].type_name));
        if (rc == 0) rc = es__pg_array_i32(kinds, f[i].kind);
    }
    return rc;
}

int es__pg_outbox_claim(es_store *store, const char *owner, int64_t now,
                        int64_t lease_ms, uint32_t max_attempts,
                        const es__outbox_filter *filters, size_t nf, size_t max,
                        es_outbox_entry_list **out, es_error *err)
{
    pg_store *s = (pg_store *)store;
    es_outbox_entry_list *list = es__calloc(1, sizeof *list);
    es_buf ftypes = {0}, fkinds = {0};
    if (list == NULL || filter_arrays(filters, nf, &ftypes, &fkinds) != 0) {
        es__free(list);
        es_buf_free(&ftypes);
        es_buf_free(&fkinds);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    uint8_t now_b[8], lease_b[8], max_b[8], att_b[4];
    be64_ms(now_b, now);
    es__pg_be64(lease_b, (uint64_t)lease_ms);
    es__pg_be64(max_b, (uint64_t)(max > INT64_MAX ? INT64_MAX : max));
    es__pg_be32(att_b, max_attempts > INT32_MAX ? INT32_MAX : max_attempts);
    if (rc == 0) {
        const Oid types[4] = {OID_INT8, OID_INT4, OID_TEXT_ARRAY,
                              OID_INT4_ARRAY};
        const char *values[4] = {(const char *)now_b, (const char *)att_b,
                                 (const char *)ftypes.data,
                                 (const char *)fkinds.data};
        const int lens[4] = {8, 4, (int)ftypes.len, (int)fkinds.len};
        rc = es__pg_run(t.conn, "outbox: expire claims", s->sql[SQL_OB_EXPIRE],
                        4, types, values, lens, NULL, err);
    }
    /* One claim per aggregate type the filters name: each walks the
     * pending messages of its type in seq order (index on aggregate_type,
     * seq), so a backlog of other types costs nothing.  All messages of
     * an aggregate have its type, so per-aggregate order is whole within
     * one claim.  The first type claimed rotates, so that one type's
     * backlog cannot starve the others. */
    size_t cap = 0, start = nf ? atomic_fetch_add(&s->claim_turn, 1) % nf : 0;
    es_buf plain = {0};
    for (size_t k = 0; rc == 0 && k < nf && list->count < max; k++) {
        const char *type = filters[(start + k) % nf].type_name;
        bool seen = false; /* claimed already under another filter */
        for (size_t j = 0; j < k && !seen; j++)
            seen = strcmp(filters[(start + j) % nf].type_name, type) == 0;
        if (seen) continue;
        uint8_t left_b[8];
        es__pg_be64(left_b, (uint64_t)(max - list->count > INT64_MAX
                                           ? INT64_MAX
                                           : max - list->count));
        const Oid types[7] = {OID_INT8, OID_INT8, OID_TEXT_ARRAY,
                              OID_INT4_ARRAY, OID_INT8, OID_TEXT, OID_TEXT};
        const char *values[7] = {(const char *)now_b, (const char *)lease_b,
                                 (const char *)ftypes.data,
                                 (const char *)fkinds.data,
                                 (const char *)left_b, owner, type};
        const int lens[7] = {8, 8, (int)ftypes.len, (int)fkinds.len, 8,
                             (int)strlen(owner), (int)strlen(type)};
        PGresult *r = NULL;
        rc = es__pg_run(t.conn, "outbox: claim", s->sql[SQL_OB_CLAIM], 7, types,
                        values, lens, &r, err);
        for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
            es_outbox_entry e;
            es_error why = {0};
            int orc = es__pg_entry_read(&t, r, i, &e, &plain, &why);
            if (orc == ES_EDECRYPT || orc == ES_EFORGOTTEN) {
                /* It can never be delivered: a dead letter, with the
                 * reason; the others go on. */
                const Oid dtypes[3] = {OID_UUID, OID_TEXT, OID_TEXT};
                const char *dvalues[3] = {
                    (const char *)e.side_effect.id.bytes, owner,
                    why.message};
                const int dlens[3] = {16, (int)strlen(owner),
                                      (int)strlen(why.message)};
                rc = es__pg_run(t.conn, "outbox: dead letter",
                                s->sql[SQL_OB_DEAD], 3, dtypes, dvalues, dlens,
                                NULL, err);
                continue;
            }
            if (orc != 0) {
                rc = orc;
                if (err) *err = why;
                break;
            }
            if (entry_push_copy(list, &cap, &e) != 0)
                rc = es__error_set(err, ES_ENOMEM, "out of memory");
        }
        PQclear(r);
    }
    es_buf_free(&ftypes);
    es_buf_free(&fkinds);
    es_buf_free(&plain);
    if (t.conn != NULL) ob_end(s, &t);
    if (rc != 0) {
        /* The claims already taken simply expire. */
        es_outbox_entry_list_free(list);
        return rc;
    }
    *out = list;
    return 0;
}

int es__pg_outbox_finish(es_store *store, const es_uuid *id, const char *owner,
                         es_outbox_status status, int64_t now, int64_t next_ms,
                         const char *error, es_error *err)
{
    pg_store *s = (pg_store *)store;
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    if (rc != 0) return rc;
    char reason[256];
    if (error != NULL) snprintf(reason, sizeof reason, "%s", error);
    const char *st = status_text(status);
    uint8_t now_b[8], next_b[8];
    be64_ms(now_b, now);
    be64_ms(next_b, next_ms);
    const Oid types[6] = {OID_UUID, OID_TEXT, OID_TEXT, OID_INT8, OID_INT8,
                          OID_TEXT};
    const char *values[6] = {(const char *)id->bytes, owner, st,
                             (const char *)now_b, (const char *)next_b,
                             error ? reason : NULL};
    const int lens[6] = {16, (int)strlen(owner), (int)strlen(st), 8, 8,
                         error ? (int)strlen(reason) : 0};
    PGresult *r = NULL;
    rc = es__pg_run(t.conn, "outbox: finish", s->sql[SQL_OB_FINISH], 6, types,
                    values, lens, &r, err);
    bool changed = rc == 0 && strcmp(PQcmdTuples(r), "1") == 0;
    if (rc == 0) PQclear(r);
    if (rc == 0 && !changed) {
        rc = es__pg_run(t.conn, "outbox: finish", s->sql[SQL_OB_EXISTS], 1,
                        types, values, lens, &r, err);
        if (rc == 0) {
            bool exists = PQntuples(r) > 0;
            PQclear(r);
            rc = exists ? es__error_set(err, ES_ECONFLICT, "claim on the "
                                        "outbox message was lost (lease "
                                        "expired and taken by another)")
                        : es__error_set(err, ES_ENOTFOUND, "outbox message "
                                        "not found");
        }
    }
    ob_end(s, &t);
    return rc;
}

int es__pg_outbox_finish_many(es_store *store, const char *owner, int64_t now,
                              const es__outbox_outcome *v, size_t n,
                              size_t *lost, es_error *err)
{
    pg_store *s = (pg_store *)store;
    *lost = 0;
    if (n == 0) return 0;
    if (n > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "too many verdicts");
    es_buf ids = {0}, sts = {0}, nexts = {0}, errs = {0};
    int rc = es__pg_array_begin(&ids, OID_UUID, n);
    if (rc == 0) rc = es__pg_array_begin(&sts, OID_TEXT, n);
    if (rc == 0) rc = es__pg_array_begin(&nexts, OID_INT8, n);
    if (rc == 0) rc = es__pg_array_begin(&errs, OID_TEXT, n);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const char *st = status_text(v[i].status);
        rc = es__pg_array_item(&ids, v[i].id.bytes, 16);
        if (rc == 0) rc = es__pg_array_item(&sts, st, strlen(st));
        uint8_t next_b[8];
        be64_ms(next_b, v[i].next_attempt_ms);
        if (rc == 0) rc = es__pg_array_item(&nexts, next_b, 8);
        if (rc == 0)
            rc = es__pg_array_item(&errs, v[i].error,
                                   strnlen(v[i].error, sizeof v[i].error));
    }
    pg_txn t = {0};
    if (rc != 0)
        rc = es__error_set(err, ES_ENOMEM, "out of memory");
    else
        rc = ob_begin(s, &t, err);
    if (rc == 0) {
        uint8_t now_b[8];
        be64_ms(now_b, now);
        const Oid types[6] = {OID_TEXT, OID_INT8, OID_UUID_ARRAY,
                              OID_TEXT_ARRAY, OID_INT8_ARRAY,
                              OID_TEXT_ARRAY};
        const char *values[6] = {owner, (const char *)now_b,
                                 (const char *)ids.data,
                                 (const char *)sts.data,
                                 (const char *)nexts.data,
                                 (const char *)errs.data};
        const int lens[6] = {(int)strlen(owner), 8, (int)ids.len,
                             (int)sts.len, (int)nexts.len, (int)errs.len};
        PGresult *r = NULL;
        rc = es__pg_run(t.conn, "outbox: finish", s->sql[SQL_OB_FINISH_MANY], 6,
                        types, values, lens, &r, err);
        if (rc == 0) {
            unsigned long done = strtoul(PQcmdTuples(r), NULL, 10);
            *lost = done < n ? n - (size_t)done : 0;
            PQclear(r);
        }
        ob_end(s, &t);
    }
    es_buf_free(&ids);
    es_buf_free(&sts);
    es_buf_free(&nexts);
    es_buf_free(&errs);
    return rc;
}

int es__pg_outbox_list(es_store *store, es_outbox_status status, size_t limit,
                       es_outbox_entry_list **out, es_error *err)
{
    pg_store *s = (pg_store *)store;
    es_outbox_entry_list *list = es__calloc(1, sizeof *list);
    if (list == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    if (rc != 0) {
        es__free(list);
        return rc;
    }
    const char *st = status_text(status);
    uint8_t limit_b[8];
    es__pg_be64(limit_b, (uint64_t)(limit > INT64_MAX ? INT64_MAX : limit));
    const Oid types[2] = {OID_TEXT, OID_INT8};
    const char *values[2] = {st, (const char *)limit_b};
    const int lens[2] = {(int)strlen(st), 8};
    PGresult *r = NULL;
    rc = es__pg_run(t.conn, "outbox: list", s->sql[SQL_OB_LIST], 2, types,
                    values, lens, &r, err);
    size_t cap = 0;
    es_buf plain = {0};
    for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
        es_outbox_entry e;
        es_error why = {0};
        int orc = es__pg_entry_read(&t, r, i, &e, &plain, &why);
        if (orc == ES_EDECRYPT || orc == ES_EFORGOTTEN) {
            /* Listed without its payload, and the reason shown. */
            snprintf(e.last_error, sizeof e.last_error, "%s", why.message);
        } else if (orc != 0) {
            rc = orc;
            if (err) *err = why;
            break;
        }
        if (entry_push_copy(list, &cap, &e) != 0)
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
    }
    es_buf_free(&plain);
    PQclear(r);
    ob_end(s, &t);
    if (rc != 0) {
        es_outbox_entry_list_free(list);
        return rc;
    }
    *out = list;
    return 0;
}

int es__pg_outbox_get(es_store *store, const es_uuid *id, es_outbox_entry **out,
                      es_error *err)
{
    pg_store *s = (pg_store *)store;
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    if (rc != 0) return rc;
    const Oid types[1] = {OID_UUID};
    const char *values[1] = {(const char *)id->bytes};
    const int lens[1] = {16};
    PGresult *r = NULL;
    rc = es__pg_run(t.conn, "outbox: get", s->sql[SQL_OB_GET], 1, types, values,
                    lens, &r, err);
    if (rc == 0 && PQntuples(r) == 0)
        rc = es__error_set(err, ES_ENOTFOUND, "outbox message not found");
    es_buf plain = {0};
    es_outbox_entry e;
    if (rc == 0) rc = es__pg_entry_read(&t, r, 0, &e, &plain, err);
    if (rc == 0) {
        es_outbox_entry *copy = es__malloc(sizeof *copy + e.side_effect.len);
        if (copy == NULL) {
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
        } else {
            *copy = e;
            uint8_t *data = (uint8_t *)(copy + 1);
            if (e.side_effect.len > 0)
                memcpy(data, e.side_effect.data, e.side_effect.len);
            copy->side_effect.data = data;
            *out = copy;
        }
    }
    es_buf_free(&plain);
    PQclear(r);
    ob_end(s, &t);
    return rc;
}

/* NOTIFY the outbox channel (delivered when the statement's transaction
 * commits: at once outside a transaction). */
static int notify_channel(pg_store *s, PGconn *c, es_error *err)
{
    const Oid types[1] = {OID_TEXT};
    const char *values[1] = {s->channel};
    const int lens[1] = {(int)strlen(s->channel)};
    return es__pg_run(c, "outbox: notify", "SELECT pg_notify($1, '')", 1, types,
                      values, lens, NULL, err);
}

int es__pg_outbox_requeue(es_store *store, const es_uuid *id,
                          const char *type_name, int32_t kind, int64_t now,
                          size_t *count, es_error *err)
{
    pg_store *s = (pg_store *)store;
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    if (rc != 0) return rc;
    uint8_t now_b[8], kind_b[4];
    be64_ms(now_b, now);
    es__pg_be32(kind_b, (uint32_t)kind);
    PGresult *r = NULL;
    if (id != NULL) {
        const Oid types[2] = {OID_UUID, OID_INT8};
        const char *values[2] = {(const char *)id->bytes, (const char *)now_b};
        const int lens[2] = {16, 8};
        rc = es__pg_run(t.conn, "outbox: requeue", s->sql[SQL_OB_REQUEUE_ID], 2,
                        types, values, lens, &r, err);
    } else {
        const char *name = type_name ? type_name : "";
        const Oid types[3] = {OID_TEXT, OID_INT8, OID_INT4};
        const char *values[3] = {name, (const char *)now_b,
                                 (const char *)kind_b};
        const int lens[3] = {(int)strlen(name), 8, 4};
        rc = es__pg_run(t.conn, "outbox: requeue", s->sql[SQL_OB_REQUEUE_TYPE],
                        3, types, values, lens, &r, err);
    }
    size_t n = 0;
    if (rc == 0) {
        n = (size_t)strtoull(PQcmdTuples(r), NULL, 10);
        PQclear(r);
    }
    if (rc == 0 && n > 0 && s->notify) /* wake other processes' too */
        rc = notify_channel(s, t.conn, err);
    ob_end(s, &t);
    if (rc != 0) return rc;
    if (count) *count = n;
    if (id != NULL && n == 0)
        return es__error_set(err, ES_ENOTFOUND, "no dead letter with that id");
    if (n > 0) es__store_notify(store);
    return 0;
}

/* One bounded DELETE of retention (SQL_OB_PURGE, SQL_PURGE_COMMANDS):
 * $1 a time in Unix ms, $2 the limit; *count the rows it deleted. */
static int purge_batch(pg_store *s, int which, int64_t before_ms,
                       size_t limit, size_t *count, es_error *err)
{
    if (count) *count = 0;
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    if (rc != 0) return rc;
    uint8_t before_b[8], limit_b[8];
    be64_ms(before_b, before_ms);
    es__pg_be64(limit_b, limit > INT64_MAX ? INT64_MAX : (uint64_t)limit);
    const Oid types[2] = {OID_INT8, OID_INT8};
    const char *values[2] = {(const char *)before_b, (const char *)limit_b};
    const int lens[2] = {8, 8};
    PGresult *r = NULL;
    rc = es__pg_run(t.conn, es__pg_sql_info[which].name, s->sql[which], 2,
                    types, values, lens, &r, err);
    if (rc == 0) {
        if (count) *count = (size_t)strtoull(PQcmdTuples(r), NULL, 10);
        PQclear(r);
    }
    ob_end(s, &t);
    return rc;
}

int es__pg_outbox_purge(es_store *store, int64_t before_ms, size_t limit,
                        size_t *count, es_error *err)
{
    return purge_batch((pg_store *)store, SQL_OB_PURGE, before_ms, limit,
                       count, err);
}

int es__pg_purge_commands(es_store *store, int64_t before_ms, size_t limit,
                          size_t *count, es_error *err)
{
    return purge_batch((pg_store *)store, SQL_PURGE_COMMANDS, before_ms,
                       limit, count, err);
}

int es__pg_outbox_stats(es_store *store, int64_t now, es_outbox_stats *out,
                        es_error *err)
{
    pg_store *s = (pg_store *)store;
    memset(out, 0, sizeof *out);
    pg_txn t;
    int rc = ob_begin(s, &t, err);
    if (rc != 0) return rc;
    PGresult *r = NULL;
    rc = es__pg_run(t.conn, "outbox: stats", s->sql[SQL_OB_STATS], 0, NULL,
                    NULL, NULL, &r, err);
    int64_t pending = 0, dead = 0, done = 0, oldest = 0;
    if (rc == 0 &&
        (PQntuples(r) != 1 || !es__pg_col_i64(r, 0, 0, &pending) ||
         !es__pg_col_i64(r, 0, 1, &dead) || !es__pg_col_i64(r, 0, 2, &done) ||
         !es__pg_col_i64(r, 0, 3, &oldest)))
        rc = es__pg_bad_row(err, "outbox: stats");
    PQclear(r);
    ob_end(s, &t);
    if (rc != 0) return rc;
    out->pending = (uint64_t)pending;
    out->dead = (uint64_t)dead;
    out->done = (uint64_t)done;
    if (pending > 0 && now > oldest) out->oldest_pending_age_ms = now - oldest;
    return 0;
}
