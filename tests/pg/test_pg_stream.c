/*
 * Long streams on the PostgreSQL store (DATABASE_URL): a 150,000-event
 * stream reads in version order with memory bounded by the chunk size, a
 * 150,000-event save goes in one statement and replays, and chunk
 * boundaries lose nothing.
 *
 * Memory is measured two ways: the live heap (glibc mallinfo2, or the
 * sanitizer allocator's count under asan/tsan, whose quarantine makes RSS
 * meaningless) sampled while the stream runs, and, in release builds, the
 * growth of the peak RSS (getrusage).  This binary runs the 150k stream
 * first, so the peak before it is small.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <libpq-fe.h>
#include <malloc.h>
#include <sys/resource.h>
#include <time.h>

#include "eventastic.h"
#include "fixtures/counter.h"
#include "fixtures/ids.h"
#include "fixtures/pg.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZED 1
size_t __sanitizer_get_current_allocated_bytes(void);
#else
#define SANITIZED 0
#endif

#define BIG 150000
#define PAYLOAD 200

static es_store *g_store;
static PGconn *g_sql;

static size_t live_heap(void)
{
#if SANITIZED
    return __sanitizer_get_current_allocated_bytes();
#else
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
#endif
}

static long peak_rss_kb(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sql_ok(const char *query, int n, const char *const *vals)
{
    PGresult *r = PQexecParams(g_sql, query, n, NULL, vals, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        fail_msg("helper SQL failed: %s", PQresultErrorMessage(r));
    PQclear(r);
}

typedef struct reader {
    uint64_t next;
    size_t count;
    bool in_order, payload_ok;
    size_t heap_base, heap_max;
    size_t stop_at; /* 0: never */
} reader;

static uint64_t be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | p[i];
    return v;
}

static int read_event(void *ud, const es_event *ev)
{
    reader *r = ud;
    if (ev->version != r->next) r->in_order = false;
    if (ev->len != PAYLOAD || be64(ev->data) != ev->version ||
        ev->data[PAYLOAD - 1] != 0x5a)
        r->payload_ok = false;
    r->next = ev->version + 1;
    r->count++;
    if (r->count % 500 == 0) {
        size_t h = live_heap();
        if (h > r->heap_max) r->heap_max = h;
    }
    if (r->stop_at && r->count == r->stop_at) return 42;
    return 0;
}

/* n events for agg, written by the server: payload = version (8 bytes,
 * big-endian) then 0x5a bytes, PAYLOAD bytes in all. */
static void insert_events(const es_uuid *agg, int n)
{
    char id[ES_UUID_STRLEN + 1], count[16];
    es_uuid_format(agg, id);
    snprintf(count, sizeof count, "%d", n - 1);
    const char *v[2] = {id, count};
    sql_ok("INSERT INTO events (aggregate_type, aggregate_id, version, "
           "event_id, kind, payload) SELECT 'bulk', $1, g, "
           "gen_random_uuid(), 1, int8send(g) || "
           "decode(repeat('5a', 192), 'hex') FROM generate_series(0, "
           "$2::bigint) AS g",
           2, v);
}

static void test_pg_stream_150k_in_order_bounded_memory(void **state)
{
    (void)state;
    es_uuid agg = fixture_new_id();
    insert_events(&agg, BIG);
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    reader r = {0, 0, true, true, 0, 0, 0};
    long rss_before = peak_rss_kb();
    r.heap_base = r.heap_max = live_heap();
    double t0 = now_s();
    int rc = es_txn_stream(txn, &agg, 0, read_event, &r, &err);
    double dt = now_s() - t0;
    long rss_after = peak_rss_kb();
    es_txn_rollback(txn);
    assert_int_equal(rc, 0);
    assert_int_equal(r.count, BIG);
    assert_true(r.in_order);
    assert_true(r.payload_ok);
    size_t data = (size_t)BIG * PAYLOAD;
    size_t heap_growth = r.heap_max - r.heap_base;
    printf("# 150k stream: %.2f s, %zu MB of payload, live heap growth "
           "%zu KB, peak RSS %ld KB -> %ld KB (+%ld KB)%s\n",
           dt, data >> 20, heap_growth >> 10, rss_before, rss_after,
           rss_after - rss_before, SANITIZED ? " (sanitized build)" : "");
    /* One page of 1000 events is ~0.25 MB; the stream is 28 MB. */
    assert_true(heap_growth < data / 16);
    if (!SANITIZED)
        assert_true((size_t)(rss_after - rss_before) * 1024 < data / 8);
}

static void test_pg_stream_from_version_and_early_stop(void **state)
{
    (void)state;
    es_uuid agg = fixture_new_id();
    insert_events(&agg, 2500);
    es_txn *txn = NULL;
    es_error err = {0};
    assert_int_equal(es_store_begin(g_store, &txn, &err), 0);
    reader r = {1999, 0, true, true, 0, 0, 0};
    assert_int_equal(es_txn_stream(txn, &agg, 1999, read_event, &r, &err), 0);
    assert_int_equal(r.count, 501);
    assert_true(r.in_order);
    reader stop = {0, 0, true, true, 0, 0, 1500};
    assert_int_equal(es_txn_stream(txn, &agg, 0, read_event, &stop, &err), 42);
    assert_int_equal(stop.count, 1500);
    reader none = {0, 0, true, true, 0, 0, 0};
    assert_int_equal(es_txn_stream(txn, &agg, 2500, read_event, &none, &err),
                     0);
    assert_int_equal(es_txn_stream(txn, &agg, UINT64_MAX, read_event, &none,
                                   &err),
                     0);
    assert_int_equal(none.count, 0);
    es_txn_rollback(txn);
}

