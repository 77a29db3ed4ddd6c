/*
 * The batch writer's statements (the host's group commit): the prepared
 * statements, the arrays of a batch's events, command ids and side
 * effects, and the bookkeeping of what RETURNING says went in (rows that
 * did not go in fail their group).
 */
#include "store/pg/pg_int.h"

/* ---- the batch writer (the host's group commit) ----
 *
 * Many aggregates' items in one transaction with a constant number of
 * statements: all events in one INSERT (rows skipped on conflict come back
 * missing from RETURNING), all command ids in one, all side effects in
 * one, then COMMIT.  Items whose rows were skipped are marked (version
 * taken: ES_ECONFLICT; command id taken: ES_EIDEMPOTENCY; aggregate of
 * another type: ES_EWRONGTYPE) with their group's later items, the writes are
 * rolled back to a savepoint taken before them, and written again without
 * those items, so the innocent ones commit.  A connection lost before
 * COMMIT leaves the items ES__COMMIT_RETRY; one lost during COMMIT is
 * resolved by reading one command id of the batch back before any item
 * gets a status, or leaves them ES__COMMIT_UNKNOWN when the read-back
 * fails too.  Waiting for the database is the caller's (the commit
 * lanes, which can see the host closing). */

static int rowref_cmp(const void *a, const void *b)
{
    const rowref *x = a, *y = b;
    int c = memcmp(x->id.bytes, y->id.bytes, 16);
    if (c != 0) return c;
    return x->version < y->version ? -1 : x->version > y->version;
}

static rowref *rowref_find(rowref *refs, size_t n, const es_uuid *id,
                           uint64_t version)
{
    rowref key = {*id, version, 0};
    return bsearch(&key, refs, n, sizeof *refs, rowref_cmp);
}

void es__pg_batch_fail_group(es__commit_item **items, size_t n, size_t from,
                             int status)
{
    const void *group = items[from]->group;
    items[from]->status = status;
    for (size_t j = from + 1; j < n; j++)
        if (items[j]->group == group &&
            items[j]->status == ES__COMMIT_PENDING)
            items[j]->status = ES_ECONFLICT;
}

/* The connection broke, or the server is ending it (shutdown, a
 * terminated backend): worth a try on a new connection. */
bool es__pg_lost_state(const es_error *err)
{
    return strncmp(err->sqlstate, "08", 2) == 0 ||
           strncmp(err->sqlstate, "57P0", 4) == 0;
}

int es__pg_dek_cmp(const void *a, const void *b)
{
    return memcmp(((const dek_entry *)a)->agg.bytes,
                  ((const dek_entry *)b)->agg.bytes, 16);
}

static const dek_entry *batch_key(const batch_keys *k, const es_uuid *agg)
{
    dek_entry key;
    key.agg = *agg;
    return bsearch(&key, k->e, k->n, sizeof *k->e, es__pg_dek_cmp);
}

void es__pg_batch_keys_free(batch_keys *k)
{
    if (k->e) sodium_memzero(k->e, k->n * sizeof *k->e);
    es__free(k->e);
    k->e = NULL;
    k->n = 0;
}

_Static_assert(BATCH_PARAMS <= MAX_PARAMS, "binary_formats is too short");
const batch_stmt es__pg_batch_stmts[BATCH_STMTS] = {
    [BATCH_EVENTS] = {"es_batch_events", SQL_BATCH_EVENTS, 7,
                      {OID_TEXT_ARRAY, OID_UUID_ARRAY, OID_INT8_ARRAY,
                       OID_UUID_ARRAY, OID_INT4_ARRAY, OID_BYTEA_ARRAY,
                       OID_TEXT_ARRAY}},
    [BATCH_COMMANDS] = {"es_batch_commands", SQL_INSERT_COMMANDS,
                        COMMAND_COLS,
                        {OID_UUID_ARRAY, OID_UUID_ARRAY, OID_INT4_ARRAY,
                         OID_BYTEA_ARRAY, OID_INT8_ARRAY, OID_INT8_ARRAY,
                         OID_INT8_ARRAY, OID_BYTEA_ARRAY, OID_TEXT_ARRAY}},
    [BATCH_SIDE_EFFECTS] = {"es_batch_side_effects", SQL_BATCH_SIDE_EFFECTS,
                            8,
                            {OID_UUID_ARRAY, OID_UUID_ARRAY, OID_UUID_ARRAY,
                             OID_INT4_ARRAY, OID_BYTEA_ARRAY, OID_TEXT_ARRAY,
                             OID_TEXT_ARRAY, OID_TEXT}},
};

