/*
 * A key belongs to the type of its creation event for ever (promise 9):
 * every read and write of it under another type answers ES_EWRONGTYPE
 * without decoding a byte of it, and nil ids are refused at every public
 * entry.  The same bodies run on the memory store and on PostgreSQL.
 *
 * The other type is a twin of the counter: same codecs, same snapshot
 * version, another name, decoders that count their calls.  Were its reads
 * not checked, the counter's rows would decode as the twin's without an
 * error; the counts prove that nothing was decoded.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "eventastic.h"
#include "fixtures/counter.h"
#include "fixtures/ids.h"
#include "fixtures/pg.h"

static atomic_int twin_decodes; /* events and states decoded as the twin */
static es_aggregate_type twin_type;

static int twin_event_decode(int32_t kind, const uint8_t *data, size_t len,
                             void *out, es_error *err)
{
    atomic_fetch_add(&twin_decodes, 1);
    return counter_type.event_decode(kind, data, len, out, err);
}

static int twin_state_decode(const uint8_t *data, size_t len, void *out,
                             es_error *err)
{
    atomic_fetch_add(&twin_decodes, 1);
    return counter_type.state_decode(data, len, out, err);
}

static void twin_init(void)
{
    twin_type = counter_type;
    twin_type.name = "counter_twin";
    twin_type.event_decode = twin_event_decode;
    twin_type.state_decode = twin_state_decode;
}

typedef struct fixture {
    bool pg;
    char schema[40];
    es_store *store;
} fixture;

static int open_store(fixture *f)
{
    if (!f->pg) return es_memory_store_open(&f->store, NULL);
    fixture_pg_random_name(f->schema, sizeof f->schema, "types_");
    return fixture_pg_open(f->schema, &f->store);
}

static int setup_memory(void **state)
{
    static fixture f;
    memset(&f, 0, sizeof f);
    *state = &f;
    return open_store(&f);
}

static int setup_pg(void **state)
{
    static fixture f;
    memset(&f, 0, sizeof f);
    f.pg = true;
    *state = &f;
    return open_store(&f);
}

static int teardown(void **state)
{
    fixture *f = *state;
    int rc = es_store_close(f->store);
    if (f->pg) fixture_pg_drop_schema(f->schema);
    return rc;
}

