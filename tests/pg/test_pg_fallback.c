/*
 * The host's fallback writer on PostgreSQL (DATABASE_URL): what a commit
 * lane's batch writer cannot pin on one item is written the generic way,
 * with blocking libpq on a pooled connection, on the host's commit loop.
 * A server that stops answering on that connection (its backend stopped
 * with SIGSTOP: to the client, a server or network gone without a word)
 * must not freeze the loop: the round trip gives up after the store's
 * silence limit (statement timeout + 5 s), the command gets a definite
 * answer, and the host shuts down while the backend is still stopped;
 * with the postmaster stopped too, connecting gives up after
 * connect_timeout and a shutdown still ends.  A COMMIT given up that way
 * may still commit once the backend runs again: the command is answered
 * only once that backend has ended, with the truth.  Every process
 * stopped here is continued by the teardown and at exit.
 */
#include <pthread.h>
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
#include "fixtures/pg.h"
#include "fixtures/pg_stop.h"

#define TIMEOUT_MS 200 /* the victim store's statement timeout */
#define SILENCE_MS (TIMEOUT_MS + 5000) /* the store's silence limit */
#define ANSWER_MS (SILENCE_MS + 5000)  /* the bound the test allows */

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static es_command command(uint8_t value[4], int32_t v)
{
    for (int i = 0; i < 4; i++) value[i] = (uint8_t)((uint32_t)v >> (8 * i));
    es_command c = {{{0}}, 1, value, 4};
    es_uuid_v7(&c.id);
    return c;
}

typedef struct waiter {
    atomic_int done;
    atomic_int status;
} waiter;

static void on_done(void *ud, const es_host_result *r)
{
    waiter *w = ud;
    atomic_store(&w->status, r->status);
    atomic_store(&w->done, 1);
}

static bool wait_flag(atomic_int *flag, long ms)
{
    long long end = fixture_now_ms() + ms;
    while (!atomic_load(flag) && fixture_now_ms() < end) sleep_ms(5);
    return atomic_load(flag) != 0;
}

typedef struct shutdown_job {
    es_host *host;
    atomic_int done;
    int rc;
} shutdown_job;

static void *shut_down(void *arg)
{
    shutdown_job *j = arg;
    j->rc = es_host_shutdown(j->host, NULL);
    atomic_store(&j->done, 1);
    return NULL;
}

static int continue_teardown(void **state)
{
    (void)state;
    fixture_pg_continue_all();
    return 0;
}

/* How many rows the command id has in the schema's commands. */
static long long stored_commands(PGconn *admin, const char *schema,
                                 const es_uuid *cmd)
{
    char c[ES_UUID_STRLEN + 1], sql[256];
    es_uuid_format(cmd, c);
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM \"%s\".commands WHERE command_id = "
             "$1::uuid",
             schema);
    const char *values[1] = {c};
    PGresult *r = PQexecParams(admin, sql, 1, NULL, values, NULL, NULL, 0);
    long long n = PQresultStatus(r) == PGRES_TUPLES_OK ? atoll(PQgetvalue(
                                                             r, 0, 0))
                                                       : -1;
    PQclear(r);
    return n;
}

