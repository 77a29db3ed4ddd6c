/* The connection options every connection of the PostgreSQL store gets
 * (keepalives, tcp_user_timeout, connect_timeout), unless its connection
 * string sets them; no database needed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>
#include <libpq-fe.h>

#include "core/internal.h"
#include "store/pg/conninfo.h"

/* The value of keyword in a connection string (a copy in out; "" when
 * unset). */
static void value_of(const char *conninfo, const char *keyword, char *out,
                     size_t cap)
{
    char *msg = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &msg);
    assert_non_null(opts);
    out[0] = '\0';
    for (PQconninfoOption *o = opts; o->keyword != NULL; o++)
        if (strcmp(o->keyword, keyword) == 0 && o->val != NULL)
            snprintf(out, cap, "%s", o->val);
    PQconninfoFree(opts);
}

static void expect(const char *conninfo, const char *keyword,
                   const char *want)
{
    char got[128];
    value_of(conninfo, keyword, got, sizeof got);
    assert_string_equal(got, want);
}

static void test_conninfo_defaults_added(void **state)
{
    (void)state;
    char *ci = NULL;
    assert_int_equal(es__pg_conninfo_with_defaults(
                         "host=/run/pg port=5433 dbname=bank", &ci),
                     0);
    expect(ci, "host", "/run/pg");
    expect(ci, "port", "5433");
    expect(ci, "dbname", "bank");
    expect(ci, "keepalives", "1");
    expect(ci, "keepalives_idle", "30");
    expect(ci, "keepalives_interval", "10");
    expect(ci, "keepalives_count", "3");
    expect(ci, "tcp_user_timeout", "60000");
    expect(ci, "connect_timeout", "10");
    es__free(ci);
}

/* What the user's string sets wins, in either form; values with quotes
 * and backslashes survive. */
static void test_conninfo_user_settings_kept(void **state)
{
    (void)state;
    char *ci = NULL;
    assert_int_equal(
        es__pg_conninfo_with_defaults("host=db keepalives_idle=5 "
                                      "password='it\\'s \\\\ secret'",
                                      &ci),
        0);
    expect(ci, "keepalives_idle", "5");
    expect(ci, "keepalives", "1");
    expect(ci, "password", "it's \\ secret");
    es__free(ci);
    assert_int_equal(
        es__pg_conninfo_with_defaults("postgresql://u@db.example:6432/app?"
                                      "keepalives=0&tcp_user_timeout=100&"
                                      "application_name=x%20y",
                                      &ci),
        0);
    expect(ci, "host", "db.example");
    expect(ci, "port", "6432");
    expect(ci, "user", "u");
    expect(ci, "dbname", "app");
    expect(ci, "keepalives", "0");
    expect(ci, "tcp_user_timeout", "100");
    expect(ci, "application_name", "x y");
    expect(ci, "connect_timeout", "10");
    es__free(ci);
}

static void test_conninfo_bad_string(void **state)
{
    (void)state;
    char *ci = (char *)"untouched";
    assert_int_equal(es__pg_conninfo_with_defaults("nonsense", &ci),
                     ES_EINVAL);
    assert_string_equal(ci, "untouched");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_conninfo_defaults_added),
        cmocka_unit_test(test_conninfo_user_settings_kept),
        cmocka_unit_test(test_conninfo_bad_string),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
