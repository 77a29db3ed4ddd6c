/*
 * The PostgreSQL store's reads: a stream of events (a page at a time,
 * the rest through a cursor), one event, a snapshot, a command id, the
 * side effects of an aggregate.
 *
 * Streams are read `chunk` rows at a time, so memory is bounded by one
 * page whatever the stream's length: the first page with one query (one
 * round trip for most streams), the rest, if any, through a cursor
 * (DECLARE + FETCH), planned and scanned once.
 */
#include "store/pg/pg_int.h"

/* ---- reads ---- */

/* ES_EWRONGTYPE when type_name is given and the aggregate's type (a row's
 * aggregate_type, column col) is another. */
static int row_type(const PGresult *r, int row, int col, const es_uuid *agg,
                    const char *type_name, es_error *err)
{
    if (type_name == NULL || PQgetisnull(r, row, col)) return 0;
    const char *stored = PQgetvalue(r, row, col);
    if (strcmp(stored, type_name) == 0) return 0;
    return es__wrong_type(err, agg, stored, type_name);
}

/* Hand the rows of one page to fn (opened when sealed, after their type
 * is checked); *next is one past the last version handed over. */
static int stream_rows(pg_txn *t, const char *type_name, const es_uuid *agg,
                       const PGresult *r, uint64_t *next, es_buf *plain,
                       int (*fn)(void *ud, const es_event *event), void *ud,
                       es_error *err)
{
    int n = PQntuples(r);
    if (n > 0 && PQfformat(r, 0) != 1) return es__pg_bad_row(err, "stream");
    for (int i = 0; i < n; i++) {
        int wrong = row_type(r, i, 5, agg, type_name, err);
        if (wrong != 0) return wrong;
        es_event ev;
        if (!es__pg_col_u64(r, i, 0, &ev.version) ||
            !es__pg_col_uuid(r, i, 1, &ev.id) ||
            !es__pg_col_i32(r, i, 2, &ev.kind) ||
            !es__pg_col_bytes(r, i, 3, &ev.data, &ev.len))
            return es__pg_bad_row(err, "stream");
        ad_buf ad;
        es__pg_ad_event(&ad, agg, ev.version);
        int rc = es__pg_open_row(t, agg, r, i, 4, &ad, plain, &ev.data, &ev.len,
                                 err);
        if (rc != 0) {
            if (err) err->version = ev.version;
            return rc;
        }
        *next = ev.version + 1;
        rc = fn(ud, &ev);
        if (rc != 0) return rc;
    }
    return 0;
}

/* For a typed read that found no row to check: ES_EWRONGTYPE when the
 * aggregate's creation event has another type; 0 when it has this one or
 * there is none.  One primary-key probe. */
static int type_of(pg_txn *t, const char *type_name, const es_uuid *agg,
                   es_error *err)
{
    pg_store *s = (pg_store *)t->base.store;
    const Oid types[1] = {OID_UUID};
    const char *values[1] = {(const char *)agg->bytes};
    const int lens[1] = {16};
    PGresult *r = NULL;
    int rc = es__pg_run(t->conn, "type of", s->sql[SQL_TYPE_OF], 1, types,
                        values, lens, &r, err);
    if (rc != 0) return rc;
    if (PQntuples(r) == 1) rc = row_type(r, 0, 0, agg, type_name, err);
    PQclear(r);
    return rc;
}

