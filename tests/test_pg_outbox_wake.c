/*
 * Cross-process wake-up of the outbox dispatcher on PostgreSQL: a commit
 * made through another store handle (as another process would: no commit
 * listener is shared) wakes a dispatcher that polls once a minute, through
 * NOTIFY/LISTEN; a lost LISTEN connection is made again; and a message
 * nobody notified about (a writer without NOTIFY) is still delivered, by
 * polling.  Latencies are printed, not asserted tightly.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "eventastic.h"
#include "suites/outbox.h"
#include "fixtures/pg.h"

static char g_schema[40];
static char g_channel[40];

/* The store's channel: "es_outbox_" + FNV-1a of the qualified table. */
static void channel_of(const char *schema, char *out, size_t cap)
{
    char name[160];
    snprintf(name, sizeof name, "\"%s\".\"outbox\"", schema);
    uint64_t h = 0xcbf29ce484222325u;
    for (const char *s = name; *s != '\0'; s++) {
        h ^= (uint8_t)*s;
        h *= 0x100000001b3u;
    }
    snprintf(out, cap, "es_outbox_%016llx", (unsigned long long)h);
}

/* Backends LISTENing on our channel (their last statement was LISTEN). */
static int listeners(PGconn *c, bool terminate)
{
    char sql[300];
    snprintf(sql, sizeof sql,
             "SELECT %s FROM pg_stat_activity WHERE query = 'LISTEN "
             "\"%s\"' AND pid <> pg_backend_pid()",
             terminate ? "count(pg_terminate_backend(pid))" : "count(*)",
             g_channel);
    PGresult *r = PQexec(c, sql);
    int n = PQresultStatus(r) == PGRES_TUPLES_OK ? atoi(PQgetvalue(r, 0, 0))
                                                 : -1;
    PQclear(r);
    return n;
}

static bool wait_listening(PGconn *c, int want)
{
    for (int i = 0; i < 1000; i++) {
        if (listeners(c, false) >= want) return true;
        usleep(10000);
    }
    return false;
}

static void test_pg_outbox_wake_from_another_store(void **st)
{
    (void)st;
    es_store *mine = NULL, *theirs = NULL;
    assert_int_equal(fixture_pg_open(g_schema, &mine), 0);
    assert_int_equal(fixture_pg_open(g_schema, &theirs), 0);
    PGconn *c = fixture_pg_connect();
    assert_non_null(c);
    recorder r;
    recorder_init(&r);
    /* Poll once a minute: only a notification can deliver quickly. */
    es_outbox *ob = started_outbox(mine, &r, 2, 60000, 10);
    bool up = wait_listening(c, 1);
    int64_t lat[5];
    bool all = up;
    for (size_t i = 0; all && i < 5; i++) {
        usleep(50000); /* the dispatcher sleeps again */
        es_uuid a;
        es_uuid_v7(&a);
        const char *one[] = {"from afar"};
        int64_t t0 = es_clock_now_ms();
        store_job(theirs, &job_type, &a, one, 1, true);
        all = wait_for(&r, i + 1, 10);
        lat[i] = r.deliver_ms - t0;
    }
    es_outbox_metrics m;
    es_outbox_metrics_get(ob, &m);
    es_outbox_close(ob);
    assert_true(up);
    assert_true(all);
    assert_true(m.notifications >= 5);
    print_message("cross-process wake-up latency (poll 60000 ms): "
                  "%lld %lld %lld %lld %lld ms\n",
                  (long long)lat[0], (long long)lat[1], (long long)lat[2],
                  (long long)lat[3], (long long)lat[4]);
    for (size_t i = 0; i < 5; i++) assert_true(lat[i] < 10000);
    PQfinish(c);
    assert_int_equal(es_store_close(theirs), 0);
    assert_int_equal(es_store_close(mine), 0);
}

static void test_pg_outbox_wake_survives_a_lost_listen(void **st)
{
    (void)st;
    es_store *mine = NULL, *theirs = NULL;
    assert_int_equal(fixture_pg_open(g_schema, &mine), 0);
    assert_int_equal(fixture_pg_open(g_schema, &theirs), 0);
    PGconn *c = fixture_pg_connect();
    assert_non_null(c);
    recorder r;
    recorder_init(&r);
    es_outbox *ob = started_outbox(mine, &r, 2, 60000, 10);
    bool up = wait_listening(c, 1);
    int killed = listeners(c, true);
    /* Committed while the LISTEN connection is gone: the reconnection
     * wakes the dispatcher, which finds it. */
    es_uuid a;
    es_uuid_v7(&a);
    const char *one[] = {"while deaf"};
    int64_t t0 = es_clock_now_ms();
    store_job(theirs, &job_type, &a, one, 1, true);
    bool first = wait_for(&r, 1, 10);
    int64_t lat1 = r.deliver_ms - t0;
    bool again = wait_listening(c, 1);
    es_outbox_metrics before;
    es_outbox_metrics_get(ob, &before);
    usleep(50000);
    es_uuid b;
    es_uuid_v7(&b);
    const char *two[] = {"heard again"};
    t0 = es_clock_now_ms();
    store_job(theirs, &job_type, &b, two, 1, true);
    bool second = wait_for(&r, 2, 10);
    int64_t lat2 = r.deliver_ms - t0;
    es_outbox_metrics after;
    es_outbox_metrics_get(ob, &after);
    es_outbox_close(ob);
    assert_true(up);
    assert_int_equal(killed, 1);
    assert_true(first);
    assert_true(again);
    assert_true(second);
    assert_true(after.notifications > before.notifications);
    print_message("after a lost LISTEN: %lld ms (reconnection), then "
                  "%lld ms (notified)\n", (long long)lat1, (long long)lat2);
    PQfinish(c);
    assert_int_equal(es_store_close(theirs), 0);
    assert_int_equal(es_store_close(mine), 0);
}

