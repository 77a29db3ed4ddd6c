/*
 * bank-server: the read model in PostgreSQL (server_views.c has the
 * design).  Tables in the default schema, made by bank-server at start
 * when missing:
 *   bank_stats           one row: accounts, total_balance, events;
 *   bank_statement       one row per movement, by (account_id, version);
 *   bank_views_position  one row: the position of the last event counted.
 * The projection writes them in its batch's transaction, so they commit
 * with its checkpoint; every value travels as a parameter (binary arrays
 * for the rows), never in the text of a statement.
 */
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eventastic/postgres.h"
#include "server_views.h"

/* ---- the projection's side ---- */

/* Made when missing.  Checked first: CREATE TABLE IF NOT EXISTS needs
 * the right to create in the schema even when the table exists, and an
 * application role may lack it (tests/security.py). */
static const char pg_tables_missing[] =
    "SELECT to_regclass('bank_stats') IS NULL"
    " OR to_regclass('bank_statement') IS NULL"
    " OR to_regclass('bank_views_position') IS NULL";

static const char pg_schema[] =
    "CREATE TABLE IF NOT EXISTS bank_stats ("
    " id int PRIMARY KEY CHECK (id = 1), accounts bigint NOT NULL,"
    " total_balance bigint NOT NULL, events bigint NOT NULL);"
    "CREATE TABLE IF NOT EXISTS bank_statement ("
    " account_id uuid, version bigint, kind text NOT NULL,"
    " amount bigint NOT NULL, balance bigint NOT NULL, transfer_id uuid,"
    " other uuid, at timestamptz NOT NULL,"
    " PRIMARY KEY (account_id, version));"
    /* the position of the last event counted (see the file's comment) */
    "CREATE TABLE IF NOT EXISTS bank_views_position ("
    " id int PRIMARY KEY CHECK (id = 1), pos_commit bigint NOT NULL,"
    " pos_seq bigint NOT NULL)";

static const char pg_rows[] =
    "INSERT INTO bank_stats VALUES (1, 0, 0, 0) ON CONFLICT (id) DO NOTHING;"
    "INSERT INTO bank_views_position VALUES (1, 0, 0)"
    " ON CONFLICT (id) DO NOTHING";

static int pg_fail(es_error *err, PGconn *c, PGresult *r, const char *what)
{
    const char *msg = r ? PQresultErrorMessage(r) : PQerrorMessage(c);
    int len = (int)strcspn(msg, "\n");
    srv_views_fail(err, ES_EDB, "%s: %.*s", what, len, msg);
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    if (err != NULL && state != NULL)
        snprintf(err->sqlstate, sizeof err->sqlstate, "%s", state);
    PQclear(r);
    return ES_EDB;
}

static int pg_exec(PGconn *c, const char *sql, const char *what,
                   es_error *err)
{
    PGresult *r = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        return pg_fail(err, c, r, what);
    PQclear(r);
    return 0;
}

/* The connection of a store transaction, or ES_EINVAL. */
static int pg_conn(es_txn *txn, PGconn **out, es_error *err)
{
    *out = es_pg_txn_conn(txn);
    if (*out == NULL)
        return srv_views_fail(err, ES_EINVAL,
                              "not a PostgreSQL transaction");
    return 0;
}

/* A PostgreSQL binary array of one dimension, built item by item. */
typedef struct pgarr {
    uint8_t *p;
    size_t len, cap;
    uint32_t n;
    bool has_null, oom;
} pgarr;

static void arr_put(pgarr *a, const void *data, size_t len)
{
    if (a->oom) return;
    if (a->len + len > a->cap) {
        size_t cap = a->cap ? a->cap : 1024;
        while (cap < a->len + len) cap *= 2;
        uint8_t *p = realloc(a->p, cap);
        if (p == NULL) {
            a->oom = true;
            return;
        }
        a->p = p;
        a->cap = cap;
    }
    memcpy(a->p + a->len, data, len);
    a->len += len;
}

static void be32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (24 - 8 * i));
}

static void be64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (56 - 8 * i));
}