/* Marks a connection whose batch statements are prepared: its instance
 * data is the store they were prepared for.  The mark lives and dies
 * with the PGconn (a new connection after a loss has none, so it is
 * prepared again); a reset connection loses its prepared statements, and
 * the mark with them. */
int es__pg_batch_evproc(PGEventId id, void *info, void *pass)
{
    (void)pass;
    if (id == PGEVT_CONNRESET)
        PQsetInstanceData(((PGEventConnReset *)info)->conn, es__pg_batch_evproc,
                          NULL);
    return 1;
}

void es__pg_pstmt_free(pstmt *p)
{
    for (int i = 0; i < BATCH_PARAMS; i++) es_buf_free(&p->buf[i]);
    es__free(p->refs);
    memset(p, 0, sizeof *p);
}

static int pstmt_init(pstmt *p, const char *what, int stmt,
                      const Oid *elems, size_t rows, es_error *err)
{
    p->what = what;
    p->name = es__pg_batch_stmts[stmt].name;
    p->n = es__pg_batch_stmts[stmt].n;
    const Oid *types = es__pg_batch_stmts[stmt].types;
    p->rows = rows;
    int rc = 0;
    for (int i = 0; rc == 0 && i < p->n; i++) {
        p->types[i] = types[i];
        if (elems[i] != 0) rc = es__pg_array_begin(&p->buf[i], elems[i], rows);
    }
    return rc == 0 ? 0 : es__error_set(err, ES_ENOMEM, "out of memory");
}

int es__pg_pstmt_send(PGconn *c, pstmt *p, es_error *err)
{
    const char *values[BATCH_PARAMS];
    int lens[BATCH_PARAMS];
    for (int i = 0; i < p->n; i++) {
        if (p->buf[i].len > INT32_MAX)
            return es__error_set(err, ES_EINVAL, "%s: a batch of %zu bytes "
                                 "is too large for one statement", p->what,
                                 p->buf[i].len);
        values[i] = (const char *)p->buf[i].data;
        lens[i] = (int)p->buf[i].len;
    }
    if (!PQsendQueryPrepared(c, p->name, p->n, values, lens,
                             es__pg_binary_formats, 1))
        return es__pg_db_error(c, NULL, err, p->what);
    p->sent = true;
    return 0;
}

/* The events of the pending items; an item with a version or payload
 * PostgreSQL cannot take fails with its group at once. */
int es__pg_build_events(pg_store *s, const batch_keys *keys,
                        es__commit_item **items, size_t n, pstmt *p,
                        es_error *err)
{
    size_t rows = 0;
    for (size_t i = 0; i < n; i++) {
        es__commit_item *it = items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        for (size_t j = 0; j < it->n_events; j++)
            if (it->events[j].version > INT64_MAX ||
                it->events[j].len > MAX_PAYLOAD) {
                es__pg_batch_fail_group(items, n, i, ES_EINVAL);
                break;
            }
        if (it->status == ES__COMMIT_PENDING) rows += it->n_events;
    }
    if (rows == 0) return 0;
    if (rows > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "too many events in a batch");
    static const Oid elems[7] = {OID_TEXT, OID_UUID, OID_INT8, OID_UUID,
                                 OID_INT4, OID_BYTEA, OID_TEXT};
    int rc = pstmt_init(p, "batch: insert events", BATCH_EVENTS, elems, rows,
                        err);
    if (rc != 0) return rc;
    p->refs = es__calloc(rows, sizeof *p->refs);
    if (p->refs == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    es_buf *ty = &p->buf[0], *ag = &p->buf[1], *ver = &p->buf[2];
    es_buf *ids = &p->buf[3], *kinds = &p->buf[4], *data = &p->buf[5];
    es_buf *kk = &p->buf[6];
    if (!s->encrypt) kk->data[7] = 1; /* has NULLs */
    size_t r = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        es__commit_item *it = items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        const dek_entry *d = NULL;
        if (s->encrypt && it->n_events > 0 &&
            (d = batch_key(keys, &it->aggregate_id)) == NULL)
            return es__error_set(err, ES_EINVAL, "batch: no data key");
        size_t tlen = strlen(it->type_name);
        for (size_t j = 0; rc == 0 && j < it->n_events; j++, r++) {
            const es_event *e = &it->events[j];
            p->refs[r] = (rowref){it->aggregate_id, e->version, i};
            rc = es__pg_array_item(ty, it->type_name, tlen);
            if (rc == 0) rc = es__pg_array_item(ag, it->aggregate_id.bytes, 16);
            if (rc == 0) rc = es__pg_array_i64(ver, (int64_t)e->version);
            if (rc == 0) rc = es__pg_array_item(ids, e->id.bytes, 16);
            if (rc == 0) rc = es__pg_array_i32(kinds, e->kind);
            if (rc == 0 && d) {
                ad_buf ad;
                es__pg_ad_event(&ad, &it->aggregate_id, e->version);
                rc = es__pg_array_sealed(data, d->dek, &ad, e->data, e->len);
                if (rc == 0) rc = es__pg_array_item(kk, d->kek, strlen(d->kek));
            } else if (rc == 0) {
                rc = es__pg_array_item(data, e->data, e->len);
                if (rc == 0) rc = es__pg_put32(kk, 0xffffffffu); /* NULL */
            }
        }
    }
    if (rc != 0) return es__error_set(err, ES_ENOMEM, "out of memory");
    qsort(p->refs, rows, sizeof *p->refs, rowref_cmp);
    return 0;
}