static void test_pg_outbox_wake_polls_without_notifications(void **st)
{
    (void)st;
    es_store *mine = NULL;
    assert_int_equal(fixture_pg_open(g_schema, &mine), 0);
    PGconn *c = fixture_pg_connect();
    assert_non_null(c);
    recorder r;
    recorder_init(&r);
    es_outbox *ob = started_outbox(mine, &r, 2, 300, 10);
    bool up = wait_listening(c, 1);
    usleep(50000);
    es_outbox_metrics before;
    es_outbox_metrics_get(ob, &before);
    /* A writer that sends no NOTIFY: only polling can find its row. */
    job_effect fx;
    memset(&fx, 0, sizeof fx);
    es_uuid_v7(&fx.id);
    snprintf(fx.text, sizeof fx.text, "unannounced");
    char sql[300];
    snprintf(sql, sizeof sql,
             "INSERT INTO \"%s\".outbox (id, aggregate_id, event_id, kind, "
             "payload, aggregate_type) VALUES (gen_random_uuid(), "
             "gen_random_uuid(), gen_random_uuid(), 7, $1, 'job')",
             g_schema);
    const char *values[1] = {(const char *)&fx};
    const int lens[1] = {(int)sizeof fx}, formats[1] = {1};
    const Oid types[1] = {17}; /* bytea */
    PGresult *res = PQexecParams(c, sql, 1, types, values, lens, formats, 0);
    bool inserted = PQresultStatus(res) == PGRES_COMMAND_OK;
    if (!inserted) fprintf(stderr, "insert: %s", PQerrorMessage(c));
    PQclear(res);
    int64_t t0 = es_clock_now_ms();
    bool got = inserted && wait_for(&r, 1, 10);
    int64_t lat = r.deliver_ms - t0;
    es_outbox_metrics after;
    es_outbox_metrics_get(ob, &after);
    es_outbox_close(ob);
    assert_true(up);
    assert_true(got);
    assert_string_equal(r.text[0], "unannounced");
    assert_int_equal(after.notifications, before.notifications);
    print_message("without a notification: delivered by polling in %lld ms "
                  "(poll 300 ms)\n", (long long)lat);
    PQfinish(c);
    assert_int_equal(es_store_close(mine), 0);
}

/* A store with NOTIFY turned off: its commits are found by polling. */
static void test_pg_outbox_wake_notify_off_polls(void **st)
{
    (void)st;
    es_store *mine = NULL, *quiet = NULL;
    assert_int_equal(fixture_pg_open(g_schema, &mine), 0);
    es_pg_config *cfg = NULL;
    assert_int_equal(es_pg_config_new(&cfg, NULL), 0);
    assert_int_equal(es_pg_config_set_schema(cfg, g_schema, NULL), 0);
    assert_int_equal(es_pg_config_set_outbox_notify(cfg, false, NULL), 0);
    assert_int_equal(es_pg_store_open(cfg, &quiet, NULL), 0);
    es_pg_config_free(cfg);
    assert_int_equal(es_pg_config_set_outbox_notify(NULL, true, NULL),
                     ES_EINVAL);
    PGconn *c = fixture_pg_connect();
    assert_non_null(c);
    recorder r;
    recorder_init(&r);
    es_outbox *ob = started_outbox(mine, &r, 2, 300, 10);
    bool up = wait_listening(c, 1);
    usleep(50000);
    es_outbox_metrics before;
    es_outbox_metrics_get(ob, &before);
    es_uuid a;
    es_uuid_v7(&a);
    const char *one[] = {"quietly"};
    store_job(quiet, &job_type, &a, one, 1, true);
    bool got = wait_for(&r, 1, 10);
    es_outbox_metrics after;
    es_outbox_metrics_get(ob, &after);
    es_outbox_close(ob);
    assert_true(up);
    assert_true(got);
    assert_string_equal(r.text[0], "quietly");
    assert_int_equal(after.notifications, before.notifications);
    PQfinish(c);
    assert_int_equal(es_store_close(quiet), 0);
    assert_int_equal(es_store_close(mine), 0);
}

static int group_setup(void **state)
{
    (void)state;
    fixture_pg_random_name(g_schema, sizeof g_schema, "es_wake_");
    channel_of(g_schema, g_channel, sizeof g_channel);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    fixture_pg_drop_schema(g_schema);
    return 0;
}

int main(void)
{
    if (getenv("DATABASE_URL") == NULL) {
        printf("test_pg_outbox_wake: skipped, DATABASE_URL is not set "
               "(tests/run.py sets it)\n");
        return 0;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_outbox_wake_from_another_store),
        cmocka_unit_test(test_pg_outbox_wake_survives_a_lost_listen),
        cmocka_unit_test(test_pg_outbox_wake_polls_without_notifications),
        cmocka_unit_test(test_pg_outbox_wake_notify_off_polls),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