/* The header (ndim, flags, element type, length, lower bound) is written
 * by arr_finish; its room first. */
static void arr_begin(pgarr *a)
{
    uint8_t h[20] = {0};
    arr_put(a, h, sizeof h);
}

static void arr_item(pgarr *a, const void *data, uint32_t len)
{
    uint8_t l[4];
    be32(l, len);
    arr_put(a, l, 4);
    arr_put(a, data, len);
    a->n++;
}

static void arr_null(pgarr *a)
{
    uint8_t l[4];
    be32(l, 0xffffffffu);
    arr_put(a, l, 4);
    a->has_null = true;
    a->n++;
}

static void arr_int8(pgarr *a, int64_t v)
{
    uint8_t b[8];
    be64(b, (uint64_t)v);
    arr_item(a, b, 8);
}

static void arr_finish(pgarr *a, uint32_t elem_oid)
{
    if (a->oom) return;
    be32(a->p, 1);
    be32(a->p + 4, a->has_null ? 1 : 0);
    be32(a->p + 8, elem_oid);
    be32(a->p + 12, a->n);
    be32(a->p + 16, 1);
}

enum { OID_INT8 = 20, OID_TEXT = 25, OID_UUID = 2950, OID_INT8_ARR = 1016,
       OID_TEXT_ARR = 1009, OID_UUID_ARR = 2951 };

static const char pg_insert[] =
    "INSERT INTO bank_statement (account_id, version, kind, amount, balance,"
    " transfer_id, other, at)"
    " SELECT a, v, k, m, b, t, o,"
    " timestamptz 'epoch' + ms * interval '1 millisecond'"
    " FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::int8[],"
    " $5::int8[], $6::uuid[], $7::uuid[], $8::int8[])"
    " AS u(a, v, k, m, b, t, o, ms)";

static const char pg_update[] =
    "WITH p AS (UPDATE bank_views_position SET pos_commit = $4,"
    " pos_seq = $5 WHERE id = 1)"
    " UPDATE bank_stats SET accounts = accounts + $1,"
    " total_balance = total_balance + $2, events = events + $3"
    " WHERE id = 1";

/* The statement rows of the changes after *done: one INSERT. */
static int pg_insert_rows(PGconn *c, const change *ch, size_t n,
                          const es_position *done, es_error *err)
{
    enum { COLS = 8 };
    pgarr a[COLS];
    memset(a, 0, sizeof a);
    for (int i = 0; i < COLS; i++) arr_begin(&a[i]);
    uint32_t rows = 0;
    for (size_t i = 0; i < n; i++) {
        const change *x = &ch[i];
        if (!x->row || es_position_compare(&x->pos, done) <= 0) continue;
        const movement *m = &x->m;
        bool transfer = srv_mv_transfer(m->kind);
        const char *k = srv_mv_names[m->kind];
        arr_item(&a[0], x->account.bytes, 16);
        arr_int8(&a[1], (int64_t)m->version);
        arr_item(&a[2], k, (uint32_t)strlen(k));
        arr_int8(&a[3], m->amount);
        arr_int8(&a[4], m->balance);
        if (transfer) {
            arr_item(&a[5], m->transfer_id.bytes, 16);
            arr_item(&a[6], m->other.bytes, 16);
        } else {
            arr_null(&a[5]);
            arr_null(&a[6]);
        }
        arr_int8(&a[7], m->at_ms);
        rows++;
    }
    static const uint32_t elem[COLS] = {OID_UUID, OID_INT8, OID_TEXT,
                                        OID_INT8, OID_INT8, OID_UUID,
                                        OID_UUID, OID_INT8};
    static const Oid types[COLS] = {OID_UUID_ARR, OID_INT8_ARR, OID_TEXT_ARR,
                                    OID_INT8_ARR, OID_INT8_ARR, OID_UUID_ARR,
                                    OID_UUID_ARR, OID_INT8_ARR};
    const char *values[COLS];
    int lengths[COLS], formats[COLS];
    bool oom = false;
    for (int i = 0; i < COLS; i++) {
        arr_finish(&a[i], elem[i]);
        oom = oom || a[i].oom;
        values[i] = (const char *)a[i].p;
        lengths[i] = (int)a[i].len;
        formats[i] = 1;
    }
    int rc = 0;
    if (oom) {
        rc = srv_views_fail(err, ES_ENOMEM, "out of memory");
    } else if (rows > 0) {
        PGresult *r = PQexecParams(c, pg_insert, COLS, types, values, lengths,
                                   formats, 0);
        if (PQresultStatus(r) != PGRES_COMMAND_OK)
            rc = pg_fail(err, c, r, "insert into bank_statement");
        else
            PQclear(r);
    }
    for (int i = 0; i < COLS; i++) free(a[i].p);
    return rc;
}

