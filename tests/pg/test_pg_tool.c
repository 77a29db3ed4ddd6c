/*
 * The eventastic command line tool (build/<variant>/bin/eventastic, next
 * to this test's directory) against PostgreSQL (DATABASE_URL): migrate,
 * status and stream on a fresh schema, the outbox operations (list, show,
 * requeue one or all of a type, purge), usage errors, options after the
 * command, and a connection string whose password never shows.
 */
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "eventastic.h"
#include "fixtures/account.h"
#include "fixtures/pg.h"

static char g_tool[PATH_MAX + 32];
static char g_schema[40];
static char g_ob_schema[40];
static char g_after_schema[40];
static char g_proj_schema[40];

/* Run the tool with args (a shell word list); its output (stdout and
 * stderr) into out.  Returns its exit status. */
static int tool(const char *args, char *out, size_t cap)
{
    char cmd[PATH_MAX + 600];
    snprintf(cmd, sizeof cmd, "'%s' %s 2>&1", g_tool, args);
    FILE *p = popen(cmd, "r");
    if (p == NULL) return -1;
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = '\0';
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_pg_tool_migrate_status_stream(void **state)
{
    (void)state;
    char out[8192], args[256];
    snprintf(args, sizeof args, "--schema %s status", g_schema);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "schema version  0"));
    assert_non_null(strstr(out, "run 'eventastic migrate'"));

    snprintf(args, sizeof args, "--schema %s migrate", g_schema);
    assert_int_equal(tool(args, out, sizeof out), 0);
    char want[64];
    snprintf(want, sizeof want, "schema version %d", es_pg_schema_version());
    assert_non_null(strstr(out, want));
    assert_int_equal(tool(args, out, sizeof out), 0); /* again: a no-op */
    snprintf(args, sizeof args, "--schema %s commands purge --older-than 1h",
             g_schema);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "purged 0 command ids"));

    /* An account with two events in that schema. */
    es_pg_config *cfg = NULL;
    es_error err = {0};
    es_store *store = NULL;
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    assert_int_equal(es_pg_config_set_schema(cfg, g_schema, &err), 0);
    assert_int_equal(es_pg_store_open(cfg, &store, &err), 0);
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 5);
    assert_int_equal(account_builder_save(&b, store, NULL, &err), 0);
    assert_int_equal(es_store_close(store), 0);
    es_pg_config_free(cfg);

    snprintf(args, sizeof args, "--schema %s status", g_schema);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "events          2"));
    assert_non_null(strstr(out, "aggregates      1"));
    assert_non_null(strstr(out, "snapshots       1"));
    assert_non_null(strstr(out, "outbox          2 pending"));

    char id[ES_UUID_STRLEN + 1];
    es_uuid_format(&b.account_id, id);
    snprintf(args, sizeof args, "--schema %s stream %s", g_schema, id);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "version 0  kind 1"));
    assert_non_null(strstr(out, "version 1  kind 2"));
    assert_null(strstr(out, "version 2"));

    es_uuid other = fixture_new_id();
    es_uuid_format(&other, id);
    snprintf(args, sizeof args, "--schema %s stream %s", g_schema, id);
    assert_int_equal(tool(args, out, sizeof out), 1);
    assert_non_null(strstr(out, "has no events"));
}

static void test_pg_tool_usage_and_secrets(void **state)
{
    (void)state;
    char out[8192];
    assert_int_equal(tool("", out, sizeof out), 2);
    assert_non_null(strstr(out, "usage:"));
    assert_int_equal(tool("frobnicate", out, sizeof out), 2);
    assert_int_equal(tool("stream", out, sizeof out), 2);
    assert_int_equal(tool("stream not-a-uuid", out, sizeof out), 2);
    assert_int_equal(tool("--schema 'bad;name' status", out, sizeof out), 2);
    assert_int_equal(tool("--help", out, sizeof out), 0);
    assert_int_equal(tool("--db 'host=/nonexistent/es port=1 user=u "
                          "password=hunter2secret' status",
                          out, sizeof out),
                     1);
    assert_null(strstr(out, "hunter2secret"));
    assert_non_null(strstr(out, "ES_EDB"));
    assert_int_equal(tool("--db 'password hunter2secret' migrate", out,
                          sizeof out),
                     2);
    assert_null(strstr(out, "hunter2secret"));
}