/* The rows of p that the statement did not return (in[row] false) were
 * not inserted: their items' groups fail with status. */
static void fail_unreturned(es__commit_item **items, size_t n,
                            const pstmt *p, const bool *in, int status,
                            bool *failed)
{
    for (size_t j = 0; j < p->rows; j++)
        if (!in[j] && items[p->refs[j].item]->status == ES__COMMIT_PENDING) {
            es__pg_batch_fail_group(items, n, p->refs[j].item, status);
            *failed = true;
        }
}

/* Items whose events did not all go in fail: a version was taken
 * (ES_ECONFLICT) or the aggregate is of another type (ES_EWRONGTYPE). */
int es__pg_apply_events(es__commit_item **items, size_t n, const pstmt *p,
                        const PGresult *res, bool *failed, es_error *err)
{
    bool *in = es__calloc(p->rows, sizeof *in);
    if (in == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    int rc = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        es_uuid agg;
        uint64_t v = 0;
        if (!es__pg_col_uuid(res, i, 0, &agg)) {
            rc = es__pg_bad_row(err, "batch: insert events");
            break;
        }
        if (PQgetisnull(res, i, 1)) { /* an aggregate of another type */
            for (size_t j = 0; j < n; j++)
                if (items[j]->status == ES__COMMIT_PENDING &&
                    es_uuid_equal(&items[j]->aggregate_id, &agg)) {
                    es__pg_batch_fail_group(items, n, j, ES_EWRONGTYPE);
                    *failed = true;
                }
            continue;
        }
        if (!es__pg_col_u64(res, i, 1, &v)) {
            rc = es__pg_bad_row(err, "batch: insert events");
            break;
        }
        rowref *f = rowref_find(p->refs, p->rows, &agg, v);
        if (f) in[f - p->refs] = true;
    }
    if (rc == 0) fail_unreturned(items, n, p, in, ES_ECONFLICT, failed);
    es__free(in);
    return rc;
}

/* The command-id records of the pending items (a rejection's reason
 * sealed with its aggregate's data key when the store encrypts). */
int es__pg_build_commands(pg_store *s, const batch_keys *keys,
                          es__commit_item **items, size_t n, pstmt *p,
                          es_error *err)
{
    size_t rows = 0;
    for (size_t i = 0; i < n; i++)
        if (items[i]->status == ES__COMMIT_PENDING) rows++;
    if (rows == 0) return 0;
    int rc = pstmt_init(p, "batch: insert command ids", BATCH_COMMANDS,
                        es__pg_command_elems, rows, err);
    if (rc != 0) return rc;
    p->refs = es__calloc(rows, sizeof *p->refs);
    if (p->refs == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    size_t r = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (items[i]->status != ES__COMMIT_PENDING) continue;
        const es__command_record *c = &items[i]->record;
        p->refs[r++] = (rowref){c->command_id, 0, i};
        const dek_entry *d = NULL;
        if (s->encrypt && c->rejected &&
            (d = batch_key(keys, &items[i]->aggregate_id)) == NULL)
            return es__error_set(err, ES_EINVAL, "batch: no data key");
        rc = es__pg_command_row(p->buf, c, d);
    }
    if (rc != 0) return es__error_set(err, ES_ENOMEM, "out of memory");
    qsort(p->refs, rows, sizeof *p->refs, rowref_cmp);
    return 0;
}

