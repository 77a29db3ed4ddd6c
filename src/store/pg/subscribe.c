/*
 * The PostgreSQL store's read side (store/read_ops.h): every event in the
 * global order (txid, position), read only below the horizon
 * pg_snapshot_xmin(pg_current_snapshot()), and the checkpoints of
 * projections.  docs/read-side.md says why no reader misses, repeats or
 * waits for ever.  Reads run on a pooled connection outside any
 * transaction; checkpoint writes run in the caller's transaction.
 */
#include "store/pg/pg_int.h"

/* Columns of SQL_READ_ALL. */
enum {
    RA_TXID, RA_POSITION, RA_TYPE, RA_AGG, RA_VERSION, RA_EVENT_ID, RA_KIND,
    RA_PAYLOAD, RA_KEY, RA_CREATED
};

void es__pg_build_read_sql(pg_store *s, const es_pg_config *cfg,
                           const char *e)
{
    char p[2 * NAME_BUF + 8];
    es__pg_qualify(p, sizeof p, cfg->schema,
                   cfg->tables[ES_PG_TABLE_PROJECTIONS]);
    /* The order and the horizon: an index range scan of (txid, position)
     * from the reader's position, stopped at the first transaction that
     * may still be running (migration 12). */
#define AFTER "(e.txid, e.position) > ($1::bigint::text::xid8, $2::bigint) "
#define BELOW "e.txid < pg_snapshot_xmin(pg_current_snapshot()) "
    s->sql[SQL_READ_ALL] = es__pg_sqlf(
        "SELECT e.txid::text::bigint, e.position, e.aggregate_type, "
        "e.aggregate_id, e.version, e.event_id, e.kind, e.payload, e.key_id, "
        "(extract(epoch FROM e.created_at) * 1000)::bigint FROM %s e "
        "WHERE " AFTER "AND " BELOW "ORDER BY e.txid, e.position LIMIT $3",
        e);
    s->sql[SQL_HEAD] = es__pg_sqlf(
        "SELECT e.txid::text::bigint, e.position FROM %s e WHERE " BELOW
        "ORDER BY e.txid DESC, e.position DESC LIMIT 1", e);
    s->sql[SQL_LAG] = es__pg_sqlf(
        "SELECT count(*), coalesce(min(c), 0)::bigint FROM (SELECT "
        "(extract(epoch FROM e.created_at) * 1000)::bigint AS c FROM %s e "
        "WHERE " AFTER "AND " BELOW "ORDER BY e.txid, e.position LIMIT $3) "
        "AS s", e);
#undef AFTER
#undef BELOW
    s->sql[SQL_CP_GET] = es__pg_sqlf(
        "SELECT commit_pos, seq FROM %s WHERE name = $1", p);
    s->sql[SQL_CP_PUT] = es__pg_sqlf(
        "INSERT INTO %s (name, commit_pos, seq) VALUES ($1, $2, $3) "
        "ON CONFLICT (name) DO UPDATE SET commit_pos = excluded.commit_pos, "
        "seq = excluded.seq, updated_at = now()", p);
    s->sql[SQL_CP_DELETE] = es__pg_sqlf("DELETE FROM %s WHERE name = $1", p);
    s->sql[SQL_CP_LIST] = es__pg_sqlf(
        "SELECT name, commit_pos, seq, "
        "(extract(epoch FROM updated_at) * 1000)::bigint FROM %s "
        "ORDER BY name", p);
}

struct pg_conn *es_pg_txn_conn(es_txn *txn)
{
    if (txn == NULL || txn->store == NULL || txn->store->ops != &es__pg_ops)
        return NULL;
    return ((pg_txn *)txn)->conn;
}

/* Reads outside any transaction: a pooled connection and a data key
 * cache of their own (as the outbox's). */
static int reader_begin(pg_store *s, pg_txn *t, es_error *err)
{
    memset(t, 0, sizeof *t);
    t->base.store = &s->base;
    return es__pg_pool_get(s, &t->conn, false, err);
}

static void reader_end(pg_store *s, pg_txn *t)
{
    sodium_memzero(t->dek, sizeof t->dek);
    es__pg_pool_put(s, t->conn);
}

/* A position as two int8 parameters. */
static void position_params(const es_position *at, uint8_t c[8],
                            uint8_t q[8])
{
    /* Transaction ids and identity values both fit a bigint. */
    es__pg_be64(c, at->commit > INT64_MAX ? INT64_MAX : at->commit);
    es__pg_be64(q, at->seq > INT64_MAX ? INT64_MAX : at->seq);
}

static bool col_position(const PGresult *r, int row, int c, es_position *out)
{
    return es__pg_col_u64(r, row, c, &out->commit) &&
           es__pg_col_u64(r, row, c + 1, &out->seq);
}

