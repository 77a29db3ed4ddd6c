/*
 * The PostgreSQL store's statements, as text, for the test that reads
 * their plans (tests/test_pg_plans.c): every statement on a command's path
 * must be an index probe whatever the table size, its statistics or the
 * plan cache mode (guarantee 10).  Never installed.
 */
#ifndef ES_PG_STATEMENTS_H
#define ES_PG_STATEMENTS_H

#include <stdbool.h>
#include <stddef.h>

#include "eventastic/store.h"

/* Run on every connection of the store that serves commands (the pool,
 * the lanes, the background writers); one statement, so that it can go in
 * a pipeline.  Each statement the store runs there has an index to probe,
 * and with sequential scans off the planner takes it even for a table
 * that was tiny when a generic plan was made: such a plan (a scan is
 * cheapest on a page or two) stays cached while the table grows, until
 * autovacuum's ANALYZE.  An operator's counts still scan, as the only
 * plan they have, but costed with the scan penalty they would pass the
 * JIT's thresholds and be compiled on every call (200 ms for the outbox
 * statistics): the JIT is off, and no statement of the store needs it. */
#define ES__PG_SESSION                                                      \
    "SELECT set_config('enable_seqscan', 'off', false), "                   \
    "set_config('jit', 'off', false)"

/* Statement i of a PostgreSQL store (0, 1, ... until NULL): its text,
 * with its name in *name and in *admin whether only an operator's tool
 * runs it (counts, listings, purges: they may scan).  NULL past the end
 * or for a store of another backend.  Thread: any; the text lives as long
 * as the store. */
const char *es__pg_statement(const es_store *store, size_t i,
                             const char **name, bool *admin);

#endif