/* Items whose command id did not go in fail with ES_EIDEMPOTENCY. */
int es__pg_apply_commands(es__commit_item **items, size_t n, const pstmt *p,
                          const PGresult *res, bool *failed, es_error *err)
{
    bool *in = es__calloc(p->rows, sizeof *in);
    if (in == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    int rc = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        es_uuid id;
        if (!es__pg_col_uuid(res, i, 0, &id)) {
            rc = es__pg_bad_row(err, "batch: insert command ids");
            break;
        }
        rowref *f = rowref_find(p->refs, p->rows, &id, 0);
        if (f) in[f - p->refs] = true;
    }
    if (rc == 0) fail_unreturned(items, n, p, in, ES_EIDEMPOTENCY, failed);
    es__free(in);
    return rc;
}

/* The side effects of the pending items. */
int es__pg_build_side_effects(pg_store *s, const batch_keys *keys,
                              es__commit_item **items, size_t n, pstmt *p,
                              es_error *err)
{
    size_t rows = 0;
    for (size_t i = 0; i < n; i++) {
        es__commit_item *it = items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        for (size_t j = 0; j < it->n_side_effects; j++)
            if (it->side_effects[j].len > MAX_PAYLOAD) {
                es__pg_batch_fail_group(items, n, i, ES_EINVAL);
                break;
            }
        if (it->status == ES__COMMIT_PENDING) rows += it->n_side_effects;
    }
    if (rows == 0) return 0;
    if (rows > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "too many side effects");
    /* the 8th parameter is not an array: the NOTIFY channel */
    static const Oid elems[8] = {OID_UUID, OID_UUID, OID_UUID, OID_INT4,
                                 OID_BYTEA, OID_TEXT, OID_TEXT, 0};
    int rc = pstmt_init(p, "batch: insert side effects", BATCH_SIDE_EFFECTS,
                        elems, rows, err);
    if (rc != 0) return rc;
    /* The NOTIFY channel, a parameter like every value ($8). */
    if (es_buf_append_str(&p->buf[7], s->channel) != 0)
        return es__error_set(err, ES_ENOMEM, "out of memory");
    es_buf *kk = &p->buf[5];
    if (!s->encrypt) kk->data[7] = 1; /* has NULLs */
    for (size_t i = 0; rc == 0 && i < n; i++) {
        es__commit_item *it = items[i];
        if (it->status != ES__COMMIT_PENDING) continue;
        for (size_t j = 0; rc == 0 && j < it->n_side_effects; j++) {
            const es_side_effect *e = &it->side_effects[j];
            rc = es__pg_array_item(&p->buf[0], e->id.bytes, 16);
            if (rc == 0)
                rc = es__pg_array_item(&p->buf[1], e->aggregate_id.bytes, 16);
            if (rc == 0)
                rc = es__pg_array_item(&p->buf[2], e->event_id.bytes, 16);
            if (rc == 0) rc = es__pg_array_i32(&p->buf[3], e->kind);
            if (rc == 0)
                rc = es__pg_array_item(&p->buf[6], it->type_name,
                                       strlen(it->type_name));
            if (rc != 0) break;
            if (!s->encrypt) {
                rc = es__pg_array_item(&p->buf[4], e->data, e->len);
                if (rc == 0) rc = es__pg_put32(kk, 0xffffffffu); /* NULL */
                continue;
            }
            const dek_entry *d = batch_key(keys, &e->aggregate_id);
            if (d == NULL)
                return es__error_set(err, ES_EINVAL, "batch: no data key");
            ad_buf ad;
            es__pg_ad_side_effect(&ad, e);
            rc = es__pg_array_sealed(&p->buf[4], d->dek, &ad, e->data, e->len);
            if (rc == 0) rc = es__pg_array_item(kk, d->kek, strlen(d->kek));
        }
    }
    return rc == 0 ? 0 : es__error_set(err, ES_ENOMEM, "out of memory");
}