int srv_pg_views_flush(es_txn *txn, const change *ch, size_t n,
                       es_error *err)
{
    PGconn *c;
    int rc = pg_conn(txn, &c, err);
    if (rc != 0) return rc;
    /* Locks the row until the batch commits: another bank-server's flush
     * waits here, then sees what this one counted. */
    PGresult *r = PQexec(c, "SELECT pos_commit, pos_seq FROM "
                            "bank_views_position WHERE id = 1 FOR UPDATE");
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1)
        return pg_fail(err, c, r, "read bank_views_position");
    es_position done = {strtoull(PQgetvalue(r, 0, 0), NULL, 10),
                        strtoull(PQgetvalue(r, 0, 1), NULL, 10)};
    PQclear(r);
    int64_t d[3] = {0, 0, 0}; /* accounts, total_balance, events */
    es_position last = done;
    for (size_t i = 0; i < n; i++) {
        const change *x = &ch[i];
        if (es_position_compare(&x->pos, &done) <= 0) continue;
        d[0] += x->accounts;
        d[1] += x->balance;
        d[2]++;
        last = x->pos;
    }
    if (d[2] == 0) return 0; /* all counted already */
    rc = pg_insert_rows(c, ch, n, &done, err);
    if (rc != 0) return rc;
    uint8_t b[5][8];
    for (int i = 0; i < 3; i++) be64(b[i], (uint64_t)d[i]);
    be64(b[3], last.commit);
    be64(b[4], last.seq);
    const char *values[5];
    int lengths[5], formats[5];
    Oid types[5];
    for (int i = 0; i < 5; i++) {
        values[i] = (const char *)b[i];
        lengths[i] = 8;
        formats[i] = 1;
        types[i] = OID_INT8;
    }
    r = PQexecParams(c, pg_update, 5, types, values, lengths, formats, 0);
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        return pg_fail(err, c, r, "update bank_stats");
    PQclear(r);
    return 0;
}

int srv_pg_views_create(es_store *store, es_error *err)
{
    es_txn *txn = NULL;
    int rc = es_store_begin(store, &txn, err);
    if (rc != 0) return rc;
    PGconn *c;
    rc = pg_conn(txn, &c, err);
    bool missing = false;
    if (rc == 0) {
        PGresult *r = PQexec(c, pg_tables_missing);
        if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
            rc = pg_fail(err, c, r, "look for the read model's tables");
        } else {
            missing = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
            PQclear(r);
        }
    }
    if (rc == 0 && missing)
        rc = pg_exec(c, pg_schema, "create the read model's tables", err);
    if (rc == 0) rc = pg_exec(c, pg_rows, "add the read model's rows", err);
    if (rc != 0) {
        es_txn_rollback(txn);
        return rc;
    }
    return es_txn_commit(txn, err);
}

int srv_pg_views_reset(es_txn *txn, es_error *err)
{
    PGconn *c;
    int rc = pg_conn(txn, &c, err);
    if (rc != 0) return rc;
    return pg_exec(c,
                   "UPDATE bank_stats SET accounts = 0, total_balance = 0,"
                   " events = 0 WHERE id = 1;"
                   "DELETE FROM bank_statement;"
                   "UPDATE bank_views_position SET pos_commit = 0,"
                   " pos_seq = 0 WHERE id = 1",
                   "reset the read model", err);
}

