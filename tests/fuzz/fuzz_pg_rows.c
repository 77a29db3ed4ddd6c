/*
 * libFuzzer target: the PostgreSQL store's row decoding, with no database
 * (see pg_fake.h): event rows (stream pages, the cursor's fetches, one
 * event by id), snapshot rows, side-effect rows, outbox rows, command-id
 * rows (a rejection's reason, plain or sealed) and data-key rows, plain
 * or sealed (the encrypted envelope: the wrapped data key and the
 * payloads that it opens).
 *
 * Input: byte 0 picks the reader, byte 1 the options (bit 0: the store
 * has a master key; bit 1: data-key rows are valid wrappings of a fixed
 * data key and payloads of rows with a key id are sealed with it, so the
 * opening succeeds and the fuzzer's bytes are the plaintext; bits 2-3:
 * the stream's page size - 1), then the results, in the order the reader
 * asks for them.  A reader must return 0 or a negative status, set the
 * error when it fails, and never crash, leak or read out of bounds.
 */
#include "store/pg/pg_int.h"

#include "pg_fake.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static pg_store S;
static pg_key K = {"fuzz", {0}};
static const uint8_t DEK[crypto_aead_xchacha20poly1305_ietf_KEYBYTES] = {
    0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42,
    0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42,
    0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42};
static bool seal;  /* option bit 1 */
static es_uuid agg; /* the aggregate the reader asked for */
static uint64_t snapshot_version;
static es_uuid command_id; /* the command id the reader asked for */
static char names[SQL_COUNT][8];

/* Payload cell pcol of each row with a key id (kcol) sealed under DEK with
 * the associated data the reader will check. */
static void seal_rows(PGresult *r, int what, int pcol, int kcol)
{
    for (int row = 0; row < PQntuples(r); row++) {
        if (PQgetisnull(r, row, kcol) || PQgetisnull(r, row, pcol)) continue;
        ad_buf ad;
        es_side_effect se;
        uint64_t v = 0;
        if (what == 0 || what == 1) { /* stream, get event */
            int vcol = what == 0 ? 0 : 1;
            if (!es__pg_col_u64(r, row, vcol, &v)) continue;
            es_uuid who = agg;
            if (what == 1 && !es__pg_col_uuid(r, row, 0, &who)) continue;
            es__pg_ad_event(&ad, &who, v);
        } else if (what == 5) { /* command id: a rejection's reason */
            es_uuid who;
            if (!es__pg_col_uuid(r, row, 0, &who)) continue;
            es__pg_ad_rejection(&ad, &command_id, &who);
        } else if (what == 2) { /* snapshot: the type, then its columns */
            if (!es__pg_col_u64(r, row, 1, &v)) continue;
            es__pg_ad_snapshot(&ad, &agg, snapshot_version, v);
        } else { /* side effect, outbox */
            if (!es__pg_col_uuid(r, row, 0, &se.id) ||
                !es__pg_col_uuid(r, row, 1, &se.aggregate_id) ||
                !es__pg_col_uuid(r, row, 2, &se.event_id) ||
                !es__pg_col_i32(r, row, 3, &se.kind))
                continue;
            es__pg_ad_side_effect(&ad, &se);
        }
        es_buf b = {0};
        if (es__pg_seal_append(&b, DEK, &ad,
                               (const uint8_t *)PQgetvalue(r, row, pcol),
                               (size_t)PQgetlength(r, row, pcol)) == 0)
            PQsetvalue(r, row, pcol, (char *)b.data, (int)b.len);
        es_buf_free(&b);
    }
}

static PGresult *key_row(const char *const *values)
{
    if (!seal) return fz_result(2, 1);
    es_uuid who;
    memcpy(who.bytes, values[0], 16);
    uint8_t wrapped[ES_PG_WRAPPED_MAX];
    size_t len = 0;
    PGresult *r = fz_result(0, 1); /* consumes a byte, as a result would */
    if (r == NULL) return NULL;
    PQclear(r);
    r = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
    PGresAttDesc att[2];
    memset(att, 0, sizeof att);
    att[0].name = att[1].name = (char *)"c";
    att[0].format = att[1].format = 1;
    PQsetResultAttrs(r, 2, att);
    es__pg_keyring_wrap(&S, K.id, &who, DEK, wrapped, &len, NULL);
    PQsetvalue(r, 0, 0, K.id, (int)strlen(K.id));
    PQsetvalue(r, 0, 1, (char *)wrapped, (int)len);
    return r;
}

PGresult *__wrap_PQexecParams(PGconn *conn, const char *command, int nParams,
                           const Oid *paramTypes,
                           const char *const *paramValues,
                           const int *paramLengths, const int *paramFormats,
                           int resultFormat)
{
    (void)conn, (void)nParams, (void)paramTypes, (void)paramLengths,
        (void)paramFormats, (void)resultFormat;
    PGresult *r = NULL;
    if (command == S.sql[SQL_STREAM] || strncmp(command, "FETCH", 5) == 0) {
        r = fz_result(6, 1);
        if (r && seal) seal_rows(r, 0, 3, 4);
    } else if (strncmp(command, "DECLARE", 7) == 0) {
        r = fz_byte() < 0 ? NULL : fz_status(PGRES_COMMAND_OK);
    } else if (command == S.sql[SQL_GET_EVENT]) {
        r = fz_result(5, 1);
        if (r && seal) seal_rows(r, 1, 3, 4);
    } else if (command == S.sql[SQL_GET_SNAPSHOT]) {
        r = fz_result(4, 1);
        if (r && seal) seal_rows(r, 2, 2, 3);
    } else if (command == S.sql[SQL_LIST_SIDE_EFFECTS]) {
        r = fz_result(6, 1);
        if (r && seal) seal_rows(r, 3, 4, 5);
    } else if (command == S.sql[SQL_GET_COMMAND]) {
        r = fz_result(8, 1);
        if (r && seal) seal_rows(r, 5, 6, 7);
    } else if (command == S.sql[SQL_GET_KEY] ||
               command == S.sql[SQL_LOCK_KEY]) {
        r = key_row(paramValues);
    }
    return r; /* NULL: the connection is lost */
}

