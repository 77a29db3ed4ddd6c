/*
 * What the PostgreSQL store reads off the wire: errors (SQLSTATE to
 * status, messages scrubbed of the password) and binary values (integers
 * in network order, arrays of them, the columns of a result).
 */
#include "store/pg/pg_int.h"

const int es__pg_binary_formats[MAX_PARAMS] = {1, 1, 1, 1, 1, 1, 1, 1, 1};

/* ---- errors ---- */

/* Copy msg into out with every occurrence of secret replaced, and the
 * trailing newline libpq adds dropped. */
void es__pg_scrub(char *out, size_t cap, const char *msg, const char *secret)
{
    size_t k = 0, slen = secret ? strlen(secret) : 0;
    for (const char *p = msg; *p != '\0' && k + 1 < cap;) {
        if (slen > 0 && strncmp(p, secret, slen) == 0) {
            for (const char *r = "***"; *r != '\0' && k + 1 < cap; r++)
                out[k++] = *r;
            p += slen;
            continue;
        }
        out[k++] = (*p == '\n' || *p == '\r' || *p == '\t') ? ' ' : *p;
        p++;
    }
    while (k > 0 && out[k - 1] == ' ') k--;
    out[k] = '\0';
}

static int status_for_sqlstate(const char *st)
{
    if (strcmp(st, "23505") == 0 || strcmp(st, "40001") == 0 ||
        strcmp(st, "40P01") == 0)
        return ES_ECONFLICT;
    if (strcmp(st, "57014") == 0) return ES_ETIMEDOUT;
    if (strncmp(st, "22", 2) == 0) return ES_EINVAL;
    if (strncmp(st, "08", 2) == 0) return ES_EDB;
    return ES_EDB;
}

/* The connection is gone: no result, a broken connection, or an error
 * libpq made itself (no SQLSTATE: "server closed the connection
 * unexpectedly"), which in pipeline mode comes before the status turns
 * CONNECTION_BAD.  Errors from the server always carry a SQLSTATE. */
bool es__pg_conn_lost(PGconn *c, const PGresult *r)
{
    return r == NULL || PQstatus(c) == CONNECTION_BAD ||
           (PQresultStatus(r) == PGRES_FATAL_ERROR &&
            PQresultErrorField(r, PG_DIAG_SQLSTATE) == NULL);
}

/* An es_error for a failed statement (r may be NULL). */
int es__pg_db_error(PGconn *c, const PGresult *r, es_error *err,
                    const char *what)
{
    char msg[200];
    if (es__pg_conn_lost(c, r)) {
        es__pg_scrub(msg, sizeof msg, PQerrorMessage(c), NULL);
        es__error_set(err, ES_EDB, "%s: connection to the database lost: %s",
                      what, msg);
        if (err) memcpy(err->sqlstate, LOST_SQLSTATE, 6);
        return ES_EDB;
    }
    const char *st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    const char *primary = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
    if (primary == NULL) primary = PQresultErrorMessage(r);
    es__pg_scrub(msg, sizeof msg, primary ? primary : "unknown error", NULL);
    if (st == NULL || strlen(st) != 5) st = "XX000";
    int code = status_for_sqlstate(st);
    es__error_set(err, code, "%s: %s (SQLSTATE %s)", what, msg, st);
    if (err) memcpy(err->sqlstate, st, 6);
    return code;
}

/* ---- binary values ---- */

void es__pg_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

void es__pg_be64(uint8_t *p, uint64_t v)
{
    es__pg_be32(p, (uint32_t)(v >> 32));
    es__pg_be32(p + 4, (uint32_t)v);
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
           (uint32_t)p[3];
}

uint64_t es__pg_get64(const uint8_t *p)
{
    return (uint64_t)get32(p) << 32 | get32(p + 4);
}

int es__pg_put32(es_buf *b, uint32_t v)
{
    uint8_t x[4];
    es__pg_be32(x, v);
    return es_buf_append(b, x, 4);
}

/* Binary array header: one dimension of n items, no nulls. */
int es__pg_array_begin(es_buf *b, Oid elem, size_t n)
{
    int rc = es__pg_put32(b, 1);
    if (rc == 0) rc = es__pg_put32(b, 0);
    if (rc == 0) rc = es__pg_put32(b, elem);
    if (rc == 0) rc = es__pg_put32(b, (uint32_t)n);
    if (rc == 0) rc = es__pg_put32(b, 1);
    return rc;
}

int es__pg_array_item(es_buf *b, const void *data, size_t len)
{
    int rc = es__pg_put32(b, (uint32_t)len);
    return rc == 0 ? es_buf_append(b, data, len) : rc;
}

int es__pg_array_i64(es_buf *b, int64_t v)
{
    uint8_t x[8];
    es__pg_be64(x, (uint64_t)v);
    return es__pg_array_item(b, x, 8);
}

int es__pg_array_i32(es_buf *b, int32_t v)
{
    uint8_t x[4];
    es__pg_be32(x, (uint32_t)v);
    return es__pg_array_item(b, x, 4);
}

/* Column readers; false when the value is NULL or of another type. */
bool es__pg_col_uuid(const PGresult *r, int row, int col, es_uuid *out)
{
    if (PQgetisnull(r, row, col) || PQgetlength(r, row, col) != 16)
        return false;
    memcpy(out->bytes, PQgetvalue(r, row, col), 16);
    return true;
}

bool es__pg_col_u64(const PGresult *r, int row, int col, uint64_t *out)
{
    if (PQgetisnull(r, row, col) || PQgetlength(r, row, col) != 8)
        return false;
    uint64_t v = es__pg_get64((const uint8_t *)PQgetvalue(r, row, col));
    if (v > INT64_MAX) return false; /* negative */
    *out = v;
    return true;
}

bool es__pg_col_i32(const PGresult *r, int row, int col, int32_t *out)
{
    if (PQgetisnull(r, row, col) || PQgetlength(r, row, col) != 4)
        return false;
    *out = (int32_t)get32((const uint8_t *)PQgetvalue(r, row, col));
    return true;
}

bool es__pg_col_bytes(const PGresult *r, int row, int col, const uint8_t **data,
                      size_t *len)
{
    if (PQgetisnull(r, row, col)) return false;
    *data = (const uint8_t *)PQgetvalue(r, row, col);
    *len = (size_t)PQgetlength(r, row, col);
    return true;
}

int es__pg_bad_row(es_error *err, const char *what)
{
    return es__error_set(err, ES_EDB, "%s: a row has an unexpected NULL, "
                         "negative number or column type", what);
}