static void exec_ok(PGconn *admin, const char *sql)
{
    PGresult *r = PQexec(admin, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        fail_msg("helper SQL failed: %s", PQresultErrorMessage(r));
    PQclear(r);
}

/* A store (a pool of one connection, a short statement timeout, extra
 * connection options) with a trigger that refuses one command at COMMIT,
 * and a one-lane host on it whose first command went through. */
typedef struct fallback_case {
    char schema[64], app[80];
    PGconn *admin;
    es_store *store;
    es_host *host;
    es_uuid key;
    uint8_t v1[4], v2[4];
    es_command first, refused;
    waiter w;
} fallback_case;

#define HOLD_LOCK 4343 /* the advisory lock a held COMMIT waits on */

/* hold: the refused command's COMMIT is refused once (the lane's), then
 * waits on HOLD_LOCK (past the statement timeout) until it is free. */
static void case_open(fallback_case *fc, const char *options, bool hold)
{
    char ci[1024], sql[1024];
    memset(fc, 0, sizeof *fc);
    fixture_pg_random_name(fc->schema, sizeof fc->schema, "fallback_");
    snprintf(fc->app, sizeof fc->app, "es_%s", fc->schema);
    fixture_pg_app_conninfo(ci, sizeof ci, fc->app);
    if (options) {
        size_t n = strlen(ci);
        snprintf(ci + n, sizeof ci - n, "%s%s",
                 strncmp(ci, "postgres", 8) == 0 ? "&" : " ", options);
    }
    fc->admin = fixture_pg_connect();
    assert_non_null(fc->admin);
    es_pg_config *cfg = NULL;
    assert_int_equal(es_pg_config_new(&cfg, NULL), 0);
    assert_int_equal(es_pg_config_set_conninfo(cfg, ci, NULL), 0);
    assert_int_equal(es_pg_config_set_schema(cfg, fc->schema, NULL), 0);
    assert_int_equal(es_pg_config_set_pool_size(cfg, 1, NULL), 0);
    assert_int_equal(es_pg_config_set_statement_timeout(cfg, TIMEOUT_MS,
                                                        NULL),
                     0);
    assert_int_equal(es_pg_migrate(cfg, NULL, NULL), 0);
    assert_int_equal(es_pg_store_open(cfg, &fc->store, NULL), 0);
    es_pg_config_free(cfg);

    fc->first = command(fc->v1, 1);
    fc->refused = command(fc->v2, 2);
    char rid[ES_UUID_STRLEN + 1];
    es_uuid_format(&fc->refused.id, rid);
    char then[256];
    if (hold)
        snprintf(then, sizeof then,
                 "IF nextval('\"%s\".tries') = 1 THEN RAISE EXCEPTION "
                 "'refused by the test'; END IF; LOOP BEGIN PERFORM "
                 "pg_advisory_xact_lock(%d); EXIT; EXCEPTION WHEN "
                 "query_canceled THEN NULL; END; END LOOP;",
                 fc->schema, HOLD_LOCK);
    else
        snprintf(then, sizeof then,
                 "RAISE EXCEPTION 'refused by the test';");
    snprintf(sql, sizeof sql,
             "CREATE SEQUENCE \"%s\".tries; CREATE FUNCTION "
             "\"%s\".refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
             "IF NEW.command_id = '%s' THEN %s END IF; RETURN NULL; END $$; "
             "CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON "
             "\"%s\".commands DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
             "EXECUTE FUNCTION \"%s\".refuse()",
             fc->schema, fc->schema, rid, then, fc->schema, fc->schema);
    exec_ok(fc->admin, sql);

    es_host_config *hc = NULL;
    assert_int_equal(es_host_config_new(&hc, NULL), 0);
    assert_int_equal(es_host_config_set_workers(hc, 1), 0);
    assert_int_equal(es_host_config_set_lanes(hc, 1), 0);
    assert_int_equal(es_host_config_set_snapshots(hc, 0, false), 0);
    assert_int_equal(es_host_config_set_snapshot_slow_load(hc, 0), 0);
    assert_int_equal(es_host_config_add_type(hc, &counter_type,
                                             counter_decide_add, NULL, NULL),
                     0);
    assert_int_equal(es_host_open(hc, fc->store, &fc->host, NULL), 0);
    es_host_config_free(hc);
    es_uuid_v7(&fc->key);
    /* the key resident and the lane connected */
    assert_int_equal(es_host_call(fc->host, &counter_type, &fc->key,
                                  &fc->first, NULL, NULL),
                     0);
    atomic_init(&fc->w.done, 0);
    atomic_init(&fc->w.status, 0);
}

/* The backend of the pool's one connection: its last statement is made
 * ROLLBACK (the lane's is COMMIT). */
static pid_t pool_backend(fallback_case *fc)
{
    es_txn *txn = NULL;
    assert_int_equal(es_store_begin(fc->store, &txn, NULL), 0);
    es_txn_rollback(txn);
    return fixture_pg_backend_of(fc->admin, fc->app,
                                 "state = 'idle' AND query = 'ROLLBACK'",
                                 1000);
}

/* Stop pid, or end the case as skipped, saying why. */
static void stop_or_skip(fallback_case *fc, pid_t pid)
{
    char why[160];
    if (pid != 0 && fixture_pg_stop(pid, why, sizeof why)) return;
    if (pid == 0) snprintf(why, sizeof why, "no process to stop");
    printf("fallback: skipped, %s\n", why);
    fixture_pg_continue_all();
    es_host_shutdown(fc->host, NULL);
    es_store_close(fc->store);
    PQfinish(fc->admin);
    fixture_pg_drop_schema(fc->schema);
    skip();
}

/* Shut the host down in a thread, up to ms; then continue what was
 * stopped and wait for the shutdown and the refused command's answer.
 * Returns whether the shutdown was done within ms (its time in *took). */
static bool shut_down_stopped(fallback_case *fc, long ms, long long *took,
                              int *rc)
{
    shutdown_job job = {fc->host, 0, 0};
    pthread_t th;
    long long t0 = fixture_now_ms();
    assert_int_equal(pthread_create(&th, NULL, shut_down, &job), 0);
    bool shut = wait_flag(&job.done, ms);
    *took = fixture_now_ms() - t0;
    fixture_pg_continue_all();
    pthread_join(th, NULL);
    *rc = job.rc;
    fc->host = NULL;
    return shut;
}

/* The store closed, the command's rows counted, the schema dropped. */
static long long case_close(fallback_case *fc)
{
    es_store_close(fc->store);
    long long stored = stored_commands(fc->admin, fc->schema,
                                       &fc->refused.id);
    PQfinish(fc->admin);
    fixture_pg_drop_schema(fc->schema);
    return stored;
}

/* The refused command's COMMIT: the lane's batch writer cannot pin the
 * refusal on an item and leaves it to the fallback writer, whose pooled
 * connection's backend is stopped.  The fallback writer gives that
 * backend up after the silence limit, writes on a new connection, meets
 * the refusal too and answers ES_EDB; the host then shuts down with the
 * backend still stopped. */
static void test_pg_fallback_stopped_backend(void **state)
{
    (void)state;
    static fallback_case fc;
    case_open(&fc, NULL, false);
    stop_or_skip(&fc, pool_backend(&fc));
    long long t0 = fixture_now_ms();
    assert_int_equal(es_host_send(fc.host, &counter_type, &fc.key,
                                  &fc.refused, on_done, &fc.w, NULL),
                     0);
    bool answered = wait_flag(&fc.w.done, ANSWER_MS);
    long long took = fixture_now_ms() - t0, shut_took = 0;
    int rc = 0;
    bool shut = shut_down_stopped(&fc, ANSWER_MS, &shut_took, &rc);
    bool answered_later = wait_flag(&fc.w.done, 30000);
    printf("fallback, its backend stopped: %s after %lld ms (status %s; "
           "silence limit %d ms), shutdown %s after %lld ms\n",
           answered ? "answered" : "no answer", took,
           es_status_name(atomic_load(&fc.w.status)), SILENCE_MS,
           shut ? "done" : "not done", shut_took);
    long long stored = case_close(&fc);
    assert_true(answered);
    assert_true(answered_later);
    assert_true(took >= SILENCE_MS - 1000); /* it did meet the stopped one */
    assert_int_equal(atomic_load(&fc.w.status), ES_EDB);
    assert_true(shut);
    assert_int_equal(rc, 0);
    assert_int_equal(stored, 0);
}

/* The postmaster stopped too: no new connection can be made either.  The
 * fallback writer gives the stopped backend up, then each connection
 * attempt gives up after connect_timeout (the user's 2 s here; 10 s by
 * default), and the command waits for the database, as commits do while
 * the host runs.  A shutdown with both still stopped ends within a few of
 * those limits: the command is answered ES_ECLOSED, nothing committed. */
#define CONNECT_S 2

static void test_pg_fallback_stopped_server(void **state)
{
    (void)state;
    static fallback_case fc;
    case_open(&fc, "connect_timeout=2", false);
    pid_t backend = pool_backend(&fc);
    pid_t postmaster = backend ? fixture_pg_parent_of(backend) : 0;
    stop_or_skip(&fc, postmaster);
    stop_or_skip(&fc, backend);
    assert_int_equal(es_host_send(fc.host, &counter_type, &fc.key,
                                  &fc.refused, on_done, &fc.w, NULL),
                     0);
    /* past the silence limit and a connection attempt or two */
    sleep_ms(SILENCE_MS + 2 * CONNECT_S * 1000);
    bool answered_early = atomic_load(&fc.w.done) != 0;
    long long shut_took = 0;
    int rc = 0;
    long bound = SILENCE_MS + 4 * CONNECT_S * 1000 + 5000;
    bool shut = shut_down_stopped(&fc, bound, &shut_took, &rc);
    bool answered = wait_flag(&fc.w.done, 30000);
    printf("fallback, backend and postmaster stopped: %s before the "
           "shutdown, status %s; shutdown %s after %lld ms (bound %ld ms)\n",
           answered_early ? "answered" : "not answered",
           es_status_name(atomic_load(&fc.w.status)),
           shut ? "done" : "not done", shut_took, bound);
    long long stored = case_close(&fc);
    assert_false(answered_early); /* it waits for the database */
    assert_true(shut);
    assert_int_equal(rc, 0);
    assert_true(answered);
    assert_int_equal(atomic_load(&fc.w.status), ES_ECLOSED);
    assert_int_equal(stored, 0);
}

/* The fallback writer's backend stopped inside its COMMIT (held there
 * by the trigger, on a lock the test holds), holding the command's rows:
 * the COMMIT may still go through once the backend runs again.  The
 * fallback writer gives it up after the silence limit (an unknown
 * outcome), and the lane's read back must not take "not found" for the
 * truth while that backend lives: the command stays unanswered (rather
 * than failing while it may commit), and once the backend runs again and
 * the lock is free it ends with the truth, stored once. */
static void test_pg_fallback_stopped_in_commit(void **state)
{
    (void)state;
    static fallback_case fc;
    case_open(&fc, NULL, true);
    PGconn *lock = fixture_pg_connect();
    assert_non_null(lock);
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT pg_advisory_lock(%d)", HOLD_LOCK);
    PGresult *r = PQexec(lock, sql);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);
    assert_int_equal(es_host_send(fc.host, &counter_type, &fc.key,
                                  &fc.refused, on_done, &fc.w, NULL),
                     0);
    pid_t pid = fixture_pg_backend_of(fc.admin, fc.app,
                                      "state = 'active' AND query = 'COMMIT' "
                                      "AND wait_event = 'advisory'",
                                      10000);
    if (pid == 0) PQfinish(lock);
    stop_or_skip(&fc, pid);
    long long t0 = fixture_now_ms();
    bool answered_stopped = wait_flag(&fc.w.done, SILENCE_MS + 4000);
    long long took = fixture_now_ms() - t0;
    int status_stopped = atomic_load(&fc.w.status);
    fixture_pg_continue_all();
    PQfinish(lock); /* free: a living COMMIT goes on */
    bool answered = wait_flag(&fc.w.done, 30000);
    printf("fallback, its backend stopped in COMMIT: %s while stopped "
           "(%lld ms, status %s), then status %s\n",
           answered_stopped ? "answered" : "not answered", took,
           es_status_name(status_stopped),
           es_status_name(atomic_load(&fc.w.status)));
    long long shut_took = 0;
    int rc = 0;
    bool shut = shut_down_stopped(&fc, 30000, &shut_took, &rc);
    long long stored = case_close(&fc);
    assert_false(answered_stopped);
    assert_true(answered);
    assert_int_equal(atomic_load(&fc.w.status), 0);
    assert_true(shut);
    assert_int_equal(rc, 0);
    assert_int_equal(stored, 1);
}

int main(void)
{
    atexit(fixture_pg_continue_all); /* nothing left stopped */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_pg_fallback_stopped_backend,
                                  continue_teardown),
        cmocka_unit_test_teardown(test_pg_fallback_stopped_server,
                                  continue_teardown),
        cmocka_unit_test_teardown(test_pg_fallback_stopped_in_commit,
                                  continue_teardown),
    };
    return FIXTURE_PG_RUN_GROUP("test_pg_fallback", tests, NULL, NULL);
}
