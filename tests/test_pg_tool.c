/*
 * The eventastic command line tool (build/<variant>/bin/eventastic, next
 * to this test's directory) against PostgreSQL (DATABASE_URL): migrate,
 * status and stream on a fresh schema, usage errors, and a connection
 * string whose password never shows.
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
        printf("test_pg_tool: skipped, DATABASE_URL is not set "
               "(tests/run.py sets it)\n");
        return 0;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pg_tool_migrate_status_stream),
        cmocka_unit_test(test_pg_tool_usage_and_secrets),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