/* ---- reads, on reader threads ---- */

static void job_db_error(job *j, int rc)
{
    if (srv_transient(rc)) return srv_job_error(j, 503, "overloaded", NULL);
    srv_job_error(j, 500, "internal", es_status_name(rc));
}

/* A read of the PostgreSQL read model: a transaction of the store (its
 * connection), rolled back after. */
static int pg_read_begin(job *j, es_txn **txn, PGconn **c)
{
    es_error err = {0};
    int rc = es_store_begin(j->srv->store, txn, &err);
    if (rc == 0) rc = pg_conn(*txn, c, &err);
    if (rc != 0) {
        if (*txn) es_txn_rollback(*txn);
        *txn = NULL;
        job_db_error(j, rc);
    }
    return rc;
}

int srv_pg_stats(job *j, int64_t out[3])
{
    es_txn *txn = NULL;
    PGconn *c;
    if (pg_read_begin(j, &txn, &c) != 0) return -1;
    PGresult *r = PQexec(c, "SELECT accounts, total_balance, events "
                            "FROM bank_stats WHERE id = 1");
    bool ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;
    for (int i = 0; ok && i < 3; i++)
        out[i] = strtoll(PQgetvalue(r, 0, i), NULL, 10);
    PQclear(r);
    es_txn_rollback(txn);
    if (!ok) {
        srv_job_error(j, 503, "overloaded", NULL);
        return -1;
    }
    return 0;
}

static int kind_of(const char *name, mv_kind *out)
{
    for (size_t i = 0; i < sizeof srv_mv_names / sizeof srv_mv_names[0]; i++)
        if (strcmp(name, srv_mv_names[i]) == 0) {
            *out = (mv_kind)i;
            return 0;
        }
    return -1;
}

int srv_pg_statement(job *j, movement *out, int *n)
{
    *n = 0;
    es_txn *txn = NULL;
    PGconn *c;
    if (pg_read_begin(j, &txn, &c) != 0) return -1;
    uint8_t limit[8];
    be64(limit, (uint64_t)j->limit);
    const char *values[2] = {(const char *)j->id.bytes,
                             (const char *)limit};
    static const int lengths[2] = {16, 8}, formats[2] = {1, 1};
    static const Oid types[2] = {OID_UUID, OID_INT8};
    PGresult *r = PQexecParams(
        c,
        "SELECT version, kind, amount, balance, transfer_id, other,"
        " (extract(epoch FROM at) * 1000)::int8 FROM bank_statement"
        " WHERE account_id = $1 ORDER BY version DESC LIMIT $2",
        2, types, values, lengths, formats, 0);
    bool ok = PQresultStatus(r) == PGRES_TUPLES_OK;
    for (int i = 0; ok && i < PQntuples(r) && i < j->limit; i++) {
        movement *m = &out[i];
        memset(m, 0, sizeof *m);
        m->version = strtoull(PQgetvalue(r, i, 0), NULL, 10);
        ok = kind_of(PQgetvalue(r, i, 1), &m->kind) == 0;
        m->amount = strtoll(PQgetvalue(r, i, 2), NULL, 10);
        m->balance = strtoll(PQgetvalue(r, i, 3), NULL, 10);
        if (!PQgetisnull(r, i, 4))
            ok = ok && es_uuid_parse(PQgetvalue(r, i, 4),
                                     &m->transfer_id) == 0;
        if (!PQgetisnull(r, i, 5))
            ok = ok && es_uuid_parse(PQgetvalue(r, i, 5), &m->other) == 0;
        m->at_ms = strtoll(PQgetvalue(r, i, 6), NULL, 10);
        if (ok) *n = i + 1;
    }
    bool failed = PQresultStatus(r) != PGRES_TUPLES_OK;
    PQclear(r);
    es_txn_rollback(txn);
    if (failed) {
        srv_job_error(j, 503, "overloaded", NULL);
        return -1;
    }
    if (!ok) {
        srv_job_error(j, 500, "internal", "a statement row does not read");
        return -1;
    }
    return 0;
}