/* A counter with a few events (and the snapshot each save writes). */
static void make_counter(es_store *store, es_uuid *id, es_uuid *first_event)
{
    counter_context *ctx = NULL;
    es_error err = {0};
    assert_int_equal(counter_start(&ctx, id, &err), 0);
    counter_event add = counter_add(5);
    assert_int_equal(counter_record(ctx, &add, &err), 0);
    *first_event = es_context_uncommitted(counter_context_raw(ctx),
                                                0)->id;
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    assert_int_equal(counter_save(txn, ctx, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    counter_context_free(ctx);
}

static int count_event(void *ud, const es_event *ev)
{
    (void)ev;
    (*(int *)ud)++;
    return 0;
}

static void test_types_reads_and_writes_refuse_another_type(void **state)
{
    fixture *f = *state;
    es_uuid id, first;
    make_counter(f->store, &id, &first);
    atomic_store(&twin_decodes, 0);
    es_error err = {0};

    /* a load: from the snapshot (same snapshot version) or the stream */
    es_context *ctx = NULL;
    assert_int_equal(es_store_load(f->store, &twin_type, &id, &ctx, &err),
                     ES_EWRONGTYPE);
    assert_null(ctx);
    assert_true(es_uuid_equal(&err.aggregate_id, &id));
    assert_non_null(strstr(err.message, "counter_twin"));

    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(f->store, &txn, &err), 0);
    int n = 0;
    assert_int_equal(es_txn_stream_of(txn, &twin_type, &id, 0, count_event,
                                      &n, &err),
                     ES_EWRONGTYPE);
    assert_int_equal(es_txn_stream_of(txn, &twin_type, &id, 1000,
                                      count_event, &n, &err),
                     ES_EWRONGTYPE);
    assert_int_equal(n, 0);
    es_snapshot *snap = NULL;
    assert_int_equal(es_txn_get_snapshot_of(txn, &twin_type, &id, &snap,
                                            &err),
                     ES_EWRONGTYPE);
    assert_null(snap);
    es_side_effect_list *effects = NULL;
    assert_int_equal(es_context_regenerate_side_effects(
                         txn, &twin_type, &id, &first, &effects, &err),
                     ES_EWRONGTYPE);
    assert_null(effects);

    /* the right type reads as before; the untyped reads still read */
    assert_int_equal(es_txn_stream_of(txn, &counter_type, &id, 0,
                                      count_event, &n, &err),
                     0);
    assert_int_equal(n, 2);
    assert_int_equal(es_txn_get_snapshot_of(txn, &counter_type, &id, &snap,
                                            &err),
                     0);
    assert_int_equal(snap->version, 1);
    es_free(snap);
    n = 0;
    assert_int_equal(es_txn_stream(txn, &id, 0, count_event, &n, &err), 0);
    assert_int_equal(n, 2);
    es_txn_rollback(txn);

    /* a write under the twin: refused, nothing stored changes */
    counter_event reset = counter_reset(&id);
    assert_int_equal(es_context_record_new(&twin_type, &id, &reset, &ctx,
                                           &err),
                     0);
    counter_event add = counter_add(1);
    assert_int_equal(es_context_record(ctx, &add, &err), 0);
    assert_int_equal(es_store_begin(f->store, &txn, &err), 0);
    int rc = es_context_save(txn, ctx, &err);
    assert_int_equal(rc, ES_EWRONGTYPE);
    es_txn_rollback(txn);
    es_context_free(ctx);
    counter_context *mine = NULL;
    assert_int_equal(counter_store_load(f->store, &id, &mine, &err), 0);
    assert_int_equal(counter_state(mine)->result, 5);
    assert_int_equal(es_context_version(counter_context_raw(mine)), 1);
    counter_context_free(mine);

    assert_int_equal(atomic_load(&twin_decodes), 0);
}

static void test_types_nil_ids_are_refused(void **state)
{
    fixture *f = *state;
    const es_uuid nil = {{0}};
    es_uuid id = fixture_new_id();
    es_error err = {0};
    es_context *ctx = NULL;
    assert_int_equal(es_store_load(f->store, &counter_type, &nil, &ctx, &err),
                     ES_EINVAL);
    counter_event reset = counter_reset(&nil);
    assert_int_equal(es_context_record_new(&counter_type, &nil, &reset, &ctx,
                                           &err),
                     ES_EINVAL);
    assert_null(ctx);

    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(f->store, &txn, &err), 0);
    assert_int_equal(es_context_load(txn, &counter_type, &nil, &ctx, &err),
                     ES_EINVAL);
    int n = 0;
    assert_int_equal(es_txn_stream(txn, &nil, 0, count_event, &n, &err),
                     ES_EINVAL);
    assert_int_equal(es_txn_stream_of(txn, &counter_type, &nil, 0,
                                      count_event, &n, &err),
                     ES_EINVAL);
    es_event *ev = NULL;
    assert_int_equal(es_txn_get_event(txn, &nil, &id, &ev, &err), ES_EINVAL);
    assert_int_equal(es_txn_get_event(txn, &id, &nil, &ev, &err), ES_EINVAL);
    es_snapshot *snap = NULL;
    assert_int_equal(es_txn_get_snapshot(txn, &nil, 1, &snap, &err),
                     ES_EINVAL);
    assert_int_equal(es_txn_get_snapshot_of(txn, &counter_type, &nil, &snap,
                                            &err),
                     ES_EINVAL);
    const uint8_t bytes[1] = {0};
    es_snapshot put = {nil, 0, 1, bytes, 1};
    assert_int_equal(es_txn_store_snapshot(txn, &put, &err), ES_EINVAL);
    assert_int_equal(es_txn_delete_snapshots(txn, &nil, &err), ES_EINVAL);
    es_side_effect_list *list = NULL;
    assert_int_equal(es_txn_list_side_effects(txn, &nil, &list, &err),
                     ES_EINVAL);
    assert_int_equal(es_context_regenerate_side_effects(
                         txn, &counter_type, &nil, &id, &list, &err),
                     ES_EINVAL);
    assert_int_equal(es_context_regenerate_side_effects(
                         txn, &counter_type, &id, &nil, &list, &err),
                     ES_EINVAL);
    assert_null(list);
    es_txn_rollback(txn);
    assert_int_equal(n, 0);
}

/* ---- the host ---- */

static es_host *host_open(es_store *store)
{
    es_host_config *cfg = NULL;
    es_host *host = NULL;
    assert_int_equal(es_host_config_new(&cfg, NULL), 0);
    assert_int_equal(es_host_config_set_workers(cfg, 2), 0);
    assert_int_equal(es_host_config_add_type(cfg, &counter_type,
                                             counter_decide_add, NULL, NULL),
                     0);
    assert_int_equal(es_host_config_add_type(cfg, &twin_type,
                                             counter_decide_add, NULL, NULL),
                     0);
    assert_int_equal(es_host_open(cfg, store, &host, NULL), 0);
    es_host_config_free(cfg);
    return host;
}

static es_command add_command(const es_uuid *id, int32_t v, uint8_t p[4])
{
    uint32_t u = (uint32_t)v;
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(u >> (8 * i));
    es_command c = {*id, 1, p, 4};
    return c;
}