/* One row of SQL_READ_ALL into ev (payload opened when sealed; a
 * forgotten aggregate's marked, without payload). */
static int event_of(pg_txn *t, const PGresult *r, int i, es_buf *plain,
                    es_recorded_event *ev, es_error *err)
{
    memset(ev, 0, sizeof *ev);
    if (!col_position(r, i, RA_TXID, &ev->position) ||
        !es__pg_col_uuid(r, i, RA_AGG, &ev->aggregate_id) ||
        !es__pg_col_u64(r, i, RA_VERSION, &ev->event.version) ||
        !es__pg_col_uuid(r, i, RA_EVENT_ID, &ev->event.id) ||
        !es__pg_col_i32(r, i, RA_KIND, &ev->event.kind) ||
        !es__pg_col_bytes(r, i, RA_PAYLOAD, &ev->event.data,
                          &ev->event.len) ||
        !es__pg_col_i64(r, i, RA_CREATED, &ev->created_ms))
        return es__pg_bad_row(err, "read all");
    ev->type_name = PQgetvalue(r, i, RA_TYPE);
    ad_buf ad;
    es__pg_ad_event(&ad, &ev->aggregate_id, ev->event.version);
    es_error oerr;
    int rc = es__pg_open_row(t, &ev->aggregate_id, r, i, RA_KEY, &ad, plain,
                             &ev->event.data, &ev->event.len, &oerr);
    if (rc == ES_EFORGOTTEN) {
        ev->forgotten = true;
        ev->event.data = NULL;
        ev->event.len = 0;
        return 0;
    }
    if (rc != 0 && err) {
        *err = oerr;
        err->version = ev->event.version;
    }
    return rc;
}

static int pg_read_all(es_store *store, const es_position *after, size_t max,
                       es_read_fn fn, void *ud, size_t *count,
                       es_position *last, es_error *err)
{
    pg_store *s = (pg_store *)store;
    pg_txn t;
    int rc = reader_begin(s, &t, err);
    if (rc != 0) return rc;
    es_position at = *after;
    es_buf plain = {0};
    /* Pages of at most 1,000 rows: the result is held in memory. */
    while (rc == 0 && *count < max) {
        size_t want = max - *count < 1000 ? max - *count : 1000;
        uint8_t c[8], q[8], lim[8];
        position_params(&at, c, q);
        es__pg_be64(lim, (uint64_t)want);
        const Oid types[3] = {OID_INT8, OID_INT8, OID_INT8};
        const char *values[3] = {(const char *)c, (const char *)q,
                                 (const char *)lim};
        const int lens[3] = {8, 8, 8};
        PGresult *r = NULL;
        rc = es__pg_run(t.conn, "read all", s->sql[SQL_READ_ALL], 3, types,
                        values, lens, &r, err);
        if (rc != 0) break;
        int n = PQntuples(r);
        for (int i = 0; rc == 0 && i < n; i++) {
            es_recorded_event ev;
            rc = event_of(&t, r, i, &plain, &ev, err);
            if (rc != 0) break;
            rc = fn(ud, &ev);
            if (rc != 0) break;
            at = ev.position;
            (*count)++;
            *last = at;
        }
        PQclear(r);
        if ((size_t)n < want) break; /* the horizon */
    }
    es_buf_free(&plain);
    reader_end(s, &t);
    return rc;
}

static int pg_head(es_store *store, es_position *out, es_error *err)
{
    pg_store *s = (pg_store *)store;
    pg_txn t;
    int rc = reader_begin(s, &t, err);
    if (rc != 0) return rc;
    PGresult *r = NULL;
    rc = es__pg_run(t.conn, "head", s->sql[SQL_HEAD], 0, NULL, NULL, NULL,
                    &r, err);
    if (rc == 0) {
        if (PQntuples(r) == 1 && !col_position(r, 0, 0, out))
            rc = es__pg_bad_row(err, "head");
        PQclear(r);
    }
    reader_end(s, &t);
    return rc;
}

static int pg_lag(es_store *store, const es_position *after, uint64_t cap,
                  uint64_t *events, int64_t *oldest_ms, es_error *err)
{
    pg_store *s = (pg_store *)store;
    pg_txn t;
    int rc = reader_begin(s, &t, err);
    if (rc != 0) return rc;
    uint8_t c[8], q[8], lim[8];
    position_params(after, c, q);
    es__pg_be64(lim, cap > INT64_MAX ? INT64_MAX : cap);
    const Oid types[3] = {OID_INT8, OID_INT8, OID_INT8};
    const char *values[3] = {(const char *)c, (const char *)q,
                             (const char *)lim};
    const int lens[3] = {8, 8, 8};
    PGresult *r = NULL;
    rc = es__pg_run(t.conn, "lag", s->sql[SQL_LAG], 3, types, values, lens,
                    &r, err);
    if (rc == 0) {
        if (PQntuples(r) != 1 || !es__pg_col_u64(r, 0, 0, events) ||
            !es__pg_col_i64(r, 0, 1, oldest_ms))
            rc = es__pg_bad_row(err, "lag");
        PQclear(r);
    }
    reader_end(s, &t);
    return rc;
}

