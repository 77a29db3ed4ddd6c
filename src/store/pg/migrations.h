/*
 * The schema migrations of the PostgreSQL store, embedded in the library.
 * Never installed.
 *
 * Each migration is SQL with placeholders that es_pg_migrate replaces by
 * quoted names: @schema@ (the schema), @events@, @snapshots@, @outbox@,
 * @keys@, @commands@, @projections@ (schema-qualified tables).  The
 * checksum is taken over this text, before the names are put in, so it
 * does not depend on the configuration.
 * Rule: a migration that has shipped is never edited; change the schema
 * with a new one at the end.
 */
#ifndef ES_PG_MIGRATIONS_H
#define ES_PG_MIGRATIONS_H

#include <stddef.h>

typedef struct es__pg_migration {
    int version; /* 1, 2, 3, ... in order */
    const char *name;
    const char *sql;
} es__pg_migration;

extern const es__pg_migration es__pg_migrations[];
extern const size_t es__pg_migration_count;

#endif
