/*
 * A PostgreSQL store without a database, for the fuzz targets of the
 * store's row decoding and of the migrations' checksum reading.
 *
 * The target links the store's real objects and calls its internal
 * functions (src/store/pg/pg_int.h); configure.py links it with
 * -Wl,--wrap=PQexecParams -Wl,--wrap=PQexec, so the store's calls of
 * those go to the target's __wrap_PQexecParams and __wrap_PQexec: every
 * statement the store sends is answered with a result made from the fuzz
 * input (PQmakeEmptyPGresult, PQsetResultAttrs, PQsetvalue), shaped as
 * the statement's real result (its columns, binary or text).  When the
 * input runs out, the fake answers NULL: the connection is lost.  So the
 * real reading code runs unchanged.
 *
 * A cell in the input: two bytes of length, little endian (0xffff:
 * NULL), then that many bytes (cut to what is left).  A result: one byte
 * of row count (mod 9), then rows x columns cells.
 */
#ifndef FUZZ_PG_FAKE_H
#define FUZZ_PG_FAKE_H

#include <libpq-fe.h>
#include <stdint.h>
#include <string.h>

typedef struct fz_in {
    const uint8_t *p;
    size_t n;
} fz_in;

static fz_in fz; /* the input the fakes read */

static int fz_byte(void)
{
    if (fz.n == 0) return -1;
    fz.n--;
    return *fz.p++;
}

/* A result of ncols columns (all in format fmt) from the input; NULL when
 * the input has run out. */
static PGresult *fz_result(int ncols, int fmt)
{
    int rows = fz_byte();
    if (rows < 0) return NULL;
    rows %= 9;
    PGresult *r = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
    if (r == NULL) return NULL;
    PGresAttDesc att[16];
    memset(att, 0, sizeof att);
    for (int c = 0; c < ncols && c < 16; c++) {
        att[c].name = (char *)"c";
        att[c].format = fmt;
        att[c].typlen = -1;
        att[c].atttypmod = -1;
    }
    if (!PQsetResultAttrs(r, ncols, att)) {
        PQclear(r);
        return NULL;
    }
    for (int row = 0; row < rows; row++)
        for (int c = 0; c < ncols; c++) {
            int lo = fz_byte(), hi = fz_byte();
            size_t len = lo < 0 ? 0 : (size_t)lo | (size_t)(hi < 0 ? 0 : hi)
                                                        << 8;
            if (len == 0xffff) {
                PQsetvalue(r, row, c, NULL, -1);
                continue;
            }
            if (len > fz.n) len = fz.n;
            PQsetvalue(r, row, c, (char *)fz.p, (int)len);
            fz.p += len;
            fz.n -= len;
        }
    return r;
}

static PGresult *fz_status(ExecStatusType st)
{
    return PQmakeEmptyPGresult(NULL, st);
}

#endif