PGresult *__wrap_PQexec(PGconn *conn, const char *query)
{
    (void)conn, (void)query; /* CLOSE of a stream's cursor */
    return fz_byte() < 0 ? NULL : fz_status(PGRES_COMMAND_OK);
}

static int count_event(void *ud, const es_event *ev)
{
    size_t *n = ud;
    if (ev->len > 0 && ev->data == NULL) abort();
    (*n)++;
    return 0;
}

static void check(int rc, const es_error *err)
{
    if (rc > 0) abort(); /* not a status */
    if (rc != 0 && err->code != rc) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2) return 0;
    if (S.sql[0] == NULL) {
        for (int i = 0; i < SQL_COUNT; i++) {
            snprintf(names[i], sizeof names[i], "S%d", i);
            S.sql[i] = names[i];
        }
        memset(K.key, 7, sizeof K.key);
        if (sodium_init() < 0) abort();
    }
    int what = data[0] % 7;
    int opts = data[1];
    fz.p = data + 2;
    fz.n = size - 2;
    seal = (opts & 2) != 0;
    S.encrypt = (opts & 1) != 0 || seal;
    S.keys = &K;
    S.n_keys = 1;
    S.provider = (es_pg_key_provider){
        es__pg_keyring_current, es__pg_keyring_wrap, es__pg_keyring_unwrap, &S};
    S.chunk = 1 + (size_t)((opts >> 2) & 3);
    pg_txn t;
    memset(&t, 0, sizeof t);
    t.base.store = &S.base;
    memset(agg.bytes, 0xa5, 16);
    snapshot_version = 3;
    es_error err = {0};
    int rc = 0;
    switch (what) {
    case 0: {
        size_t n = 0;
        rc = es__pg_stream(&t.base, (opts & 32) ? "fuzz" : NULL, &agg, 0,
                           count_event, &n, &err);
        break;
    }
    case 1: {
        es_uuid id;
        memset(id.bytes, 0x5a, 16);
        es_event *ev = NULL;
        rc = es__pg_get_event(&t.base, &agg, &id, &ev, &err);
        if (rc == 0 && (ev == NULL || (ev->len && ev->data == NULL)))
            abort();
        es__free(ev);
        break;
    }
    case 2: {
        es_snapshot *snap = NULL;
        rc = es__pg_get_snapshot(&t.base, (opts & 32) ? "fuzz" : NULL, &agg,
                                 snapshot_version, &snap, &err);
        es__free(snap);
        break;
    }
    case 3: {
        es_side_effect_list *list = NULL;
        rc = es__pg_list_side_effects(&t.base, (opts & 16) ? &agg : NULL, &list,
                                      &err);
        es_side_effect_list_free(list);
        break;
    }
    case 4: { /* outbox rows, as claimed, listed or got by id */
        PGresult *r = fz_result(13, 1);
        if (r == NULL) break;
        if (seal) seal_rows(r, 4, 4, 5);
        es_buf plain = {0};
        for (int row = 0; row < PQntuples(r); row++) {
            es_outbox_entry e;
            es_error one = {0};
            int rc1 = es__pg_entry_read(&t, r, row, &e, &plain, &one);
            check(rc1, &one);
            if (rc == 0 && rc1 != 0) {
                rc = rc1;
                err = one;
            }
        }
        es_buf_free(&plain);
        PQclear(r);
        break;
    }
    case 5: {
        memset(command_id.bytes, 0x3c, 16);
        es__command_record *rec = NULL;
        rc = es__pg_get_command(&t.base, &command_id, &rec, &err);
        if (rc == 0 && rec == NULL) abort();
        /* a reason only for a rejection, and never one that is es__pg_forgotten
         */
        if (rc == 0 && (rec->reason != NULL) !=
                           (rec->rejected && !rec->forgotten))
            abort();
        if (rc == 0 && rec->forgotten && !rec->rejected) abort();
        es__free(rec);
        break;
    }
    case 6: {
        const dek_entry *d = NULL;
        rc = es__pg_get_dek(&t, &agg, false, &d, &err);
        if (rc == 0 && d == NULL) abort();
        if (rc == ES_ENOTFOUND) rc = 0; /* no row: not an error here */
        break;
    }
    }
    if (what != 6) check(rc, &err);
    static int verbose = -1; /* FUZZ_PG_VERBOSE=1: each reader's answer */
    if (verbose < 0) verbose = getenv("FUZZ_PG_VERBOSE") != NULL;
    if (verbose)
        fprintf(stderr, "reader %d: %s %s\n", what, es_status_name(rc),
                rc ? err.message : "");
    sodium_memzero(t.dek, sizeof t.dek);
    return 0;
}