static void test_pg_stream_chunk_boundaries(void **state)
{
    (void)state;
    es_pg_config *cfg = NULL;
    es_error err = {0};
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    assert_int_equal(es_pg_config_set_chunk_size(cfg, 7, &err), 0);
    es_store *store = NULL;
    assert_int_equal(es_pg_store_open(cfg, &store, &err), 0);
    static const int sizes[] = {0, 1, 6, 7, 8, 14, 15, 50};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        es_uuid agg = fixture_new_id();
        if (sizes[i] > 0) insert_events(&agg, sizes[i]);
        es_txn *txn = NULL;
        assert_int_equal(es_store_begin(store, &txn, &err), 0);
        reader r = {0, 0, true, true, 0, 0, 0};
        assert_int_equal(es_txn_stream(txn, &agg, 0, read_event, &r, &err), 0);
        es_txn_rollback(txn);
        assert_int_equal(r.count, (size_t)sizes[i]);
        assert_true(r.in_order);
    }
    assert_int_equal(es_store_close(store), 0);
    es_pg_config_free(cfg);
}

static long long sql_int(const char *query)
{
    PGresult *r = PQexec(g_sql, query);
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1 ||
        PQgetisnull(r, 0, 0)) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
        PQclear(r);
        fail_msg("helper SQL failed: %s", msg);
    }
    long long v = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

/* The statements are counted by the database itself: an AFTER INSERT
 * trigger FOR EACH STATEMENT on the events table of a schema of the
 * test's own fires once per statement that inserts into it (INSERT or
 * COPY, however many rows, none included) and logs a row.  (A transition
 * table could give each statement's row count too, but costs seconds
 * here; the rows are counted after.)  pg_stat_statements would need
 * shared_preload_libraries, the server log is not ours to read, and the
 * row counters of pg_stat_user_tables count rows, not statements. */
static void test_pg_stream_150k_saved_in_one_statement(void **state)
{
    (void)state;
    char schema[40], q[1024];
    fixture_pg_random_name(schema, sizeof schema, "es_stream_");
    es_store *store = NULL;
    assert_int_equal(fixture_pg_open(schema, &store), 0);
    snprintf(q, sizeof q,
             "CREATE TABLE \"%s\".statements (at timestamptz NOT NULL); "
             "CREATE FUNCTION \"%s\".log_statement() RETURNS trigger "
             "LANGUAGE plpgsql AS $f$ BEGIN INSERT INTO \"%s\".statements "
             "VALUES (clock_timestamp()); RETURN NULL; END $f$; "
             "CREATE TRIGGER log_statement AFTER INSERT ON \"%s\".events "
             "FOR EACH STATEMENT EXECUTE FUNCTION \"%s\".log_statement()",
             schema, schema, schema, schema, schema);
    PGresult *res = PQexec(g_sql, q);
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        fail_msg("trigger: %s", PQresultErrorMessage(res));
    PQclear(res);

    counter_context *ctx = NULL;
    es_uuid id;
    es_error err = {0};
    assert_int_equal(counter_start(&ctx, &id, &err), 0);
    for (int i = 1; i < BIG; i++) {
        counter_event add = counter_add(1);
        assert_int_equal(counter_record(ctx, &add, &err), 0);
    }
    double t0 = now_s();
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(store, &txn, &err), 0);
    assert_int_equal(counter_save(txn, ctx, &err), 0);
    assert_int_equal(es_txn_commit(txn, &err), 0);
    double t_save = now_s() - t0;
    counter_context_free(ctx);

    snprintf(q, sizeof q, "SELECT count(*) FROM \"%s\".statements", schema);
    long long statements = sql_int(q);
    snprintf(q, sizeof q, "SELECT count(*) FROM \"%s\".events", schema);
    long long rows = sql_int(q);
    printf("# 150k save: %lld statement(s) inserted %lld events\n",
           statements, rows);
    assert_int_equal(statements, 1);
    assert_int_equal(rows, BIG);

    char text[ES_UUID_STRLEN + 1];
    es_uuid_format(&id, text);
    const char *v[1] = {text};
    snprintf(q, sizeof q, "DELETE FROM \"%s\".snapshots WHERE aggregate_id "
             "= $1", schema);
    sql_ok(q, 1, v);
    t0 = now_s();
    counter_context *loaded = NULL;
    assert_int_equal(counter_store_load(store, &id, &loaded, &err), 0);
    double t_load = now_s() - t0;
    assert_int_equal(counter_version(loaded), BIG - 1);
    assert_int_equal(counter_state(loaded)->result, BIG - 1);
    counter_context_free(loaded);
    printf("# 150k events: saved in one statement in %.2f s, replayed "
           "through the core in %.2f s\n", t_save, t_load);
    assert_int_equal(es_store_close(store), 0);
    fixture_pg_drop_schema(schema);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_stream_150k_in_order_bounded_memory),
        cmocka_unit_test(test_pg_stream_from_version_and_early_stop),
        cmocka_unit_test(test_pg_stream_chunk_boundaries),
        cmocka_unit_test(test_pg_stream_150k_saved_in_one_statement),
    };
    static const fixture_pg_group group = {.store = &g_store, .sql = &g_sql};
    return FIXTURE_PG_RUN("test_pg_stream", tests, &group);
}