static int add(es_host *host, const es_aggregate_type *type,
               const es_uuid *key, const es_uuid *command_id, int32_t v)
{
    uint8_t p[4];
    es_command c = add_command(command_id, v, p);
    return es_host_call(host, type, key, &c, NULL, NULL);
}

/* The resident gauge falls to `want` (an actor is dropped just after its
 * last completion); false after 5 s. */
static bool resident_falls_to(es_host *host, uint64_t want)
{
    for (int i = 0; i < 5000; i++) {
        es_host_metrics m;
        if (es_host_metrics_get(host, &m) == 0 && m.resident == want)
            return true;
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    return false;
}

static void test_types_host_answers_wrong_type_and_serves_the_key(
    void **state)
{
    fixture *f = *state;
    atomic_store(&twin_decodes, 0);
    es_uuid key = fixture_new_id(), other = fixture_new_id();
    es_host *host = host_open(f->store);
    es_uuid first = fixture_new_id();
    assert_int_equal(add(host, &counter_type, &key, &first, 2), 0);

    /* resident as a counter: a twin command is answered at once, and the
     * counter goes on */
    es_uuid c1 = fixture_new_id(), c2 = fixture_new_id();
    assert_int_equal(add(host, &twin_type, &key, &c1, 3), ES_EWRONGTYPE);
    assert_int_equal(add(host, &counter_type, &key, &c2, 3), 0);
    /* the same command id and content again, under the twin: the type,
     * not a failure to read the events back */
    assert_int_equal(add(host, &twin_type, &key, &first, 2), ES_EWRONGTYPE);
    assert_true(resident_falls_to(host, 1));
    assert_int_equal(es_host_shutdown(host, NULL), 0);

    /* not resident: the twin comes first, fails its load, and is not
     * kept in the way of the counter's next command */
    host = host_open(f->store);
    es_uuid c3 = fixture_new_id(), c4 = fixture_new_id(), c5 = fixture_new_id();
    assert_int_equal(add(host, &twin_type, &key, &c3, 7), ES_EWRONGTYPE);
    assert_true(resident_falls_to(host, 0));
    assert_int_equal(add(host, &counter_type, &key, &c4, 7), 0);
    /* a fresh key takes the type of its first command */
    assert_int_equal(add(host, &twin_type, &other, &c5, 1), 0);
    assert_int_equal(add(host, &counter_type, &other, &c1, 1),
                     ES_EWRONGTYPE);
    assert_int_equal(es_host_shutdown(host, NULL), 0);
    /* nil ids never reach a mailbox */
    host = host_open(f->store);
    const es_uuid nil = {{0}};
    assert_int_equal(add(host, &counter_type, &nil, &c2, 1), ES_EINVAL);
    assert_int_equal(add(host, &counter_type, &key, &nil, 1), ES_EINVAL);
    assert_int_equal(es_host_shutdown(host, NULL), 0);

    counter_context *ctx = NULL;
    assert_int_equal(counter_store_load(f->store, &key, &ctx, NULL), 0);
    assert_int_equal(counter_state(ctx)->result, 2 + 3 + 7);
    counter_context_free(ctx);
    /* the twin's own key decoded as the twin; nothing of the counter's */
    es_context *twin = NULL;
    atomic_store(&twin_decodes, 0);
    assert_int_equal(es_store_load(f->store, &twin_type, &other, &twin, NULL),
                     0);
    assert_true(atomic_load(&twin_decodes) > 0);
    es_context_free(twin);
}

int main(void)
{
    twin_init();
    const struct CMUnitTest memory[] = {
        cmocka_unit_test_setup_teardown(
            test_types_reads_and_writes_refuse_another_type, setup_memory,
            teardown),
        cmocka_unit_test_setup_teardown(test_types_nil_ids_are_refused,
                                        setup_memory, teardown),
        cmocka_unit_test_setup_teardown(
            test_types_host_answers_wrong_type_and_serves_the_key,
            setup_memory, teardown),
    };
    const struct CMUnitTest pg[] = {
        cmocka_unit_test_setup_teardown(
            test_types_reads_and_writes_refuse_another_type, setup_pg,
            teardown),
        cmocka_unit_test_setup_teardown(test_types_nil_ids_are_refused,
                                        setup_pg, teardown),
        cmocka_unit_test_setup_teardown(
            test_types_host_answers_wrong_type_and_serves_the_key, setup_pg,
            teardown),
    };
    int failed = cmocka_run_group_tests_name("memory store", memory, NULL,
                                             NULL);
    if (getenv("DATABASE_URL") == NULL) {
        printf("test_pg_types: DATABASE_URL is not set (tests/run.py sets "
               "it): the PostgreSQL half did not run\n");
        return failed ? failed : 1;
    }
    return failed + cmocka_run_group_tests_name("postgres store", pg, NULL,
                                                NULL);
}