static int pg_checkpoint_get(es_store *store, const char *name,
                             es_position *out, bool *found, es_error *err)
{
    pg_store *s = (pg_store *)store;
    memset(out, 0, sizeof *out);
    *found = false;
    pg_txn t;
    int rc = reader_begin(s, &t, err);
    if (rc != 0) return rc;
    const Oid types[1] = {OID_TEXT};
    const char *values[1] = {name};
    const int lens[1] = {(int)strlen(name)};
    PGresult *r = NULL;
    rc = es__pg_run(t.conn, "checkpoint: get", s->sql[SQL_CP_GET], 1, types,
                    values, lens, &r, err);
    if (rc == 0) {
        if (PQntuples(r) == 1) {
            *found = true;
            if (!col_position(r, 0, 0, out))
                rc = es__pg_bad_row(err, "checkpoint");
        }
        PQclear(r);
    }
    reader_end(s, &t);
    return rc;
}

static int pg_checkpoint_put(es_txn *txn, const char *name,
                             const es_position *pos, es_error *err)
{
    if (txn->store->ops != &es__pg_ops)
        return es__error_set(err, ES_EINVAL, "a transaction of another "
                             "store");
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    uint8_t c[8], q[8];
    position_params(pos, c, q);
    const Oid types[3] = {OID_TEXT, OID_INT8, OID_INT8};
    const char *values[3] = {name, (const char *)c, (const char *)q};
    const int lens[3] = {(int)strlen(name), 8, 8};
    return es__pg_run(t->conn, "checkpoint: put", s->sql[SQL_CP_PUT], 3,
                      types, values, lens, NULL, err);
}

static int pg_checkpoint_delete(es_txn *txn, const char *name, bool *found,
                                es_error *err)
{
    if (txn->store->ops != &es__pg_ops)
        return es__error_set(err, ES_EINVAL, "a transaction of another "
                             "store");
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    const Oid types[1] = {OID_TEXT};
    const char *values[1] = {name};
    const int lens[1] = {(int)strlen(name)};
    PGresult *r = NULL;
    int rc = es__pg_run(t->conn, "checkpoint: delete", s->sql[SQL_CP_DELETE],
                        1, types, values, lens, &r, err);
    if (rc != 0) return rc;
    *found = strcmp(PQcmdTuples(r), "0") != 0;
    PQclear(r);
    return 0;
}

static int pg_checkpoint_list(es_store *store, es_checkpoint **out, size_t *n,
                              es_error *err)
{
    pg_store *s = (pg_store *)store;
    pg_txn t;
    int rc = reader_begin(s, &t, err);
    if (rc != 0) return rc;
    PGresult *r = NULL;
    rc = es__pg_run(t.conn, "checkpoint: list", s->sql[SQL_CP_LIST], 0, NULL,
                    NULL, NULL, &r, err);
    reader_end(s, &t);
    if (rc != 0) return rc;
    size_t rows = (size_t)PQntuples(r);
    es_checkpoint *cps = rows ? es__calloc(rows, sizeof *cps) : NULL;
    if (rows > 0 && cps == NULL) {
        PQclear(r);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < rows; i++) {
        int row = (int)i;
        if (PQgetlength(r, row, 0) > ES__CHECKPOINT_NAME_MAX ||
            !col_position(r, row, 1, &cps[i].position) ||
            !es__pg_col_i64(r, row, 3, &cps[i].updated_ms)) {
            es__free(cps);
            PQclear(r);
            return es__pg_bad_row(err, "checkpoint list");
        }
        memcpy(cps[i].name, PQgetvalue(r, row, 0),
               (size_t)PQgetlength(r, row, 0));
    }
    PQclear(r);
    *out = cps;
    *n = rows;
    return 0;
}

const es__read_ops es__pg_read_ops = {
    .read_all = pg_read_all,
    .head = pg_head,
    .lag = pg_lag,
    .checkpoint_get = pg_checkpoint_get,
    .checkpoint_put = pg_checkpoint_put,
    .checkpoint_delete = pg_checkpoint_delete,
    .checkpoint_list = pg_checkpoint_list,
    .watch = es__pg_events_watch,
    .unwatch = es__pg_outbox_unwatch,
};