/* --db, --schema and --help work after the command as before it; an
 * unknown option there is named, and is wrong usage. */
static void test_pg_tool_options_after_command(void **state)
{
    (void)state;
    char out[8192], args[256];
    const char *sc = g_after_schema;
    snprintf(args, sizeof args, "migrate --db \"$DATABASE_URL\" --schema %s",
             sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    char want[64];
    snprintf(want, sizeof want, "schema version %d", es_pg_schema_version());
    assert_non_null(strstr(out, want));
    snprintf(args, sizeof args, "--db \"$DATABASE_URL\" status --schema %s",
             sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    snprintf(want, sizeof want, "schema version  %d", es_pg_schema_version());
    assert_non_null(strstr(out, want));
    snprintf(args, sizeof args, "outbox list --schema %s --limit 1", sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "0 pending messages"));
    snprintf(args, sizeof args, "commands purge --older-than 1h --schema %s",
             sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "purged 0 command ids"));

    assert_int_equal(tool("status --help", out, sizeof out), 0);
    assert_non_null(strstr(out, "usage:"));
    snprintf(args, sizeof args, "migrate --schema %s --frob", sc);
    assert_int_equal(tool(args, out, sizeof out), 2);
    assert_non_null(strstr(out, "unknown option '--frob'"));
    assert_non_null(strstr(out, "usage:"));
    snprintf(args, sizeof args, "outbox list --schema %s --frob 3", sc);
    assert_int_equal(tool(args, out, sizeof out), 2);
    assert_non_null(strstr(out, "unknown option '--frob'"));
    assert_int_equal(tool("status --schema", out, sizeof out), 2);
    assert_non_null(strstr(out, "--schema needs a value"));
}

/* A handler that gives up (ud NULL) or succeeds (ud not NULL). */
static es_outbox_verdict verdict_of(void *ud, const es_outbox_entry *e,
                                    const void *value, es_error *reason)
{
    (void)e;
    (void)value;
    if (ud != NULL) return ES_OUTBOX_VERDICT_DONE;
    snprintf(reason->message, sizeof reason->message, "mailbox full");
    return ES_OUTBOX_VERDICT_GIVE_UP;
}

/* Deliver everything due with one handler, on this thread. */
static void deliver_all(es_store *store, bool succeed)
{
    es_outbox_config *cfg = NULL;
    assert_int_equal(es_outbox_config_new(store, &cfg, NULL), 0);
    assert_int_equal(es_outbox_config_add_handler(
                         cfg, &account_type, ES_OUTBOX_ANY_KIND, verdict_of,
                         succeed ? (void *)store : NULL, NULL),
                     0);
    es_outbox *ob = NULL;
    assert_int_equal(es_outbox_open(cfg, false, &ob, NULL), 0);
    es_outbox_config_free(cfg);
    size_t n = 1;
    for (int round = 0; n > 0 && round < 10; round++)
        assert_int_equal(es_outbox_run_once(ob, &n, NULL), 0);
    es_outbox_close(ob);
}