int es__pg_stream(es_txn *txn, const char *type_name, const es_uuid *agg,
                  uint64_t from, int (*fn)(void *ud, const es_event *event),
                  void *ud, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    if (from > INT64_MAX) /* no version is that high */
        return type_name ? type_of(t, type_name, agg, err) : 0;
    uint8_t next_b[8], limit_b[8];
    es__pg_be64(next_b, from);
    es__pg_be64(limit_b, (uint64_t)s->chunk);
    const Oid types[3] = {OID_UUID, OID_INT8, OID_INT8};
    const char *values[3] = {(const char *)agg->bytes, (const char *)next_b,
                             (const char *)limit_b};
    const int lens[3] = {16, 8, 8};

    /* The first page with one query: most streams end there. */
    PGresult *r = NULL;
    int rc = es__pg_run(t->conn, "stream", s->sql[SQL_STREAM], 3, types, values,
                        lens, &r, err);
    if (rc != 0) return rc;
    uint64_t next = from;
    size_t n = (size_t)PQntuples(r);
    es_buf plain = {0};
    rc = stream_rows(t, type_name, agg, r, &next, &plain, fn, ud, err);
    PQclear(r);
    if (rc == 0 && n == 0 && from > 0 && type_name != NULL)
        rc = type_of(t, type_name, agg, err);
    if (rc != 0 || n < s->chunk) {
        es_buf_free(&plain);
        return rc;
    }

    /* A long stream: the rest through one cursor, so the server plans
     * and scans once, whatever its statistics say (keyset pages planned
     * on stale statistics can each become a full scan). */
    char name[32], sql[96];
    if ((rc = es__pg_txn_open(t, err)) != 0) { /* a cursor needs one */
        es_buf_free(&plain);
        return rc;
    }
    snprintf(name, sizeof name, "es_stream_%u", ++t->cursors);
    es__pg_be64(next_b, next);
    char *declare = es__pg_sqlf("DECLARE %s NO SCROLL CURSOR FOR %s", name,
                                s->sql[SQL_STREAM_REST]);
    if (declare == NULL) {
        es_buf_free(&plain);
        return es__error_set(err, ES_ENOMEM, "out of memory");
    }
    rc = es__pg_run(t->conn, "stream: declare", declare, 2, types, values, lens,
                    NULL, err);
    es__free(declare);
    if (rc != 0) {
        es_buf_free(&plain);
        return rc;
    }
    snprintf(sql, sizeof sql, "FETCH FORWARD %zu FROM %s", s->chunk, name);
    for (;;) {
        rc = es__pg_run(t->conn, "stream: fetch", sql, 0, NULL, NULL, NULL, &r,
                        err);
        if (rc != 0) break;
        n = (size_t)PQntuples(r);
        rc = stream_rows(t, type_name, agg, r, &next, &plain, fn, ud, err);
        PQclear(r);
        if (rc != 0 || n < s->chunk) break;
    }
    es_buf_free(&plain);
    snprintf(sql, sizeof sql, "CLOSE %s", name);
    es_error ignored = {0};
    int closed = es__pg_run_simple(t->conn, "stream: close", sql, &ignored);
    if (rc == 0 && closed != 0) {
        if (err) *err = ignored;
        rc = closed;
    }
    return rc;
}

int es__pg_get_event(es_txn *txn, const es_uuid *agg, const es_uuid *event_id,
                     es_event **out, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    const Oid types[2] = {OID_UUID, OID_UUID};
    const char *values[2] = {(const char *)event_id->bytes,
                             (const char *)agg->bytes};
    const int lens[2] = {16, 16};
    PGresult *r = NULL;
    int rc = es__pg_run(t->conn, "get event", s->sql[SQL_GET_EVENT], 2, types,
                        values, lens, &r, err);
    if (rc != 0) return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return es__error_set(err, ES_ENOTFOUND, "event not found");
    }
    es_uuid who;
    es_event ev;
    ev.id = *event_id;
    if (!es__pg_col_uuid(r, 0, 0, &who) ||
        !es__pg_col_u64(r, 0, 1, &ev.version) ||
        !es__pg_col_i32(r, 0, 2, &ev.kind) ||
        !es__pg_col_bytes(r, 0, 3, &ev.data, &ev.len)) {
        PQclear(r);
        return es__pg_bad_row(err, "get event");
    }
    ad_buf ad;
    es__pg_ad_event(&ad, &who, ev.version);
    es_buf plain = {0};
    rc = es__pg_open_row(t, &who, r, 0, 4, &ad, &plain, &ev.data, &ev.len, err);
    if (rc != 0) {
        PQclear(r);
        es_buf_free(&plain);
        return rc;
    }
    *out = es__event_dup(&ev);
    PQclear(r);
    es_buf_free(&plain);
    if (*out == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    return 0;
}

static int64_t version_col(uint64_t v)
{
    return v == UINT64_MAX ? -1 : (int64_t)v;
}

