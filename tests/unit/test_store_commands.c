/* Command-id records in the in-memory store: insert with skip semantics,
 * lookup, savepoints, commit conflicts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "core/internal.h"
#include "eventastic.h"
#include "store/store_impl.h"

static es__command_record record(const es_uuid *cmd, const es_uuid *agg,
                                 const char *payload, uint64_t version)
{
    es__command_record r;
    memset(&r, 0, sizeof r);
    r.command_id = *cmd;
    r.aggregate_id = *agg;
    r.kind = 7;
    r.payload = (const uint8_t *)payload;
    r.len = strlen(payload);
    r.first_version = version;
    r.event_count = 1;
    r.version = version;
    return r;
}

static void test_store_commands_insert_skip_lookup(void **state)
{
    (void)state;
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    assert_true(es__store_has_commands(store));
    es_uuid c1, c2, agg;
    es_uuid_v7(&c1);
    es_uuid_v7(&c2);
    es_uuid_v7(&agg);

    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, NULL), 0);
    es__command_record recs[3] = {record(&c1, &agg, "one", 0),
                                  record(&c2, &agg, "two", 1),
                                  record(&c1, &agg, "again", 2)};
    bool ins[3];
    assert_int_equal(es__txn_insert_commands(txn, recs, 3, ins, NULL), 0);
    assert_true(ins[0]);
    assert_true(ins[1]);
    assert_false(ins[2]); /* skipped: id taken in this transaction */
    es__command_record *got = NULL;
    assert_int_equal(es__txn_get_command(txn, &c2, &got, NULL), 0);
    assert_int_equal(got->len, 3);
    assert_memory_equal(got->payload, "two", 3);
    es__free(got);
    assert_int_equal(es_txn_commit(txn, NULL), 0);

    /* Committed: visible to a new transaction, skipped on insert. */
    assert_int_equal(es_store_begin(store, &txn, NULL), 0);
    assert_int_equal(es__txn_get_command(txn, &c1, &got, NULL), 0);
    assert_true(es_uuid_equal(&got->aggregate_id, &agg));
    assert_int_equal(got->kind, 7);
    assert_int_equal(got->version, 0);
    assert_memory_equal(got->payload, "one", 3);
    es__free(got);
    assert_int_equal(es__txn_insert_commands(txn, &recs[2], 1, ins, NULL), 0);
    assert_false(ins[0]);
    es_uuid unknown;
    es_uuid_v7(&unknown);
    assert_int_equal(es__txn_get_command(txn, &unknown, &got, NULL),
                     ES_ENOTFOUND);
    assert_null(got);
    es_txn_rollback(txn);
    assert_int_equal(es_store_close(store), 0);
}

static void test_store_commands_savepoint_and_conflict(void **state)
{
    (void)state;
    es_store *store = NULL;
    assert_int_equal(es_memory_store_open(&store, NULL), 0);
    es_uuid c1, c2, agg;
    es_uuid_v7(&c1);
    es_uuid_v7(&c2);
    es_uuid_v7(&agg);
    es__command_record r1 = record(&c1, &agg, "x", 0);
    es__command_record r2 = record(&c2, &agg, "y", 1);
    bool ins;

    /* Rolled back to a savepoint: gone. */
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, NULL), 0);
    assert_int_equal(es__txn_savepoint(txn, NULL), 0);
    assert_int_equal(es__txn_insert_commands(txn, &r1, 1, &ins, NULL), 0);
    assert_true(ins);
    assert_int_equal(es__txn_rollback_to(txn, NULL), 0);
    es__command_record *got = NULL;
    assert_int_equal(es__txn_get_command(txn, &c1, &got, NULL), ES_ENOTFOUND);
    assert_int_equal(es__txn_insert_commands(txn, &r2, 1, &ins, NULL), 0);
    assert_int_equal(es_txn_commit(txn, NULL), 0);

    /* Two transactions insert one id: the second commit conflicts and
     * applies nothing. */
    es_txn *a = NULL, *b = NULL;
    assert_int_equal(es_store_begin(store, &a, NULL), 0);
    assert_int_equal(es_store_begin(store, &b, NULL), 0);
    assert_int_equal(es__txn_insert_commands(a, &r1, 1, &ins, NULL), 0);
    assert_true(ins);
    assert_int_equal(es__txn_insert_commands(b, &r1, 1, &ins, NULL), 0);
    assert_true(ins);
    assert_int_equal(es_txn_commit(a, NULL), 0);
    es_error err = {0};
    assert_int_equal(es_txn_commit(b, &err), ES_ECONFLICT);
    assert_true(es_uuid_equal(&err.aggregate_id, &agg));

    assert_int_equal(es_store_begin(store, &txn, NULL), 0);
    assert_int_equal(es__txn_get_command(txn, &c1, &got, NULL), 0);
    assert_memory_equal(got->payload, "x", 1);
    es__free(got);
    assert_int_equal(es__txn_get_command(txn, &c2, &got, NULL), 0);
    es__free(got);
    es_txn_rollback(txn);
    assert_int_equal(es_store_close(store), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_store_commands_insert_skip_lookup),
        cmocka_unit_test(test_store_commands_savepoint_and_conflict),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