static void test_pg_tool_outbox(void **state)
{
    (void)state;
    char out[8192], args[256];
    const char *sc = g_ob_schema;
    es_store *store = NULL;
    assert_int_equal(fixture_pg_open(sc, &store), 0);
    account_builder b;
    account_builder_init(&b);
    account_builder_with_add(&b, 5);
    es_error err = {0};
    assert_int_equal(account_builder_save(&b, store, NULL, &err), 0);

    snprintf(args, sizeof args, "--schema %s outbox list", sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "type=account"));
    assert_non_null(strstr(out, "2 pending messages"));
    snprintf(args, sizeof args, "--schema %s outbox list pending --limit 1",
             sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "1 pending message (limit reached)"));

    deliver_all(store, false); /* both become dead letters */
    snprintf(args, sizeof args, "--schema %s outbox list dead", sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "2 dead messages"));
    assert_non_null(strstr(out, "error=\"mailbox full\""));

    es_outbox_entry_list *dead = NULL;
    assert_int_equal(es_outbox_list(store, ES_OUTBOX_DEAD, 0, &dead, NULL), 0);
    assert_int_equal(dead->count, 2);
    char id[ES_UUID_STRLEN + 1];
    es_uuid_format(&dead->items[0].side_effect.id, id);
    es_outbox_entry_list_free(dead);
    snprintf(args, sizeof args, "--schema %s outbox show %s", sc, id);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, id));
    assert_non_null(strstr(out, "status          dead"));
    assert_non_null(strstr(out, "aggregate type  account"));
    assert_non_null(strstr(out, "attempts        1"));
    assert_non_null(strstr(out, "last error      \"mailbox full\""));
    assert_non_null(strstr(out, "payload"));

    snprintf(args, sizeof args, "--schema %s outbox requeue %s", sc, id);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "requeued 1 dead letter"));
    assert_int_equal(tool(args, out, sizeof out), 1); /* not dead now */
    assert_non_null(strstr(out, "ES_ENOTFOUND"));
    snprintf(args, sizeof args, "--schema %s outbox requeue --type account "
             "--kind 12345", sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "requeued 0 dead letters"));
    snprintf(args, sizeof args, "--schema %s outbox requeue --type account",
             sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "requeued 1 dead letter"));
    snprintf(args, sizeof args, "--schema %s outbox list", sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "2 pending messages"));

    deliver_all(store, true);
    snprintf(args, sizeof args, "--schema %s outbox list done", sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "2 done messages"));
    snprintf(args, sizeof args, "--schema %s outbox purge --older-than 1h",
             sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "purged 0 done messages"));
    usleep(20000);
    snprintf(args, sizeof args, "--schema %s outbox purge --older-than 5ms",
             sc);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "purged 2 done messages"));
    es_outbox_stats stats;
    assert_int_equal(es_outbox_stats_get(store, 0, &stats, NULL), 0);
    assert_int_equal(stats.pending + stats.dead + stats.done, 0);

    es_uuid other = fixture_new_id();
    es_uuid_format(&other, id);
    snprintf(args, sizeof args, "--schema %s outbox show %s", sc, id);
    assert_int_equal(tool(args, out, sizeof out), 1);
    assert_non_null(strstr(out, "ES_ENOTFOUND"));
    const char *bad[] = {
        "outbox", "outbox list sideways", "outbox list --limit 0",
        "outbox show", "outbox show not-a-uuid", "outbox requeue",
        "outbox requeue --kind 3", "outbox purge", "outbox purge 7d",
        "outbox purge --older-than 5x", "outbox frob", "commands",
        "commands purge", "commands purge --older-than", "commands frob",
        "commands purge --older-than 5x"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(args, sizeof args, "--schema %s %s", sc, bad[i]);
        assert_int_equal(tool(args, out, sizeof out), 2);
        assert_non_null(strstr(out, "usage:"));
    }
    assert_int_equal(tool("--help", out, sizeof out), 0);
    assert_non_null(strstr(out, "outbox requeue"));
    assert_int_equal(es_store_close(store), 0);
}

static int ignore_event(void *ud, es_txn *txn, const es_recorded_event *ev,
                        es_error *err)
{
    (void)txn;
    (void)ev;
    (void)err;
    (*(int *)ud)++;
    return 0;
}

/* A checkpoint at the head, two events after it: the list shows it two
 * behind; reset deletes it (then ES_ENOTFOUND); a bad name is a usage
 * error. */