_Static_assert(COMMAND_COLS <= MAX_PARAMS, "binary_formats is too short");
const Oid es__pg_command_elems[COMMAND_COLS] = {
    OID_UUID, OID_UUID, OID_INT4, OID_BYTEA, OID_INT8,
    OID_INT8, OID_INT8, OID_BYTEA, OID_TEXT};
static const Oid command_types[COMMAND_COLS] = {
    OID_UUID_ARRAY, OID_UUID_ARRAY, OID_INT4_ARRAY,
    OID_BYTEA_ARRAY, OID_INT8_ARRAY, OID_INT8_ARRAY,
    OID_INT8_ARRAY, OID_BYTEA_ARRAY, OID_TEXT_ARRAY};

/* Append one record to the column arrays: the last two are the rejection
 * reason (NULL for an accepted command) and the id of the master key of
 * the data key it is sealed with (NULL: in clear).  key: the aggregate's
 * data key when the store encrypts, else NULL; only a rejected record
 * uses it.  Returns 0 or ES_ENOMEM. */
int es__pg_command_row(es_buf b[COMMAND_COLS], const es__command_record *c,
                       const dek_entry *key)
{
    uint8_t d[ES__COMMAND_DIGEST];
    if (c->hashed && c->len == ES__COMMAND_DIGEST)
        memcpy(d, c->payload, sizeof d);
    else
        es__command_digest(c->kind, c->payload, c->len, d);
    int rc = es__pg_array_item(&b[0], c->command_id.bytes, 16);
    if (rc == 0) rc = es__pg_array_item(&b[1], c->aggregate_id.bytes, 16);
    if (rc == 0) rc = es__pg_array_i32(&b[2], c->kind);
    if (rc == 0) rc = es__pg_array_item(&b[3], d, sizeof d);
    if (rc == 0) rc = es__pg_array_i64(&b[4], version_col(c->first_version));
    if (rc == 0)
        rc = es__pg_array_i64(&b[5], c->event_count > INT64_MAX
                                         ? INT64_MAX
                                         : (int64_t)c->event_count);
    if (rc == 0) rc = es__pg_array_i64(&b[6], version_col(c->version));
    if (rc != 0) return rc;
    const char *why = c->reason ? c->reason : "";
    if (c->rejected && key) {
        ad_buf ad;
        es__pg_ad_rejection(&ad, &c->command_id, &c->aggregate_id);
        rc = es__pg_array_sealed(&b[7], key->dek, &ad, (const uint8_t *)why,
                                 strlen(why));
        if (rc == 0) rc = es__pg_array_item(&b[8], key->kek, strlen(key->kek));
        return rc;
    }
    if (c->rejected) rc = es__pg_array_item(&b[7], why, strlen(why));
    else
        rc = es__pg_put32(&b[7], UINT32_MAX); /* length -1: NULL */
    if (rc == 0) rc = es__pg_put32(&b[8], UINT32_MAX);
    return rc;
}

int es__pg_insert_commands(es_txn *txn, const es__command_record *recs,
                           size_t n, bool *inserted, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    if (n == 0) return 0;
    if (n > INT32_MAX)
        return es__error_set(err, ES_EINVAL, "too many command records");
    es_buf b[COMMAND_COLS];
    memset(b, 0, sizeof b);
    int rc = 0;
    for (int k = 0; rc == 0 && k < COMMAND_COLS; k++)
        rc = es__pg_array_begin(&b[k], es__pg_command_elems[k], n);
    for (size_t i = 0; i < n; i++) inserted[i] = false;
    dek_entry key;
    memset(&key, 0, sizeof key);
    bool have_key = false;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        /* A rejection's reason is sealed with its aggregate's data key
         * (made now if it has none), like an event. */
        bool seal = s->encrypt && recs[i].rejected;
        if (seal && !(have_key &&
                      es_uuid_equal(&key.agg, &recs[i].aggregate_id))) {
            const dek_entry *d = NULL;
            if ((rc = es__pg_get_dek(t, &recs[i].aggregate_id, true, &d,
                                     err)) != 0)
                break;
            key = *d;
            have_key = true;
        }
        rc = es__pg_command_row(b, &recs[i], seal ? &key : NULL);
    }
    sodium_memzero(&key, sizeof key);
    PGresult *r = NULL;
    if (rc == ES_ENOMEM) es__error_set(err, rc, "out of memory");
    if (rc == 0) {
        const char *values[COMMAND_COLS];
        int lens[COMMAND_COLS];
        for (int k = 0; k < COMMAND_COLS; k++) {
            values[k] = (const char *)b[k].data;
            lens[k] = (int)b[k].len;
        }
        rc = es__pg_run(t->conn, "insert command ids",
                        s->sql[SQL_INSERT_COMMANDS], COMMAND_COLS,
                        command_types, values, lens, &r, err);
    }
    for (int row = 0; rc == 0 && row < PQntuples(r); row++) {
        es_uuid id;
        if (!es__pg_col_uuid(r, row, 0, &id)) {
            rc = es__pg_bad_row(err, "insert command ids");
            break;
        }
        for (size_t i = 0; i < n; i++)
            if (es_uuid_equal(&id, &recs[i].command_id)) inserted[i] = true;
    }
    if (r) PQclear(r);
    for (int k = 0; k < COMMAND_COLS; k++) es_buf_free(&b[k]);
    return rc;
}

