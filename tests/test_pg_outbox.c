/*
 * The outbox dispatcher on the PostgreSQL store: the tests of
 * suites/outbox.c, as test_outbox.c runs them on the in-memory
 * store (delivery, retries with backoff, dead letters, requeue, poison
 * messages, order per aggregate, several dispatchers, expired claims,
 * wake-up and polling), with each store a PostgreSQL store on a fresh
 * schema of its own (dropped at the end), so the same semantics are
 * checked on both stores.
 */
#include <stdio.h>
#include <stdlib.h>

#include "eventastic.h"
#include "suites/outbox.h"
#include "fixtures/pg.h"

#define MAX_SCHEMAS 16

static struct {
    es_store *store;
    char schema[40];
} g_open[MAX_SCHEMAS];

/* A store on a schema of its own. */
static int pg_outbox_store_open(es_store **out)
{
    size_t slot = 0;
    while (slot < MAX_SCHEMAS && g_open[slot].store != NULL) slot++;
    if (slot == MAX_SCHEMAS) return ES_ENOMEM;
    fixture_pg_random_name(g_open[slot].schema, sizeof g_open[slot].schema,
                           "es_outbox_");
    int rc = fixture_pg_open(g_open[slot].schema, out);
    if (rc != 0) return rc;
    g_open[slot].store = *out;
    return 0;
}

/* Close, then drop the schema. */
static int pg_outbox_store_close(es_store *store)
{
    int rc = es_store_close(store);
    for (size_t i = 0; i < MAX_SCHEMAS; i++)
        if (g_open[i].store == store) {
            fixture_pg_drop_schema(g_open[i].schema);
            g_open[i].store = NULL;
        }
    return rc;
}

int main(void)
{
    if (getenv("DATABASE_URL") == NULL) {
        printf("test_pg_outbox: skipped, DATABASE_URL is not set "
               "(tests/run.py sets it)\n");
        return 0;
    }
    return outbox_suite_run(pg_outbox_store_open, pg_outbox_store_close);
}