static void test_pg_tool_projections(void **state)
{
    (void)state;
    char out[8192], args[256];
    snprintf(args, sizeof args, "--schema %s migrate", g_proj_schema);
    assert_int_equal(tool(args, out, sizeof out), 0);
    snprintf(args, sizeof args, "projections --schema %s", g_proj_schema);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "no projection has a checkpoint"));

    es_pg_config *cfg = NULL;
    es_error err = {0};
    es_store *store = NULL;
    assert_int_equal(es_pg_config_new(&cfg, &err), 0);
    assert_int_equal(es_pg_config_set_schema(cfg, g_proj_schema, &err), 0);
    assert_int_equal(es_pg_store_open(cfg, &store, &err), 0);
    es_pg_config_free(cfg);
    account_builder b;
    account_builder_init(&b);
    assert_int_equal(account_builder_save(&b, store, NULL, &err), 0);
    es_projection_config *pc = NULL;
    es_projection *p = NULL;
    int seen = 0;
    assert_int_equal(es_projection_config_new(&pc, &err), 0);
    assert_int_equal(es_projection_config_set_name(pc, "tool.views", &err),
                     0);
    assert_int_equal(es_projection_config_set_handler(pc, ignore_event, NULL,
                                                      &seen, &err), 0);
    assert_int_equal(es_projection_start(store, pc, &p, &err), 0);
    es_projection_config_free(pc);
    es_position head;
    assert_int_equal(es_store_head(store, &head, &err), 0);
    assert_int_equal(es_projection_wait(p, &head, 10000), 0);
    es_projection_stop(p);
    assert_int_equal(seen, 1);
    account_builder_init(&b);
    account_builder_with_add(&b, 5);
    assert_int_equal(account_builder_save(&b, store, NULL, &err), 0);
    assert_int_equal(es_store_close(store), 0);

    assert_int_equal(tool(args, out, sizeof out), 0);
    const char *line = strstr(out, "tool.views");
    assert_non_null(line);
    char name[64], pos[64], saved[64];
    unsigned long long lag = 99;
    assert_int_equal(sscanf(line, "%63s %63s %63s %llu", name, pos, saved,
                            &lag), 4);
    assert_int_equal(lag, 2); /* two events behind */
    snprintf(args, sizeof args, "--schema %s projections reset tool.views",
             g_proj_schema);
    assert_int_equal(tool(args, out, sizeof out), 0);
    assert_int_equal(tool(args, out, sizeof out), 1);
    assert_non_null(strstr(out, "ES_ENOTFOUND"));
    snprintf(args, sizeof args, "--schema %s projections reset 'a b'",
             g_proj_schema);
    assert_int_equal(tool(args, out, sizeof out), 2);
    snprintf(args, sizeof args, "--schema %s projections frob",
             g_proj_schema);
    assert_int_equal(tool(args, out, sizeof out), 2);
}

static int group_setup(void **state)
{
    (void)state;
    /* build/<variant>/tests/test_pg_tool -> build/<variant>/bin/eventastic */
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) return -1;
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (slash == NULL) return -1;
    *slash = '\0';
    snprintf(g_tool, sizeof g_tool, "%s/../bin/eventastic", self);
    if (access(g_tool, X_OK) != 0) {
        fprintf(stderr, "setup: %s is not built\n", g_tool);
        return -1;
    }
    fixture_pg_random_name(g_schema, sizeof g_schema, "es_tool_");
    fixture_pg_random_name(g_ob_schema, sizeof g_ob_schema, "es_tool_ob_");
    fixture_pg_random_name(g_after_schema, sizeof g_after_schema,
                           "es_tool_after_");
    fixture_pg_random_name(g_proj_schema, sizeof g_proj_schema,
                           "es_tool_proj_");
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    fixture_pg_drop_schema(g_schema);
    fixture_pg_drop_schema(g_ob_schema);
    fixture_pg_drop_schema(g_after_schema);
    fixture_pg_drop_schema(g_proj_schema);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_tool_migrate_status_stream),
        cmocka_unit_test(test_pg_tool_usage_and_secrets),
        cmocka_unit_test(test_pg_tool_outbox),
        cmocka_unit_test(test_pg_tool_options_after_command),
        cmocka_unit_test(test_pg_tool_projections),
    };
    return FIXTURE_PG_RUN_GROUP("test_pg_tool", tests, group_setup,
                                group_teardown);
}