int es__pg_get_command(es_txn *txn, const es_uuid *command_id,
                       es__command_record **out, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    const Oid types[1] = {OID_UUID};
    const char *values[1] = {(const char *)command_id->bytes};
    const int lens[1] = {16};
    PGresult *r = NULL;
    int rc = es__pg_run(t->conn, "get command id", s->sql[SQL_GET_COMMAND], 1,
                        types, values, lens, &r, err);
    if (rc != 0) return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return es__error_set(err, ES_ENOTFOUND, "command id not found");
    }
    es__command_record rec;
    memset(&rec, 0, sizeof rec);
    rec.command_id = *command_id;
    rec.hashed = true;
    int64_t first = 0, count = 0, version = 0;
    if (!es__pg_col_uuid(r, 0, 0, &rec.aggregate_id) ||
        !es__pg_col_i32(r, 0, 1, &rec.kind) ||
        !es__pg_col_bytes(r, 0, 2, &rec.payload, &rec.len) ||
        !es__pg_col_i64(r, 0, 3, &first) || !es__pg_col_i64(r, 0, 4, &count) ||
        !es__pg_col_i64(r, 0, 5, &version) || count < 0) {
        PQclear(r);
        return es__pg_bad_row(err, "get command id");
    }
    rec.first_version = first < 0 ? UINT64_MAX : (uint64_t)first;
    rec.event_count = (uint64_t)count;
    rec.version = version < 0 ? UINT64_MAX : (uint64_t)version;
    /* libpq ends every value with a NUL, binary ones too; a reason with
     * a NUL inside is cut there. */
    rec.rejected = !PQgetisnull(r, 0, 6);
    if (rec.rejected) rec.reason = PQgetvalue(r, 0, 6);
    es_buf plain = {0};
    if (rec.rejected && !PQgetisnull(r, 0, 7)) {
        /* Sealed: opened with the aggregate's data key.  Once that is
         * destroyed the record stays (its id is still taken, its digest
         * still compared), without its reason. */
        const uint8_t *data = (const uint8_t *)rec.reason;
        size_t len = (size_t)PQgetlength(r, 0, 6);
        ad_buf ad;
        es__pg_ad_rejection(&ad, command_id, &rec.aggregate_id);
        es_error inner = {0};
        rc = es__pg_open_row(t, &rec.aggregate_id, r, 0, 7, &ad, &plain, &data,
                             &len, &inner);
        if (rc == ES_EFORGOTTEN) {
            rec.forgotten = true;
            rec.reason = NULL;
            rc = 0;
        } else if (rc != 0) {
            es_buf_free(&plain);
            PQclear(r);
            if (err) *err = inner;
            return rc;
        } else if (es_buf_append(&plain, "", 1) != 0) {
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
        } else {
            rec.reason = (const char *)plain.data;
        }
    }
    *out = rc == 0 ? es__command_record_dup(&rec) : NULL;
    PQclear(r);
    if (plain.data) sodium_memzero(plain.data, plain.cap);
    es_buf_free(&plain);
    if (rc != 0) return rc;
    if (*out == NULL) return es__error_set(err, ES_ENOMEM, "out of memory");
    return 0;
}

