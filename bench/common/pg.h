/*
 * What the PostgreSQL benchmarks (bench_growth, bench_read) share: a
 * store in a schema of its own, a helper connection, events written with
 * SQL instead of through the library, and the host they load.  Each
 * exits the process with a message when something fails (a benchmark
 * has nothing to go on with).
 */
#ifndef BENCH_PG_H
#define BENCH_PG_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>

#include "eventastic.h"

/* Print "<prog>: what: why" and exit 1. */
void bench_die(const char *what, const char *why)
    __attribute__((noreturn));

/* The start of a PostgreSQL benchmark's main: arguments OUT.json
 * [--quick] (*quick), DATABASE_URL set, ids of this run's own
 * (bench_id_prefix), the server's postmaster found for the CPU split.
 * Returns 0, or the exit status to return (the reason printed). */
int bench_pg_begin(int argc, char **argv, bool *quick);

/* A migrated store in schema (DATABASE_URL), pool of 8. */
es_store *bench_pg_open_store(const char *schema);

/* A helper connection to DATABASE_URL, notices quiet. */
PGconn *bench_pg_connect(void);

/* Run text; exit on failure.  The result is the caller's (PQclear). */
PGresult *bench_pg_sql(PGconn *c, const char *text);

/* events events of other aggregates (ten each, kind 2, an 8-byte
 * payload) in id order, so the indexes grow at their end; then VACUUM
 * ANALYZE, as a settled store has had.  Their ids end in 01, the
 * benchmarks' accounts' in 7e (bench_key_of). */
void bench_pg_prefill(PGconn *c, const char *schema, uint64_t events);

/* DROP SCHEMA ... CASCADE. */
void bench_pg_drop(PGconn *c, const char *schema);

/* A host with 2 workers and the deposit aggregate. */
es_host *bench_pg_host(es_store *store);

#endif
