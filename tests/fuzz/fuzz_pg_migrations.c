/*
 * libFuzzer target: es_pg_migrate's reading of the migrations table
 * (version and checksum of each applied migration, text results), with
 * no database (see pg_fake.h).  The other statements of a migration
 * succeed; the table's rows are the fuzz input.  It must answer 0 (all
 * known migrations, the missing ones applied) or ES_EDB with a message
 * (unknown version, changed checksum, unreadable row), never crash.
 */
#include "store/pg/pg_int.h"

#include "pg_fake.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A result of one row and one column holding value (binary). */
static PGresult *one_value(const char *value, int len)
{
    PGresult *r = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
    PGresAttDesc att;
    memset(&att, 0, sizeof att);
    att.name = (char *)"c";
    att.format = 1;
    PQsetResultAttrs(r, 1, &att);
    PQsetvalue(r, 0, 0, (char *)value, len);
    return r;
}

PGresult *__wrap_PQexecParams(PGconn *conn, const char *command, int nParams,
                           const Oid *paramTypes,
                           const char *const *paramValues,
                           const int *paramLengths, const int *paramFormats,
                           int resultFormat)
{
    (void)conn, (void)nParams, (void)paramTypes, (void)paramValues,
        (void)paramLengths, (void)paramFormats, (void)resultFormat;
    if (strstr(command, "pg_namespace")) return one_value("\0\0\0\1", 4);
    if (strstr(command, "to_regclass")) return one_value("\1", 1);
    return fz_status(PGRES_COMMAND_OK); /* lock, record a migration */
}

PGresult *__wrap_PQexec(PGconn *conn, const char *query)
{
    (void)conn;
    if (strncmp(query, "SELECT version, checksum", 24) == 0)
        return fz_result(2, 0);
    return fz_status(PGRES_COMMAND_OK); /* a migration's SQL */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static es_pg_config *cfg;
    if (cfg == NULL && es_pg_config_new(&cfg, NULL) != 0) abort();
    fz.p = data;
    fz.n = size;
    es_error err = {0};
    int newest = -1;
    int rc = es__pg_migrate_in(NULL, cfg, &newest, &err);
    if (rc > 0 || (rc != 0 && err.code != rc)) abort();
    if (rc == 0 && newest != es_pg_schema_version()) abort();
    static int verbose = -1; /* FUZZ_PG_VERBOSE=1: the answer */
    if (verbose < 0) verbose = getenv("FUZZ_PG_VERBOSE") != NULL;
    if (verbose)
        fprintf(stderr, "migrate: %s %s\n", es_status_name(rc),
                rc ? err.message : "");
    return 0;
}