int es__pg_get_snapshot(es_txn *txn, const char *type_name, const es_uuid *agg,
                        uint64_t sv, es_snapshot **out, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    if (sv > INT64_MAX) {
        int rc = type_name ? type_of(t, type_name, agg, err) : 0;
        return rc ? rc : es__error_set(err, ES_ENOTFOUND, "no snapshot");
    }
    uint8_t svb[8];
    es__pg_be64(svb, sv);
    const Oid types[2] = {OID_UUID, OID_INT8};
    const char *values[2] = {(const char *)agg->bytes, (const char *)svb};
    const int lens[2] = {16, 8};
    PGresult *r = NULL;
    int rc = es__pg_run(t->conn, "get snapshot", s->sql[SQL_GET_SNAPSHOT], 2,
                        types, values, lens, &r, err);
    if (rc != 0) return rc;
    /* One row: the creation event's type, then the snapshot's columns
     * (NULL when there is none). */
    if (PQntuples(r) != 1) {
        PQclear(r);
        return es__pg_bad_row(err, "get snapshot");
    }
    if ((rc = row_type(r, 0, 0, agg, type_name, err)) != 0) {
        PQclear(r);
        return rc;
    }
    if (PQgetisnull(r, 0, 1)) {
        PQclear(r);
        return es__error_set(err, ES_ENOTFOUND, "no snapshot");
    }
    es_snapshot snap = {*agg, 0, sv, NULL, 0};
    if (!es__pg_col_u64(r, 0, 1, &snap.version) ||
        !es__pg_col_bytes(r, 0, 2, &snap.data, &snap.len)) {
        PQclear(r);
        return es__pg_bad_row(err, "get snapshot");
    }
    ad_buf ad;
    es__pg_ad_snapshot(&ad, agg, sv, snap.version);
    es_buf plain = {0};
    rc = es__pg_open_row(t, agg, r, 0, 3, &ad, &plain, &snap.data, &snap.len,
                         err);
    if (rc != 0) {
        PQclear(r);
        es_buf_free(&plain);
        return rc;
    }
    *out = es__snapshot_dup(&snap);
    PQclear(r);
    es_buf_free(&plain);
    return *out ? 0 : es__error_set(err, ES_ENOMEM, "out of memory");
}

int es__pg_list_side_effects(es_txn *txn, const es_uuid *agg,
                             es_side_effect_list **out, es_error *err)
{
    pg_txn *t = (pg_txn *)txn;
    pg_store *s = (pg_store *)txn->store;
    const Oid types[1] = {OID_UUID};
    const char *values[1] = {agg ? (const char *)agg->bytes : NULL};
    const int lens[1] = {16};
    PGresult *r = NULL;
    int rc =
        es__pg_run(t->conn, "list side effects", s->sql[SQL_LIST_SIDE_EFFECTS],
                   1, types, values, lens, &r, err);
    if (rc != 0) return rc;
    es_side_effect_list *list = es__calloc(1, sizeof *list);
    if (list == NULL) rc = es__error_set(err, ES_ENOMEM, "out of memory");
    size_t cap = 0;
    es_buf plain = {0};
    for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
        es_side_effect se;
        ad_buf ad;
        if (!es__pg_col_uuid(r, i, 0, &se.id) ||
            !es__pg_col_uuid(r, i, 1, &se.aggregate_id) ||
            !es__pg_col_uuid(r, i, 2, &se.event_id) ||
            !es__pg_col_i32(r, i, 3, &se.kind) ||
            !es__pg_col_bytes(r, i, 4, &se.data, &se.len)) {
            rc = es__pg_bad_row(err, "list side effects");
            break;
        }
        es__pg_ad_side_effect(&ad, &se);
        rc = es__pg_open_row(t, &se.aggregate_id, r, i, 5, &ad, &plain,
                             &se.data, &se.len, err);
        if (rc == 0 && es__side_effect_list_push(list, &cap, &se) != 0)
            rc = es__error_set(err, ES_ENOMEM, "out of memory");
    }
    es_buf_free(&plain);
    PQclear(r);
    if (rc != 0) {
        es_side_effect_list_free(list);
        return rc;
    }
    *out = list;
    return 0;
}
